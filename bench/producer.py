"""A server-like child process that fires `LogRecordsRequested` events, ours or Segment's.

    python -m bench.producer {ours,segment} COUNT RATE SINK_URL

RATE is events per second (0: as fast as possible). Ours calls the real hook,
`rubrix_hooks.telemetry.track_bulk`, configured by the environment; Segment's is
segment-analytics-python's `Client.track()` posting straight to the sink. Each client
first sends WARMUP events and flushes them (a server's first event pays for imports and
connections once; "sustained" excludes that), then fires COUNT, waits until everything
it buffered has left the process, and prints one JSON line: when the first counted event
was fired (epoch seconds) and what the client dropped.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, Awaitable, Callable

from bench.payload import RECORDS, TASK, segment_client, segment_track

FLUSH_TIMEOUT = 60.0
WARMUP = 20


async def fire(count: int, rate: float, hook: Callable[[], Awaitable[None]]) -> float:
    """Calls `hook` `count` times, paced at `rate` per second; returns the epoch of the first call."""
    started = time.time()
    began = time.perf_counter()
    for i in range(count):
        if rate:
            delay = began + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await hook()
    return started


def run_ours(count: int, rate: float) -> dict[str, Any]:
    from rubrix_hooks.telemetry import flush, stats, track_bulk

    async def hook() -> None:
        await track_bulk(TASK, RECORDS)

    asyncio.run(fire(WARMUP, 0, hook))
    flush(FLUSH_TIMEOUT)
    started = asyncio.run(fire(count, rate, hook))
    flushed = flush(FLUSH_TIMEOUT)
    counts = stats()
    return {"started": started, "flushed": flushed, "dropped": sum(counts["dropped"].values()), "stats": counts}


def run_segment(count: int, rate: float, sink_url: str) -> dict[str, Any]:
    client = segment_client(sink_url, max_queue_size=max(count, 10_000))
    failures = 0

    async def hook() -> None:
        nonlocal failures
        queued, _ = segment_track(client)
        failures += not queued

    asyncio.run(fire(WARMUP, 0, hook))
    client.flush()  # blocks until the consumer has emptied the queue
    started = asyncio.run(fire(count, rate, hook))
    client.flush()
    client.shutdown()
    return {"started": started, "flushed": True, "dropped": failures}


def main(argv: list[str]) -> int:
    which, count, rate, sink_url = argv[0], int(argv[1]), float(argv[2]), argv[3]
    report = run_ours(count, rate) if which == "ours" else run_segment(count, rate, sink_url)
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
