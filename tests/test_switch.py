"""RUBRIX_ENABLE_TELEMETRY=0 / DO_NOT_TRACK=1, shown by what does not happen."""

from __future__ import annotations

import pytest

from telemetry_ops.collector import Collector
from tests.support import SilentBroker, WorkerProcess, child_environment, run_hook_client, wait_until

OFF_SWITCHES = [
    {"RUBRIX_ENABLE_TELEMETRY": "0"},
    {"RUBRIX_ENABLE_TELEMETRY": "false"},
    {"RUBRIX_ENABLE_TELEMETRY": "NO"},
    {"RUBRIX_ENABLE_TELEMETRY": "Off"},
    {"DO_NOT_TRACK": "1"},
]


@pytest.mark.parametrize("switch", OFF_SWITCHES, ids=lambda s: "=".join(*s.items()))
def test_server_with_telemetry_off_opens_no_connection_and_starts_no_thread(switch):
    broker = SilentBroker()  # records every connection attempt
    try:
        env = child_environment(RUBRIX_TELEMETRY_BROKER_URL=f"redis://127.0.0.1:{broker.port}/0", **switch)
        report, _ = run_hook_client(env, count=300)
        assert report["stats"] == {"published": 0, "pending": 0, "dropped": {}}
        assert report["threads"] == 1
        assert report["celery_loaded"] is False
        assert broker.accepted == []
    finally:
        broker.close()


def test_server_with_telemetry_on_does_connect(redis_server, pipeline):
    """The control for the test above: the same client, switched on, reaches the broker."""
    report, _ = run_hook_client(child_environment(), count=30)
    assert report["stats"]["published"] == 30
    assert report["threads"] == 2
    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 30, timeout=20)


@pytest.mark.slow
def test_worker_with_telemetry_off_acknowledges_and_sends_nothing(redis_server, session_dir):
    queue = "telemetry-switched-off"
    sink = Collector().start()
    worker = WorkerProcess(
        child_environment(RUBRIX_ENABLE_TELEMETRY="off", RUBRIX_TELEMETRY_QUEUE=queue,
                          RUBRIX_TELEMETRY_ENDPOINT=sink.url),
        session_dir / "worker-off.log", queue=queue)
    try:
        worker.wait_ready()
        # A server with telemetry on publishes onto the switched-off worker's queue.
        report, _ = run_hook_client(child_environment(RUBRIX_TELEMETRY_QUEUE=queue), count=40)
        assert report["stats"]["published"] == 40
        redis = redis_server.client()
        assert wait_until(lambda: redis.llen(queue) == 0 and "succeeded" in worker.log(), timeout=20)
        assert wait_until(lambda: worker.log().count("succeeded") == 2, timeout=10)  # 40 events, 20 per task
        assert wait_until(lambda: redis.hlen("unacked") == 0, timeout=10)
        assert "switched off by RUBRIX_ENABLE_TELEMETRY" in worker.log()
        assert sink.requests == []
    finally:
        worker.stop()
        sink.stop()
