"""What an operator sees in Flower: deliveries, retries with their reason, drops with theirs,
and the Prometheus counts, read through Flower's own HTTP API."""

from __future__ import annotations

import asyncio
import itertools
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from rubrix_hooks import flush, track_bulk
from telemetry_core.contract import DELIVER_TASK_NAME
from tests.support import (REPO_ROOT, WorkerProcess, child_environment, free_port, publish_events, scripted,
                           wait_until)

pytestmark = pytest.mark.slow

AUTH = ("operator", "flower-test-password")
# Unique record counts mark each test's event, so that its messageId can be read at the backend.
_markers = itertools.count(910_001)


class FlowerProcess:
    """`celery -A tasks flower` as an operator runs it, with basic auth, on a loopback port."""

    def __init__(self, log_file: Path, **env: str | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log_file.open("wb")
        self.log_file = log_file
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "flower", f"--port={self.port}", "--address=127.0.0.1"],
            cwd=REPO_ROOT, env=child_environment(FLOWER_BASIC_AUTH=":".join(AUTH), **env),
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(self.url + path, params=params, auth=AUTH, timeout=5)

    def answers(self) -> bool:
        try:
            return self.get("/healthcheck").status_code == 200
        except requests.RequestException:
            return False

    def wait_listening(self, timeout: float = 30) -> None:
        """Until Flower both serves HTTP and receives the broker's events: a worker event
        sent before its subscription exists is lost, so send probes until one shows."""
        if not wait_until(lambda: self.answers() or self.process.poll() is not None, timeout):
            raise RuntimeError(f"Flower did not answer in {timeout}s:\n{self.log_file.read_text()}")
        from tasks import app

        probe = f"flower-probe-{uuid.uuid4().hex[:8]}@test"
        with app.events.default_dispatcher(hostname=probe) as dispatcher:
            def seen() -> bool:
                dispatcher.send("worker-online")
                return f'worker="{probe}"' in self.get("/metrics").text

            if not wait_until(seen, timeout, interval=0.2):
                raise RuntimeError(f"Flower received no worker events in {timeout}s:\n{self.log_file.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    def task_with(self, message_id: str) -> dict[str, Any] | None:
        """The delivery task carrying the event `message_id`, as Flower's API lists it."""
        tasks = self.get("/api/tasks", taskname=DELIVER_TASK_NAME).json()
        return next((task for task in tasks.values() if message_id in str(task.get("args")) + str(task.get("kwargs"))), None)

    def wait_for_task(self, message_id: str, state: str) -> dict[str, Any]:
        task = wait_until(lambda: (t := self.task_with(message_id)) and t["state"] == state and t, timeout=20)
        assert task, f"Flower never showed the task as {state}: {self.task_with(message_id)}"
        return task

    def metric(self, event_type: str) -> float:
        """flower_events_total of the delivery task for one event type, summed over workers."""
        pattern = re.compile(r'^flower_events_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$', re.MULTILINE)
        return sum(float(m["value"]) for m in pattern.finditer(self.get("/metrics").text)
                   if f'task="{DELIVER_TASK_NAME}"' in m["labels"] and f'type="{event_type}"' in m["labels"])


@pytest.fixture(scope="module")
def flower(redis_server, celery_worker_in_process, tmp_path_factory) -> Iterator[FlowerProcess]:
    process = FlowerProcess(tmp_path_factory.mktemp("flower") / "flower.log")
    try:
        process.wait_listening()
        yield process
    finally:
        process.stop()


def send_event(backend) -> str:
    """Fires one hook; the messageId of its event, as the backend first received it."""
    marker = next(_markers)

    async def fire() -> None:
        await track_bulk("TextClassification", marker)

    asyncio.run(fire())
    assert flush(5)

    found: list[str] = []

    def arrived(backend) -> bool:
        found[:] = [m["messageId"] for r in backend.requests for m in r.messages
                    if m["properties"].get("records") == marker]
        return bool(found)

    assert backend.wait_for(arrived, timeout=15), "the event never reached the backend"
    return found[0]


def failing_until_released(pipeline) -> list[bool]:
    """Makes the backend answer 503 until the returned flag is set."""
    released = [False]
    pipeline.responder = lambda path, body: (200, {}) if released[0] else (503, {})
    return released


def test_backend_failure_shows_as_retry_with_reason_then_success(pipeline, flower):
    released = failing_until_released(pipeline)
    message_id = send_event(pipeline)

    assert "HTTP 503" in flower.wait_for_task(message_id, "RETRY")["exception"]

    released[0] = True
    assert "'delivered': 1" in flower.wait_for_task(message_id, "SUCCESS")["result"]
    assert [m["messageId"] for m in pipeline.accepted_messages()] == [message_id]


def test_dropped_events_show_why_in_the_task_result(pipeline, flower):
    pipeline.responder = scripted([400])
    result = flower.wait_for_task(send_event(pipeline), "SUCCESS")["result"]
    assert "'delivered': 0" in result and "'HTTP 400': 1" in result


def test_prometheus_endpoint_counts_deliveries_and_retries(pipeline, flower):
    succeeded, retried = flower.metric("task-succeeded"), flower.metric("task-retried")
    pipeline.responder = scripted([503])
    send_event(pipeline)
    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 1, timeout=20)

    assert wait_until(lambda: flower.metric("task-succeeded") >= succeeded + 1, timeout=10), flower.get("/metrics").text
    assert flower.metric("task-retried") >= retried + 1


def test_flower_on_the_embedded_queue_sees_every_delivery_across_its_sweeps(collectors, tmp_path):
    # The default broker: Flower reads task events from a queue in the data folder, whose
    # messages expire after 5 s when nobody takes them (telemetry_core/brokers/embedded.py). A
    # live Flower keeps taking them, across several of the queue's 5 s sweeps.
    data = tmp_path / "data"
    env = {"RUBRIX_TELEMETRY_BROKER_URL": None, "RUBRIX_TELEMETRY_DATA_DIR": str(data)}
    backend = collectors()
    worker = WorkerProcess(child_environment(RUBRIX_TELEMETRY_ENDPOINT=backend.url, **env), tmp_path / "worker.log",
                           extra_args=["-E", "-n", "embedded-flower@%h"])
    flower = FlowerProcess(tmp_path / "flower.log", **env)
    try:
        worker.wait_ready()
        assert wait_until(lambda: flower.answers() and 'worker="embedded-flower@' in flower.get("/metrics").text,
                          timeout=30, interval=0.5), flower.log_file.read_text()
        for _ in range(3):  # three task messages, 6 s apart
            publish_events(5, "telemetry", embedded_data_dir=data)
            time.sleep(6)
        assert wait_until(lambda: flower.metric("task-succeeded") == 3, timeout=20, interval=0.5), (
            flower.get("/metrics").text[-2000:])
        assert len(backend.accepted_messages()) == 15
    finally:
        flower.stop()
        worker.stop()
