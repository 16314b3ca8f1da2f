"""The switch, every spelling, shown on the wire: what a server does and does not do.

RUBRIX_ENABLE_TELEMETRY takes every value pydantic's bool took for Rubrix 0.18, in any case
and with spaces around; DO_NOT_TRACK any true spelling. A value that is neither true nor
false switches telemetry OFF, with one error line naming the variable.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from telemetry_ops.collector import Collector
from tests.support import REPO_ROOT, SilentBroker, WorkerProcess, child_environment, run_hook_client, wait_until

FALSE_SPELLINGS = ["0", "false", "f", "no", "n", "off", "FALSE", "F", " No ", "oFF", "N"]
TRUE_SPELLINGS = ["1", "true", "t", "yes", "y", "on", "TRUE", "T", " Yes ", "ON", "Y"]
NOT_A_BOOL = ["disabled", "maybe", "2", "nope", "-"]

# (environment, the variable named in the error line or None when the value is understood)
OFF_SWITCHES = (
    [({"RUBRIX_ENABLE_TELEMETRY": value}, None) for value in FALSE_SPELLINGS]
    + [({"DO_NOT_TRACK": value}, None) for value in TRUE_SPELLINGS]
    + [({"RUBRIX_ENABLE_TELEMETRY": value}, "RUBRIX_ENABLE_TELEMETRY") for value in NOT_A_BOOL]
    + [({"DO_NOT_TRACK": value}, "DO_NOT_TRACK") for value in NOT_A_BOOL[:2]]
    # An opt-out wins over an opt-in, and a garbled opt-out is still off.
    + [({"RUBRIX_ENABLE_TELEMETRY": "1", "DO_NOT_TRACK": "yes"}, None),
       ({"RUBRIX_ENABLE_TELEMETRY": "1", "DO_NOT_TRACK": "maybe"}, "DO_NOT_TRACK")]
)


@pytest.mark.parametrize("switch, named", OFF_SWITCHES, ids=lambda s: repr(s) if isinstance(s, dict) else str(s))
def test_server_with_telemetry_off_opens_no_connection_and_starts_no_thread(switch, named):
    broker = SilentBroker()  # records every connection attempt
    try:
        env = child_environment(**{"RUBRIX_TELEMETRY_BROKER_URL": f"redis://127.0.0.1:{broker.port}/0",
                                   "DO_NOT_TRACK": None, **switch})
        report, _ = run_hook_client(env, count=300)
        assert report["stats"] == {"published": 0, "pending": 0, "dropped": {}}
        assert report["threads"] == 1
        assert report["celery_loaded"] is False
        assert broker.accepted == []
        errors = [line for line in report["stderr"].splitlines() if "neither true nor false" in line]
        if named:
            assert len(errors) == 1 and named in errors[0] and "OFF" in errors[0], report["stderr"]
        else:
            assert errors == [], report["stderr"]
    finally:
        broker.close()


@pytest.mark.parametrize("value", TRUE_SPELLINGS)
def test_server_with_telemetry_on_does_connect(redis_server, pipeline, value):
    """The control for the test above: the same client, switched on, reaches the broker."""
    report, _ = run_hook_client(child_environment(RUBRIX_ENABLE_TELEMETRY=value, DO_NOT_TRACK=None), count=3)
    assert report["stats"]["published"] == 3
    assert report["threads"] == 2
    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 3, timeout=20)


@pytest.mark.parametrize("command", ["preview", "status"])
@pytest.mark.parametrize("switch", [{"RUBRIX_ENABLE_TELEMETRY": "disabled"}, {"DO_NOT_TRACK": "sure"}])
def test_preview_and_status_refuse_a_switch_they_cannot_read_in_one_line(command, switch):
    done = subprocess.run([sys.executable, "-m", "telemetry_ops.cli", command], cwd=REPO_ROOT,
                          env=child_environment(**switch), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and next(iter(switch)) in lines[0] and "Traceback" not in done.stderr


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
