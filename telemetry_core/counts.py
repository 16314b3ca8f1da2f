"""The delivery counts' fields, and the JSON file that holds them where the broker keeps none.

Fields: `delivered`, `retried` (events scheduled for another attempt) and `dropped:<reason>`.
Where they live is the broker's to say (`Broker.counts_store`): a Redis hash, the embedded
queue's data folder, or, on a broker that stores no values, each worker's own data folder.
The workers write them (`tasks/counters.py`); `status` reads them.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Mapping

FILE_NAME = "counts.json"
DELIVERED = "delivered"
RETRIED = "retried"
DROPPED_PREFIX = "dropped:"


class CountsUnavailable(Exception):
    """The counts cannot be read (broker down, or a broker that keeps none)."""


def increments(delivered: int, retried: int, dropped: Mapping[str, int]) -> dict[str, int]:
    fields = {DELIVERED: delivered, RETRIED: retried}
    fields.update({DROPPED_PREFIX + reason: n for reason, n in dropped.items()})
    return {name: n for name, n in fields.items() if n > 0}


class FileCounts:
    """The counts in a JSON file, updated under an exclusive `flock` (several processes share it)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / FILE_NAME

    def add(self, increments: Mapping[str, int]) -> None:
        self._update(increments)

    def read(self) -> dict[str, int]:
        return self._update({})

    def _update(self, increments: Mapping[str, int]) -> dict[str, int]:
        """Adds `increments` to the counts in the file (none: only reads) under an exclusive lock."""
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+", encoding="utf-8") as file:
            fcntl.flock(file, fcntl.LOCK_EX)  # released when the file is closed
            text = file.read()
            counts: dict[str, int] = json.loads(text) if text.strip() else {}
            if increments:
                for name, n in increments.items():
                    counts[name] = counts.get(name, 0) + n
                file.seek(0)
                file.truncate()
                file.write(json.dumps(counts, sort_keys=True))
            return counts


def as_counts(raw: Mapping[Any, Any]) -> dict[str, Any]:
    """`{"delivered": n, "retried": n, "dropped": {reason: n}}` from a store's fields."""
    # A Redis client answers bytes.
    raw = {(name.decode() if isinstance(name, bytes) else name): int(n) for name, n in raw.items()}
    counts: dict[str, Any] = {DELIVERED: raw.get(DELIVERED, 0), RETRIED: raw.get(RETRIED, 0), "dropped": {}}
    for name, n in sorted(raw.items()):
        if name.startswith(DROPPED_PREFIX):
            counts["dropped"][name[len(DROPPED_PREFIX):]] = n
    return counts


def add_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several workers' counts (as `as_counts` shapes them)."""
    total: dict[str, Any] = {DELIVERED: 0, RETRIED: 0, "dropped": {}}
    for part in parts:
        total[DELIVERED] += int(part.get(DELIVERED, 0))
        total[RETRIED] += int(part.get(RETRIED, 0))
        for reason, n in part.get("dropped", {}).items():
            total["dropped"][reason] = total["dropped"].get(reason, 0) + int(n)
    return total
