"""End to end: events per second to the sink, and the delay from hook call to arrival.

A producer child (bench/producer.py) fires the events; ours travel through Redis and the
one worker process, Segment's client posts them itself. Throughput is timed from the
first call in the producer to the arrival of the last event at the sink, so both sides
are timed "until every event has arrived"; the latency of each event is its arrival time
minus the "timestamp" its client stamped when it was fired (same clock, same machine).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from typing import Any

from bench.infra import REPO_ROOT, last_json_line
from bench.producer import WARMUP
from bench.sink import Sink
from bench.stats import p50_p99

# Segment's client stamps "timestamp" to the millisecond, ours to the microsecond.
TIMESTAMP_RESOLUTION = 0.001


def run_producer(which: str, count: int, rate: float, env: dict[str, str], sink: Sink) -> dict[str, Any]:
    """Fires `count` events and waits (bounded) until all reached the sink; what arrived when."""
    sink.reset()
    timeout = 60 + (count / rate if rate else 0)
    done = subprocess.run([sys.executable, "-m", "bench.producer", which, str(count), str(rate), sink.url],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    report = last_json_line(done, f"producer {which}")
    sink.wait_for_count(count + WARMUP, timeout=60)
    # The warm-up events were fired before `started`; only the counted ones are timed.
    arrivals = [(arrived, fired) for arrived, fired in sink.arrivals()
                if fired is not None and fired >= report["started"] - TIMESTAMP_RESOLUTION]
    last = max((arrived for arrived, _ in arrivals), default=report["started"])
    return {"producer": report, "arrivals": arrivals, "delivered": len(arrivals),
            "seconds": max(last - report["started"], 1e-6)}


def measure_throughput(envs: dict[str, dict[str, str]], count: int, repetitions: int, sink: Sink) -> dict[str, Any]:
    """Events per second, ours and Segment's, alternating ABBA so that drift cancels."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in envs}
    names = list(envs)
    for repetition in range(repetitions):
        for name in names if repetition % 2 == 0 else names[::-1]:
            run = run_producer(name, count, 0, envs[name], sink)
            runs[name].append({"events_per_s": run["delivered"] / run["seconds"], "seconds": run["seconds"],
                               "delivered": run["delivered"], "fired": count,
                               "dropped_by_client": run["producer"]["dropped"]})
    rates = {name: statistics.median(r["events_per_s"] for r in results) for name, results in runs.items()}
    return {"e2e_events_per_s": {name: round(rate, 1) for name, rate in rates.items()}, "e2e_runs": runs}


def measure_latency(which: str, rate: float, seconds: float, env: dict[str, str], sink: Sink) -> dict[str, Any]:
    count = max(1, int(rate * seconds))
    run = run_producer(which, count, rate, env, sink)
    delays = [(arrived - fired) * 1000 for arrived, fired in run["arrivals"]]
    return {**{key: round(value, 1) for key, value in p50_p99(delays).items()},
            "events": count, "delivered": run["delivered"], "rate_per_s": rate,
            "started": run["producer"]["started"]}
