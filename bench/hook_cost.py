"""What one `track_bulk` costs the server, in-process: ours against the alternatives.

    python -m bench.hook_cost CALLS REPETITIONS SINK_URL BROKER_URL QUEUE

Runs in a child whose environment switches telemetry on with the bench's Redis as broker.
In one process and one event loop, in interleaved blocks (so drift and noise hit all
alike), it times each call of:
- ours: `await rubrix_hooks.telemetry.track_bulk(...)` (its publisher thread running);
- segment: segment-analytics-python's `Client.track()` posting to the local sink (its
  consumer thread running), and, as an extra, the same with `send=False`;
- apply_async: a direct Celery `send_task` of the same event to Redis, on the request path.
Prints one JSON line: per client, the medians over repetitions of p50 and p99 in µs.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from typing import Any, Awaitable, Callable

from bench.payload import PROPERTIES, RECORDS, TASK, segment_client, segment_track
from bench.stats import median_of, p50_p99

# Calls per block: a direct publish costs ~100x a buffered hook, so it gets fewer.
BLOCK = {"ours": 50, "segment": 50, "segment_send_false": 50, "apply_async": 5}
WARMUP_BLOCKS = 4

Call = Callable[[], Awaitable[Any]]


def clients(sink_url: str, broker_url: str, queue: str) -> dict[str, Call]:
    from celery import Celery

    from telemetry_core import message
    from telemetry_core.contract import (DELIVER_TASK_NAME, LOG_RECORDS_REQUESTED, checked_wire_event,
                                       new_message_id_prefix, timestamp_us)
    from telemetry_core.platform_info import platform_info
    from rubrix_hooks.telemetry import track_bulk

    segment = segment_client(sink_url)
    segment_off = segment_client(None)
    celery = Celery("bench-direct", broker=broker_url, set_as_current=False)
    celery.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)

    async def ours() -> None:
        await track_bulk(TASK, RECORDS)

    async def segment_track_call() -> None:
        segment_track(segment)

    async def segment_send_false() -> None:
        segment_track(segment_off)

    prefix = new_message_id_prefix()

    async def apply_async() -> None:
        # One event, checked and encoded as the publisher thread does, published on the request path.
        event = checked_wire_event((LOG_RECORDS_REQUESTED, timestamp_us(), *PROPERTIES.values()), 0)
        celery.send_task(DELIVER_TASK_NAME, kwargs=message.encode(platform_info(), prefix, [event]), queue=queue)

    return {"ours": ours, "segment": segment_track_call, "segment_send_false": segment_send_false,
            "apply_async": apply_async}


async def time_blocks(calls: dict[str, Call], blocks: int, shift: int) -> dict[str, list[float]]:
    """Each call's durations in µs, the clients taking turns block by block."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    for block in range(blocks):
        offset = (block + shift) % len(names)
        for name in names[offset:] + names[:offset]:
            call, out = calls[name], samples[name]
            for _ in range(BLOCK[name]):
                started = clock()
                await call()
                out.append((clock() - started) / 1000)
        # Let the publisher and consumer threads run between blocks, as between requests.
        await asyncio.sleep(0)
    return samples


async def measure(calls_per_client: int, repetitions: int, calls: dict[str, Call]) -> dict[str, Any]:
    blocks = max(1, calls_per_client // BLOCK["ours"])
    await time_blocks(calls, WARMUP_BLOCKS, 0)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in calls}
    for repetition in range(repetitions):
        gc.collect()
        samples = await time_blocks(calls, blocks, repetition)
        for name, values in samples.items():
            runs[name].append(p50_p99(values))
        await asyncio.sleep(0.3)  # let the buffers drain to Redis and the sink
    return {name: median_of(results) for name, results in runs.items()}


def main(argv: list[str]) -> int:
    calls_per_client, repetitions, sink_url, broker_url, queue = int(argv[0]), int(argv[1]), *argv[2:5]
    from rubrix_hooks.telemetry import flush, stats

    result = asyncio.run(measure(calls_per_client, repetitions, clients(sink_url, broker_url, queue)))
    flush(10)
    result["ours_stats"] = stats()
    result["calls_per_repetition"] = {name: max(1, calls_per_client // BLOCK["ours"]) * size
                                      for name, size in BLOCK.items()}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
