"""One server process of the soak: fires `track_bulk` at a steady rate through the real hooks.

    python -m bench.soak_server INDEX RATE SECONDS

Each event is told apart by its `records` value, INDEX * RECORDS_STRIDE + n (n = 0, 1, ...),
so the soak can say which events reached the sink, whatever their messageId. The events
go through the hook, the buffer and the publisher thread exactly as in a server, to the
broker in the environment. After the last event the process hands over what it buffered
(bounded wait) and prints one JSON line: how many it fired and over how long, the
publisher's counts (`rubrix_hooks.stats()`) and the CPU time it used.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time

from bench.payload import TASK
from bench.producer import FLUSH_TIMEOUT, fire

# Far above any count a soak fires per server: the records values of two servers never meet.
RECORDS_STRIDE = 10**9


def event_of(records: int) -> tuple[int, int]:
    """(server index, n) of the event a server fired with this `records` value."""
    return divmod(records, RECORDS_STRIDE)


def main(argv: list[str]) -> int:
    from rubrix_hooks.telemetry import flush, stats, track_bulk

    index, rate, seconds = int(argv[0]), float(argv[1]), float(argv[2])
    count = int(rate * seconds)
    records = itertools.count(index * RECORDS_STRIDE)

    async def hook() -> None:
        await track_bulk(TASK, next(records))

    # `fire` paces the calls on the clock and catches up when it falls behind, so on a
    # starved machine it takes longer than `seconds`: the report says how long it took.
    started = asyncio.run(fire(count, rate, hook))
    elapsed = time.time() - started
    flushed = flush(FLUSH_TIMEOUT)
    print(json.dumps({"index": index, "fired": count, "started": started, "elapsed": elapsed,
                      "flushed": flushed, "stats": stats(), "cpu_s": time.process_time()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
