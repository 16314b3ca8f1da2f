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

import celery
import kombu
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
    done = subprocess.run([sys.executable, "-m", "telemetry_ops.cli", "status", *args], cwd=REPO_ROOT,
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
        assert (run.document["queue"]["name"], run.document["queue"]["depth"]) == (queue, 3)
        assert run.document["broker"] == {"url": redis_server.url, "answers": True, "error": None}
        # The events wait for ever: nobody takes them.
        assert run.code == 1 and run.document["problems"] == [no_worker_problem(queue, redis_server.url)]
    finally:
        redis_server.client().delete(queue)


def no_worker_problem(queue: str, broker_url: str) -> str:
    return (f"no worker consumes the queue {queue!r} on {broker_url}: start one "
            f"(celery -A tasks worker -Q {queue} -E -l INFO) with the same RUBRIX_TELEMETRY_BROKER_URL")


def isolated_broker(redis_server, db: int) -> dict[str, str | None]:
    """A broker database of the test's own, emptied: workers of other tests answer on theirs."""
    redis.Redis(host="127.0.0.1", port=redis_server.port, db=db).flushdb()
    return {"RUBRIX_TELEMETRY_BROKER_URL": f"redis://127.0.0.1:{redis_server.port}/{db}"}


# The shell status runs in knows only where the broker is: no endpoint, no write key.
BARE_SHELL: dict[str, str | None] = {"RUBRIX_TELEMETRY_ENDPOINT": None, "RUBRIX_TELEMETRY_KEY": None}


@pytest.mark.slow
def test_status_asks_the_worker_whose_endpoint_and_key_only_it_has(redis_server, backend, tmp_path):
    broker = isolated_broker(redis_server, db=4)
    worker_env = child_environment(**broker, RUBRIX_TELEMETRY_ENDPOINT=backend.url, RUBRIX_TELEMETRY_KEY="wk-only-here")
    with running_worker(worker_env, tmp_path / "worker.log") as worker:
        report, _ = run_hook_client(child_environment(**broker, **BARE_SHELL), count=4)
        assert report["flushed"] and backend.wait_for(lambda b: len(b.accepted_messages()) == 4, 20), worker.log()
        run = status(**broker, **BARE_SHELL)
        as_json = status("--json", **broker, **BARE_SHELL)
    # The shell alone would say "Segment without a key": the worker says otherwise, and it delivers.
    assert run.code == 0, run.stdout + run.stderr
    assert run.stderr == ""
    lines = dict(line.split(":", 1) for line in run.stdout.splitlines() if not line.startswith(" "))
    assert lines["telemetry"].strip() == "on (decided by RUBRIX_ENABLE_TELEMETRY)"
    assert lines["broker"].strip() == f"{broker['RUBRIX_TELEMETRY_BROKER_URL']} (answers)"
    assert lines["workers"].strip() == "1 consuming 'telemetry', 1 answering in all"
    assert lines["delivered"].strip() == "4"
    assert lines["status"].strip() == "healthy"
    worker_line = next(line for line in run.stdout.splitlines() if line.startswith("  test-"))
    assert f"endpoint {backend.url} (write key set)" in worker_line and "queues telemetry" in worker_line

    assert as_json.code == 0 and as_json.document["healthy"] is True
    [answer] = as_json.document["workers"]
    assert answer["name"].startswith("test-") and answer["queues"] == ["telemetry"]
    assert answer["telemetry"] == {"enabled": True, "decided_by": "RUBRIX_ENABLE_TELEMETRY"}
    assert (answer["endpoint"], answer["write_key_set"], answer["problem"]) == (backend.url, True, None)
    assert answer["concurrency"] == 1  # --pool solo
    assert answer["celery_version"] == celery.__version__ and answer["kombu_version"] == kombu.__version__
    # This shell's own settings keep their keys, and say what they are: not the workers'.
    assert (as_json.document["endpoint"], as_json.document["write_key_set"]) == ("https://api.segment.io", False)
    assert "wk-only-here" not in run.stdout + as_json.stdout


@pytest.mark.slow
def test_a_worker_that_cannot_deliver_is_a_fault_and_one_switched_off_is_not(redis_server, tmp_path):
    broker = isolated_broker(redis_server, db=5)
    no_key = child_environment(**broker, **BARE_SHELL)  # Segment, the default endpoint, without a key
    off = child_environment(**broker, RUBRIX_ENABLE_TELEMETRY="0")
    with running_worker(no_key, tmp_path / "no-key.log"), running_worker(off, tmp_path / "off.log"):
        run = status("--json", **broker)
    assert run.code == 1
    workers = {answer["telemetry"]["enabled"]: answer for answer in run.document["workers"]}
    assert workers[False]["telemetry"]["decided_by"] == "RUBRIX_ENABLE_TELEMETRY"
    assert workers[False]["problem"] is None
    assert workers[True]["endpoint"] == "https://api.segment.io" and workers[True]["write_key_set"] is False
    problem = (f"worker {workers[True]['name']} cannot deliver: RUBRIX_TELEMETRY_KEY is not set: "
               "events are dropped, not sent to https://api.segment.io")
    assert run.document["problems"] == [problem]
    assert run.stderr == f"rubrix-telemetry: unhealthy: {problem}\n"


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_no_worker_is_unhealthy_within_five_seconds(redis_server, tmp_path, broker):
    if broker == "redis":
        env = isolated_broker(redis_server, db=6)
        url = env["RUBRIX_TELEMETRY_BROKER_URL"]
    else:
        env = {"RUBRIX_TELEMETRY_BROKER_URL": None, "RUBRIX_TELEMETRY_DATA_DIR": str(tmp_path / "data")}
        report, _ = run_hook_client(child_environment(**env), count=1)  # a server has used the queue
        assert report["flushed"]
        url = "embedded://localhost//"
    run = status(**env)
    assert run.seconds < 5
    assert run.code == 1
    assert run.stderr == f"rubrix-telemetry: unhealthy: {no_worker_problem('telemetry', url)}\n"
    assert "Traceback" not in run.stdout + run.stderr


@pytest.mark.slow
def test_server_and_worker_on_different_brokers_no_worker_consumes_the_servers_queue(redis_server, backend,
                                                                                     tmp_path):
    # The server's shell: the embedded queue (no broker set); the worker's: Redis.
    server_shell = {"RUBRIX_TELEMETRY_BROKER_URL": None, "RUBRIX_TELEMETRY_DATA_DIR": str(tmp_path / "data")}
    worker_broker = isolated_broker(redis_server, db=7)
    with running_worker(child_environment(**worker_broker), tmp_path / "worker.log"):
        report, _ = run_hook_client(child_environment(**server_shell, RUBRIX_TELEMETRY_EVENTS_PER_TASK="1"), count=2)
        assert report["flushed"]
        in_server_shell = status("--json", **server_shell)
        in_worker_shell = status("--json", **worker_broker)
    assert in_server_shell.code == 1 and in_server_shell.document["workers"] == []
    assert in_server_shell.document["queue"]["depth"] == 2  # waiting for a worker that is elsewhere
    assert in_server_shell.stderr == (
        f"rubrix-telemetry: unhealthy: {no_worker_problem('telemetry', 'embedded://localhost//')}\n")
    assert in_worker_shell.code == 0 and len(in_worker_shell.document["workers"]) == 1
    assert backend.requests == []  # nothing was delivered


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
    assert waiting.code == 1 and waiting.document["problems"] == [no_worker_problem("telemetry",
                                                                                     "embedded://localhost//")]
    assert waiting.document["broker"]["url"].startswith("embedded://")
    assert waiting.document["queue"]["depth"] == 2

    with running_worker(env, tmp_path / "worker.log") as worker:
        assert backend.wait_for(lambda b: len(b.accepted_messages()) >= 2, timeout=20), worker.log()
        consumed = status("--json", **embedded)
    assert consumed.code == 0, consumed.stderr
    assert [answer["queues"] for answer in consumed.document["workers"]] == [["telemetry"]]
    done = status("--json", **embedded)
    assert done.document["queue"]["depth"] == 0
    assert done.document["counts"] == {"delivered": 2, "retried": 0, "dropped": {}}


def test_an_endpoint_password_in_a_workers_answer_is_masked_in_text_and_json(monkeypatch):
    # This release refuses such an endpoint at start; an older release's worker still reports it.
    from telemetry_core.settings import load_settings
    from telemetry_ops import status as status_command

    answer = {"name": "older@host", "queues": ["telemetry"], "telemetry": {"enabled": True, "decided_by": "default"},
              "endpoint": f"http://user:{PASSWORD}@collector:6970", "write_key_set": True}
    report = status_command.BrokerReport(url="redis://127.0.0.1:1/0", answers=True)
    monkeypatch.setattr(status_command, "probe_broker", lambda settings, timeout: report)
    monkeypatch.setattr(status_command, "ask_workers", lambda settings, deadline, reply_wait: [answer])
    collected = status_command.collect_status(load_settings())
    text, document = status_command._as_text(collected), json.loads(status_command._as_json(collected))
    assert PASSWORD not in text + json.dumps(document)
    assert "endpoint http://user:***@collector:6970" in text
    assert document["workers"][0]["endpoint"] == "http://user:***@collector:6970"
