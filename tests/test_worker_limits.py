"""Where a worker stops trying: the maximum event age (and its former name), and Segment without a write key."""

from __future__ import annotations

import re

import pytest

from telemetry_ops.collector import Collector
from tests.support import WorkerProcess, child_environment, run_hook_client, status_json, wait_until

pytestmark = pytest.mark.slow


def _retried_until_expired(env: dict[str, str], worker: WorkerProcess, backend: Collector, age: str) -> None:
    worker.wait_ready()
    run_hook_client(env, count=3)
    # Before an attempt, or instead of a retry: whichever comes once they are too old.
    line = re.compile(rf"dropped 3 events (before sending|instead of retrying \(HTTP 503\)): older than {age}s "
                      r"\(RUBRIX_TELEMETRY_MAX_EVENT_AGE\), expired")
    assert wait_until(lambda: line.search(worker.log()), timeout=30), worker.log()
    attempts = len(backend.requests)
    assert attempts >= 1
    assert not backend.wait_for(lambda b: len(b.requests) > attempts, timeout=2)
    assert wait_until(lambda: status_json(**env)[1]["counts"]["dropped"].get("expired") == 3, timeout=10)


def test_events_are_dropped_as_expired_once_older_than_the_maximum_age(redis_server, session_dir):
    queue = "telemetry-give-up"
    backend = Collector(responder=lambda path, body: (503, {})).start()
    env = child_environment(RUBRIX_TELEMETRY_QUEUE=queue, RUBRIX_TELEMETRY_ENDPOINT=backend.url,
                            RUBRIX_TELEMETRY_MAX_EVENT_AGE="1.5", RUBRIX_TELEMETRY_BACKOFF_BASE="0.2",
                            RUBRIX_TELEMETRY_BACKOFF_MAX="0.5")
    redis_server.client().delete("rubrix-telemetry:counts")
    worker = WorkerProcess(env, session_dir / "worker-give-up.log", queue=queue)
    try:
        _retried_until_expired(env, worker, backend, "1.5")
        assert "deprecated" not in worker.log()
    finally:
        worker.stop()
        backend.stop()


def test_the_former_max_retry_duration_is_read_with_one_warning(redis_server, session_dir):
    queue = "telemetry-give-up-alias"
    backend = Collector(responder=lambda path, body: (503, {})).start()
    env = child_environment(RUBRIX_TELEMETRY_QUEUE=queue, RUBRIX_TELEMETRY_ENDPOINT=backend.url,
                            RUBRIX_TELEMETRY_MAX_EVENT_AGE=None, RUBRIX_TELEMETRY_MAX_RETRY_DURATION="1.5",
                            RUBRIX_TELEMETRY_BACKOFF_BASE="0.2", RUBRIX_TELEMETRY_BACKOFF_MAX="0.5")
    redis_server.client().delete("rubrix-telemetry:counts")
    worker = WorkerProcess(env, session_dir / "worker-give-up-alias.log", queue=queue)
    try:
        _retried_until_expired(env, worker, backend, "1.5")
        assert worker.log().count("RUBRIX_TELEMETRY_MAX_RETRY_DURATION is deprecated: set "
                                  "RUBRIX_TELEMETRY_MAX_EVENT_AGE") == 1, worker.log()
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
