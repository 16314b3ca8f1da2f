"""Where a worker stops trying: the maximum retry duration, and Segment without a write key."""

from __future__ import annotations

import pytest

from telemetry_ops.collector import Collector
from tests.support import WorkerProcess, child_environment, run_hook_client, wait_until

pytestmark = pytest.mark.slow


def test_events_are_dropped_and_logged_after_the_maximum_retry_duration(redis_server, session_dir):
    queue = "telemetry-give-up"
    backend = Collector(responder=lambda path, body: (503, {})).start()
    env = child_environment(RUBRIX_TELEMETRY_QUEUE=queue, RUBRIX_TELEMETRY_ENDPOINT=backend.url,
                            RUBRIX_TELEMETRY_MAX_EVENT_AGE="1.5", RUBRIX_TELEMETRY_BACKOFF_BASE="0.2",
                            RUBRIX_TELEMETRY_BACKOFF_MAX="0.5")
    worker = WorkerProcess(env, session_dir / "worker-give-up.log", queue=queue)
    try:
        worker.wait_ready()
        run_hook_client(env, count=3)
        assert wait_until(lambda: "for longer than 1.5s" in worker.log(), timeout=30), worker.log()
        attempts = len(backend.requests)
        assert attempts >= 3  # it did retry, several times, before giving up
        assert "dropped 3 events: the backend failed (HTTP 503)" in worker.log()
        assert not backend.wait_for(lambda b: len(b.requests) > attempts, timeout=2)
    finally:
        worker.stop()
        backend.stop()


def test_segment_without_a_write_key_is_refused_not_attempted(redis_server, session_dir):
    queue = "telemetry-no-key"
    env = child_environment(RUBRIX_TELEMETRY_QUEUE=queue, RUBRIX_TELEMETRY_ENDPOINT="https://api.segment.io",
                            RUBRIX_TELEMETRY_KEY=None)
    worker = WorkerProcess(env, session_dir / "worker-no-key.log", queue=queue)
    try:
        worker.wait_ready()
        assert "RUBRIX_TELEMETRY_KEY is not set" in worker.log()
        run_hook_client(env, count=2)
        # Succeeds at once with the reason; a delivery attempt (no network here) would retry instead.
        assert wait_until(lambda: "'RUBRIX_TELEMETRY_KEY not set': 2" in worker.log(), timeout=20), worker.log()
        assert "retry" not in worker.log().lower()
    finally:
        worker.stop()
