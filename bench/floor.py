"""The floor: the least a server could do to hand events to a broker, written plainly.

A hook appends a tuple of the event's raw values to a deque; one thread wakes every flush
interval, JSON-encodes up to 500 of them as one list and LPUSHes it to Redis with redis-py.
No checking, no ids, no Celery: the CPU cost any real hand-off pays at least. `bench/
server_cpu.py` measures ours against it.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from typing import Any

BATCH = 500


class FloorPublisher:
    def __init__(self, redis_url: str, queue: str, flush_interval: float = 0.2) -> None:
        import redis

        self._client = redis.Redis.from_url(redis_url)
        self._queue = queue
        self._interval = flush_interval
        self._buffer: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._busy = False  # between taking events off the buffer and Redis having them
        self._thread = threading.Thread(target=self._run, name="floor-publisher", daemon=True)
        self._thread.start()

    def append(self, event: tuple[Any, ...]) -> None:
        self._buffer.append(event)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            self._busy = True
            while self._buffer:
                take = min(BATCH, len(self._buffer))
                batch = [self._buffer.popleft() for _ in range(take)]
                self._client.lpush(self._queue, json.dumps(batch))
            self._busy = False
            self._idle.set()

    def flush(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while (self._buffer or self._busy) and time.monotonic() < deadline:
            self._idle.clear()
            self._wake.set()
            self._idle.wait(0.05)
        return not (self._buffer or self._busy)
