"""With no broker URL, an on-disk queue carries events from a server to a worker: no Redis needed."""

from __future__ import annotations

import pytest

from tasks.collector import Collector
from tests.support import WorkerProcess, child_environment, run_hook_client


@pytest.mark.slow
def test_embedded_default_broker_carries_events_between_processes(tmp_path):
    sink = Collector().start()
    env = child_environment(RUBRIX_TELEMETRY_BROKER_URL=None, RUBRIX_TELEMETRY_DATA_DIR=str(tmp_path / "data"),
                            RUBRIX_TELEMETRY_ENDPOINT=sink.url)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        assert "embedded://" in worker.log()
        report, _ = run_hook_client(env, count=12)
        assert report["flushed"] and report["stats"]["published"] == 12
        assert sink.wait_for(lambda s: len(s.accepted_messages()) >= 12, timeout=30), worker.log()
        events = sorted(m["event"] for m in sink.accepted_messages())
        assert events == ["LogRecordsRequested"] * 4 + ["ServerErrorFound"] * 4 + ["UserInfoRequested"] * 4
        assert (tmp_path / "data" / "broker" / "queue").is_dir()
    finally:
        worker.stop()
        sink.stop()
