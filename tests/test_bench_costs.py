"""`python -m bench.costs --quick` (issue 22's benchmark of costs as a function of what waits)
runs end to end on the embedded queue and writes every figure it promises.

Speed is not judged here (the machine is shared and noisy): only that each measurement ran,
saw the backlog it built, and produced a positive number. docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# A drain of 2,000 messages and two workers' start-ups: about 40 s on 2 shared cores.
pytestmark = [pytest.mark.slow, pytest.mark.load]

CHECK_FIGURES = ("wall_ms_p50", "wall_ms_p99", "cpu_ms_p50", "cpu_ms_p99")


@pytest.fixture(scope="module")
def quick_costs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("segment.analytics", reason="the benchmark needs segment-analytics-python: "
                                                    "pip install -e '.[bench]'")
    out = tmp_path_factory.mktemp("costs") / "costs.json"
    done = subprocess.run([sys.executable, "-m", "bench.costs", "--quick", "--brokers", "embedded", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| drain 2,000 one-event messages" in done.stdout  # the table was printed
    return json.loads(out.read_text())


def test_the_check_is_timed_at_each_level_with_the_backlog_it_built(quick_costs: dict) -> None:
    embedded = quick_costs["brokers"]["embedded"]
    levels = quick_costs["plan"]["levels"]
    assert len(levels) >= 2
    for level in levels:
        for settings in ("default_settings", "events_per_task_1"):
            check = embedded["check"][str(level)][settings]
            assert check["checks"] >= quick_costs["plan"]["least_checks"]
            assert all(check[key] > 0 for key in CHECK_FIGURES), check
            # Every waiting message carries one event, and the embedded queue counts them exactly.
            assert check["backlog_seen"] == level
        assert embedded["bytes_per_event"][str(level)]["file_bytes"] > 0


def test_the_drain_and_the_quiet_server_reach_the_sink(quick_costs: dict) -> None:
    embedded = quick_costs["brokers"]["embedded"]
    drain = embedded["drain"]
    assert drain["delivered"] == drain["messages"] == 2000
    assert drain["drained"] and drain["seconds_from_worker_start"] > 0
    assert drain["posts"] > 0 and drain["events_per_post"] >= 1
    quiet = embedded["quiet"]
    assert quiet["delivered"] == quiet["events"] > 0
    assert 0 < quiet["p50_ms"] <= quiet["p99_ms"] and quiet["events_per_post"] >= 1
    assert embedded["fill_ms_per_message"] > 0


def test_segment_s_client_is_measured_beside_it(quick_costs: dict) -> None:
    segment = quick_costs["segment"]
    assert segment["upload_size"] == 100
    assert 0 < segment["quiet"]["p50_ms"] <= segment["quiet"]["p99_ms"]
    assert segment["quiet"]["events_per_post"] >= 1
    assert segment["bytes_per_queued_event"] > 0


def test_the_run_notes_the_machine_s_load(quick_costs: dict) -> None:
    assert quick_costs["quick"] is True
    assert len(quick_costs["load_average_start"]) == 3 and len(quick_costs["load_average_end"]) == 3
    assert quick_costs["machine"]["cores"] > 0


def test_an_unknown_broker_is_one_line_not_a_traceback() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.costs", "--quick", "--brokers", "embedded,kafka"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "kafka" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
