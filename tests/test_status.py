"""`rubrix-telemetry status`, run as an operator runs it: what it says, and its exit code."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis

from tests.support import (REPO_ROOT, SilentBroker, WorkerProcess, child_environment, free_port,
                           run_hook_client, scripted)

PASSWORD = "s3cret"


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def document(self) -> dict[str, Any]:
        return json.loads(self.stdout)


def status(*args: str, **env: str | None) -> Run:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "status", *args], cwd=REPO_ROOT,
                          env=child_environment(**env), capture_output=True, text=True, timeout=30)
    return Run(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


@contextlib.contextmanager
def running_worker(env: dict[str, str], log_file: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(env, log_file)
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


def counts_reaching(expected: dict[str, Any], env: dict[str, str | None], timeout: float = 20) -> dict[str, Any]:
    """The counts status reports, once they equal `expected` (or when `timeout` has passed)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = status("--json", **env).document["counts"]
        if counts == expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


@pytest.mark.slow
def test_counts_of_a_worker_process_are_what_status_reports(redis_server, backend, tmp_path):
    # A broker database of its own: counts are per broker, and no other test's worker uses this one.
    isolated: dict[str, str | None] = {"RUBRIX_TELEMETRY_BROKER_URL": f"redis://127.0.0.1:{redis_server.port}/3"}
    redis.Redis(host="127.0.0.1", port=redis_server.port, db=3).flushdb()
    backend.responder = scripted([503, 200, 400])
    with running_worker(child_environment(**isolated), tmp_path / "worker.log") as worker:
        report, _ = run_hook_client(child_environment(**isolated), count=2)  # refused once with 503, then delivered
        assert report["flushed"] and backend.wait_for(lambda b: len(b.accepted_messages()) == 2, 20), worker.log()
        report, _ = run_hook_client(child_environment(**isolated), count=1)  # refused with 400: dropped
        assert report["flushed"]

        expected = {"delivered": 2, "retried": 2, "dropped": {"HTTP 400": 1}}
        assert counts_reaching(expected, isolated) == expected
    assert [r.status for r in backend.requests] == [503, 200, 400]


def test_queue_depth_counts_messages_waiting_in_redis(redis_server):
    queue = f"status-test-{uuid.uuid4().hex[:8]}"  # no worker consumes it
    env = child_environment(RUBRIX_TELEMETRY_QUEUE=queue, RUBRIX_TELEMETRY_EVENTS_PER_TASK="1")
    report, _ = run_hook_client(env, count=3)
    assert report["flushed"]
    try:
        run = status("--json", RUBRIX_TELEMETRY_QUEUE=queue)
        assert run.code == 0, run.stderr
        assert (run.document["queue"]["name"], run.document["queue"]["depth"]) == (queue, 3)
        assert run.document["broker"] == {"url": redis_server.url, "answers": True, "error": None}
    finally:
        redis_server.client().delete(queue)


def test_healthy_pipeline_reads_as_text_and_exits_zero(redis_server):
    run = status()
    assert run.code == 0, run.stderr
    lines = dict(line.split(":", 1) for line in run.stdout.splitlines() if not line.startswith(" "))
    assert lines["telemetry"].strip() == "on (decided by RUBRIX_ENABLE_TELEMETRY)"
    assert lines["broker"].strip() == f"{redis_server.url} (answers)"
    assert lines["queue"].strip().startswith("telemetry: ")
    assert lines["status"].strip() == "healthy"
    assert "test-write-key" not in run.stdout + run.stderr


@pytest.mark.parametrize("output", [(), ("--json",)])
def test_unreachable_broker_fails_fast_with_one_line_and_no_password(output):
    closed = free_port()
    run = status(*output, RUBRIX_TELEMETRY_BROKER_URL=f"redis://:{PASSWORD}@127.0.0.1:{closed}/0")
    assert run.code != 0
    assert run.seconds < 5
    assert run.stderr.count("\n") == 1
    assert "does not answer" in run.stderr and f"127.0.0.1:{closed}" in run.stderr
    assert PASSWORD not in run.stdout + run.stderr
    assert "test-write-key" not in run.stdout + run.stderr


def test_broker_that_never_answers_does_not_hang_status():
    silent = SilentBroker()
    try:
        run = status("--json", RUBRIX_TELEMETRY_BROKER_URL=f"redis://:{PASSWORD}@127.0.0.1:{silent.port}/0")
    finally:
        silent.close()
    assert run.code != 0 and run.seconds < 8
    assert run.document["broker"]["answers"] is False
    assert run.stderr.count("\n") == 1 and PASSWORD not in run.stdout + run.stderr


@pytest.mark.parametrize("variable, value", [("RUBRIX_ENABLE_TELEMETRY", "off"), ("DO_NOT_TRACK", "1")])
def test_switched_off_says_which_variable_decided(variable, value):
    run = status("--json", **{variable: value})
    assert run.code == 0, run.stderr
    assert run.document["telemetry"] == {"enabled": False, "decided_by": variable}


@pytest.mark.slow
def test_embedded_broker_queue_depth_and_counts_shared_by_worker_and_status(backend, tmp_path):
    embedded: dict[str, str | None] = {"RUBRIX_TELEMETRY_BROKER_URL": None,
                                       "RUBRIX_TELEMETRY_DATA_DIR": str(tmp_path / "data")}
    env = child_environment(**embedded, RUBRIX_TELEMETRY_EVENTS_PER_TASK="1")
    report, _ = run_hook_client(env, count=2)
    assert report["flushed"]
    waiting = status("--json", **embedded)
    assert waiting.code == 0, waiting.stderr
    assert waiting.document["broker"]["url"].startswith("embedded://")
    assert waiting.document["queue"]["depth"] == 2

    with running_worker(env, tmp_path / "worker.log") as worker:
        assert backend.wait_for(lambda b: len(b.accepted_messages()) >= 2, timeout=20), worker.log()
    done = status("--json", **embedded)
    assert done.document["queue"]["depth"] == 0
    assert done.document["counts"] == {"delivered": 2, "retried": 0, "dropped": {}}
