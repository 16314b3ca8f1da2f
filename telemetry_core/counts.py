"""The delivery counts' fields, and the JSON file that holds them where the broker keeps none.

Fields: `delivered`, `retried` (events scheduled for another attempt) and `dropped:<reason>`.
Where they live is the broker's to say (`Broker.counts_store`): a Redis hash, the embedded
queue's data folder, or, on a broker that stores no values, each worker's own data folder.
The workers write them (`tasks/counters.py`); `status` reads them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

from telemetry_core.json_files import locked, write_json_atomically

log = logging.getLogger("telemetry_core.counts")

FILE_NAME = "counts.json"
DELIVERED = "delivered"
RETRIED = "retried"
DROPPED_PREFIX = "dropped:"
BROKEN_SUFFIX = ".broken-"
# A "name": integer pair that is whole (a comma or the closing brace follows it): what a
# counts file cut short by a crash still holds for sure.
_WHOLE_PAIR = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:\s*(\d+)\s*(?=[,}])')


class CountsUnavailable(Exception):
    """The counts cannot be read (broker down, or a broker that keeps none)."""


def increments(delivered: int, retried: int, dropped: Mapping[str, int]) -> dict[str, int]:
    fields = {DELIVERED: delivered, RETRIED: retried}
    fields.update({DROPPED_PREFIX + reason: n for reason, n in dropped.items()})
    return {name: n for name, n in fields.items() if n > 0}


def _parsed_counts(text: str) -> dict[str, int] | None:
    """The counts in `text`, or None when it is not a JSON object of non-negative integers."""
    if not text.strip():
        return {}
    try:
        counts = json.loads(text)
    except ValueError:
        return None
    if not isinstance(counts, dict) or not all(isinstance(n, int) and n >= 0 for n in counts.values()):
        return None
    return counts


def _read_counts_file(path: Path) -> dict[str, int] | None:
    """The counts in `path` ({} when there is none yet), or None when the file is broken."""
    try:
        return _parsed_counts(path.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        return {}


def _unescaped(name: str) -> str:
    try:
        return json.loads(f'"{name}"')
    except ValueError:
        return name


def _set_aside_broken(path: Path) -> dict[str, int]:
    """Moves a broken counts file aside (kept for a look, never read again) and answers the
    counts it still holds whole. Called with the writers' lock held."""
    text = path.read_text(encoding="utf-8", errors="replace")
    aside = path.with_name(f"{path.name}{BROKEN_SUFFIX}{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    kept = {_unescaped(name): int(n) for name, n in _WHOLE_PAIR.findall(text)}
    log.warning("telemetry: %s is broken (not a JSON object of counts, as a crash mid-write leaves it): "
                "moved to %s; counting goes on from the %d counts it still held whole: %s",
                path, aside.name, len(kept), kept)
    return kept


class FileCounts:
    """The counts in a JSON file shared by several processes, replaced whole at each write
    (`json_files`); a broken one (from a crash before this release) is set aside, and counting
    starts again from what it still held."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / FILE_NAME

    def add(self, increments: Mapping[str, int]) -> None:
        self._update(increments)

    def read(self) -> dict[str, int]:
        return self._update({})

    def _update(self, increments: Mapping[str, int]) -> dict[str, int]:
        """Adds `increments` to the counts (none: only reads) and answers them."""
        path = self.path
        counts = _read_counts_file(path)
        if counts is not None and not increments:
            return counts  # a whole file, since every write is a rename: no lock needed to read it
        with locked(path):
            counts = _read_counts_file(path)
            if counts is None:
                counts = _set_aside_broken(path)  # and written back below, repaired
            elif not increments:
                return counts
            for name, n in increments.items():
                counts[name] = counts.get(name, 0) + n
            write_json_atomically(path, counts)
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


# The `reason` label of `rubrix_telemetry_events_dropped_total` (telemetry_ops/metrics.py):
# a small fixed set, because every distinct label value is a time series Prometheus keeps for
# good, and the reasons counted are free text (`HTTP 400`, `invalid: <rule>`, ...).
DROP_REASON_LABELS = (
    "refused",  # the backend answered a 4xx other than 429 (`HTTP 400`): the events were dropped
    "invalid",  # an event broke the contract (`invalid: <rule>`, `not a list of events`)
    "rejected",  # a task message no worker can read (`rejected message (X)`, `unknown message format N`)
    "too_large",  # `message over 32 KB`
    "expired",  # undeliverable for RUBRIX_TELEMETRY_MAX_EVENT_AGE (`gave up after Ns (...)`, `expired`)
    "backlog",  # the broker held RUBRIX_TELEMETRY_MAX_BACKLOG events already (the server's)
    "buffer_full",  # a server's buffer was full: the broker did not take events fast enough
    "shutdown_timeout",  # a server exited before it could hand its buffer over
    "telemetry_off",  # a worker switched off acknowledged the events (`telemetry off (VAR)`)
    "no_write_key",  # `RUBRIX_TELEMETRY_KEY not set` on a worker delivering to Segment
    "error",  # an unexpected error (`unexpected error (X)`, the server's `hook_error`)
    "other",  # any reason this release does not know
)
_EXACT_REASONS = {
    "not a list of events": "invalid",
    "message over 32 KB": "too_large",
    "RUBRIX_TELEMETRY_KEY not set": "no_write_key",
    "buffer_full": "buffer_full",
    "shutdown_timeout": "shutdown_timeout",
    "hook_error": "error",
}
_REASON_PATTERNS = (  # tried in order: the first that matches names the label
    (re.compile(r"HTTP 4\d\d"), "refused"),
    (re.compile(r"invalid(?: in the server)?: "), "invalid"),
    (re.compile(r"rejected message \(|unknown message format "), "rejected"),
    (re.compile(r"gave up after |.*expired"), "expired"),
    (re.compile(r".*backlog"), "backlog"),
    (re.compile(r"telemetry off \("), "telemetry_off"),
    (re.compile(r"unexpected error \("), "error"),
)


def drop_reason_label(reason: str) -> str:
    """The label in DROP_REASON_LABELS for a drop reason as the counts name it; `other` for a
    reason this release does not know (one from a newer worker, say)."""
    if reason in _EXACT_REASONS:
        return _EXACT_REASONS[reason]
    for pattern, label in _REASON_PATTERNS:
        if pattern.match(reason):
            return label
    return "other"
