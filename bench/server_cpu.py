"""What telemetry adds to a server's CPU per event: ours, Segment's client, and the floor.

    python -m bench.server_cpu VARIANT RATE SECONDS SINK_URL REDIS_URL QUEUE    (one child)

A child process is a server in miniature: an asyncio loop that fires `LogRecordsRequested`
at RATE events per second, paced like requests, for SECONDS. It measures the CPU time of
the whole process (every thread: the hook, the publisher or consumer thread, the encoding
and the socket writes) from the first event until everything it fired has left the process,
and prints it per event. VARIANT is
- off: `track_bulk` with telemetry switched off (the loop's own cost, subtracted from the rest);
- ours: `track_bulk` with its publisher thread handing Celery task messages to Redis;
- segment: segment-analytics-python's `Client.track()` (what Rubrix 0.18 ran), posting to the sink;
- floor: `bench/floor.py`, a deque of tuples and a thread that JSON-encodes and LPUSHes them.

`measure()` runs every variant once per round, in a rotating order, each in a fresh child,
and reports per variant the median over rounds of (its CPU - off's CPU of the same round).
"""

from __future__ import annotations

import asyncio
import os
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Awaitable, Callable

from bench.payload import RECORDS, TASK, segment_client, segment_track

VARIANTS = tuple(os.environ.get("BENCH_CPU_VARIANTS", "off,ours,segment,floor").split(","))
WARMUP_EVENTS = 500

Hook = Callable[[], Awaitable[None]]


async def fire(count: int, rate: float, hook: Hook) -> None:
    began = time.perf_counter()
    for i in range(count):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await hook()


def make_variant(variant: str, sink_url: str, redis_url: str, queue: str) -> tuple[Hook, Callable[[], Any]]:
    """The hook a request calls, and the drain that waits until its events have left the process."""
    if variant in ("off", "ours"):
        from rubrix_hooks.telemetry import flush, track_bulk

        async def ours() -> None:
            await track_bulk(TASK, RECORDS)

        return ours, lambda: flush(60)
    if variant == "segment":
        client = segment_client(sink_url, max_queue_size=100_000)

        async def segment() -> None:
            segment_track(client)

        return segment, client.flush
    if variant == "floor":
        from bench.floor import FloorPublisher
        from telemetry_core.contract import LOG_RECORDS_REQUESTED

        floor = FloorPublisher(redis_url, queue)

        async def floor_hook() -> None:
            floor.append((LOG_RECORDS_REQUESTED, time.time(), TASK, RECORDS))

        return floor_hook, floor.flush
    raise SystemExit(f"unknown variant {variant!r}")


def run_child(variant: str, rate: float, seconds: float, sink_url: str, redis_url: str, queue: str) -> dict[str, Any]:
    hook, drain = make_variant(variant, sink_url, redis_url, queue)
    # First events pay for imports, threads and connections once; a running server has paid.
    asyncio.run(fire(WARMUP_EVENTS, rate, hook))
    drain()
    count = int(rate * seconds)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    asyncio.run(fire(count, rate, hook))
    drained = drain()
    cpu, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
    return {"variant": variant, "events": count, "cpu_s": cpu, "wall_s": wall,
            "cpu_us_per_event": cpu / count * 1e6, "drained": drained is not False}


def measure(rounds: int, rate: float, seconds: float, sink_url: str, redis_url: str, queue: str,
            env_for: Callable[[str], dict[str, str]], cwd: str) -> dict[str, Any]:
    """Every variant once per round, rotating the order; the median added CPU per event."""
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    added: dict[str, list[float]] = {variant: [] for variant in VARIANTS if variant != "off"}
    for round_number in range(rounds):
        order = VARIANTS[round_number % len(VARIANTS):] + VARIANTS[:round_number % len(VARIANTS)]
        this_round = {}
        for variant in order:
            done = subprocess.run([sys.executable, "-m", "bench.server_cpu", variant, str(rate), str(seconds),
                                   sink_url, redis_url, queue], cwd=cwd, env=env_for(variant),
                                  capture_output=True, text=True, timeout=seconds * 10 + 120)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"server_cpu {variant} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
            result = json.loads(lines[-1])
            if not result["drained"]:
                raise RuntimeError(f"server_cpu {variant}: events did not leave the process")
            runs[variant].append(result)
            this_round[variant] = result["cpu_us_per_event"]
        for variant in added:
            added[variant].append(this_round[variant] - this_round["off"])
    summary = {"off": round(statistics.median(r["cpu_us_per_event"] for r in runs["off"]), 2)}
    summary.update({variant: round(statistics.median(values), 2) for variant, values in added.items()})
    return {"us_per_event": summary, "rounds": rounds, "rate": rate, "seconds": seconds,
            "runs_us_per_event": {variant: [round(r["cpu_us_per_event"], 2) for r in results]
                                  for variant, results in runs.items()}}


def main(argv: list[str]) -> int:
    variant, rate, seconds, sink_url, redis_url, queue = argv[0], float(argv[1]), float(argv[2]), *argv[3:6]
    print(json.dumps(run_child(variant, rate, seconds, sink_url, redis_url, queue)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
