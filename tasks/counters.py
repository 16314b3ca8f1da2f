"""Delivery counts kept in the broker, so that every worker and `rubrix-telemetry status`
see the same numbers.

Fields: `delivered`, `retried` (events scheduled for another attempt) and
`dropped:<reason>`. On Redis they are one hash (HINCRBY is atomic across workers); on the
embedded on-disk broker, a small JSON file in the data folder under an exclusive `flock`.
A broker that stores no values (RabbitMQ) gets the same file in each worker's data folder,
and each worker reports its own in its answer to `rubrix-telemetry status`, which adds them
up (`tasks/remote_status.py`). Counting is bookkeeping: it never makes a task fail.

A count the broker cannot take (it is down, or failing over to a Sentinel replica) is kept
in the process and added with the next one, or by a timer within seconds of the broker
answering again; a worker stopping tries once more and logs what it could not write.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from rubrix_hooks.settings import Settings
from tasks.broker_redis import BrokerRedis, uses_redis

log = logging.getLogger("tasks.counters")

REDIS_KEY = "rubrix-telemetry:counts"
FILE_NAME = "counts.json"
DELIVERED = "delivered"
RETRIED = "retried"
DROPPED_PREFIX = "dropped:"

RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0

_clients: dict[tuple[int, str], BrokerRedis] = {}

# Increments this process has not written yet. The lock also keeps one writer at a time (a
# task and the retry timer), so that no increment is written twice or lost between them.
_unwritten: Counter[str] = Counter()
_unwritten_lock = threading.Lock()
_retry_timer: threading.Timer | None = None
_retry_delay = RETRY_FIRST_SECONDS


def _forget_parent_increments() -> None:
    # A forked pool child starts with none of its parent's: the parent writes its own.
    global _unwritten_lock, _retry_timer, _retry_delay
    _unwritten.clear()
    _unwritten_lock = threading.Lock()
    _retry_timer, _retry_delay = None, RETRY_FIRST_SECONDS


os.register_at_fork(after_in_child=_forget_parent_increments)


class CountsUnavailable(Exception):
    """The counts cannot be read (broker down, or a broker that keeps none)."""


def _worker_client(settings: Settings) -> Any:
    # One client (and connection pool) per process: never shared across a fork. It
    # reconnects by itself (on Sentinel, to whichever node is the master now).
    key = (os.getpid(), settings.broker_url_or_default)
    if key not in _clients:
        _clients[key] = BrokerRedis(settings, max(settings.publish_timeout, 2.0))
    return _clients[key].client


def counts_file(settings: Settings) -> Path:
    return settings.data_dir / FILE_NAME


def broker_client(settings: Settings) -> Any:
    """This process's Redis client of the broker (when the broker is Redis)."""
    return _worker_client(settings)


def keeps_counts(settings: Settings) -> bool:
    return settings.uses_embedded_broker or uses_redis(settings)


def _increments(delivered: int, retried: int, dropped: Mapping[str, int]) -> dict[str, int]:
    fields = {DELIVERED: delivered, RETRIED: retried}
    fields.update({DROPPED_PREFIX + reason: n for reason, n in dropped.items()})
    return {name: n for name, n in fields.items() if n > 0}


def _update_file(path: Path, increments: Mapping[str, int]) -> dict[str, int]:
    """Adds `increments` to the counts in `path` (none: only reads) under an exclusive lock."""
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


def record(settings: Settings, delivered: int = 0, retried: int = 0,
           dropped: Mapping[str, int] | None = None) -> None:
    """Adds to the shared counts, with any this process could not write before; what the
    broker does not take now is kept and retried (see the module's docstring)."""
    increments = _increments(delivered, retried, dropped or {})
    if not increments:
        return
    with _unwritten_lock:
        _unwritten.update(increments)
        _write_unwritten(settings)


def write_unwritten(settings: Settings) -> dict[str, int]:
    """Tries once to write what this process holds; answers what is still unwritten."""
    with _unwritten_lock:
        _write_unwritten(settings)
        return dict(_unwritten)


def _write_unwritten(settings: Settings) -> None:
    # Called with _unwritten_lock held.
    global _retry_delay
    if not _unwritten:
        return
    try:
        if not uses_redis(settings):
            _update_file(counts_file(settings), _unwritten)
        else:
            # MULTI/EXEC: all of the increments or none, so that a retry adds nothing twice.
            pipe = _worker_client(settings).pipeline(transaction=True)
            for name, n in _unwritten.items():
                pipe.hincrby(REDIS_KEY, name, n)
            pipe.execute()
    except Exception as error:  # noqa: BLE001 (bookkeeping must never fail a delivery)
        log.debug("telemetry: could not write the counts %s yet: %r", dict(_unwritten), error)
        _schedule_retry(settings)
        return
    _unwritten.clear()
    _retry_delay = RETRY_FIRST_SECONDS


def _schedule_retry(settings: Settings) -> None:
    # Called with _unwritten_lock held. One timer at a time, backing off while the broker
    # stays away; a daemon thread, so it never holds a stopping worker.
    global _retry_timer, _retry_delay
    if _retry_timer is not None and _retry_timer.is_alive() and _retry_timer is not threading.current_thread():
        return
    _retry_timer = threading.Timer(_retry_delay, write_unwritten, args=(settings,))
    _retry_timer.daemon = True
    _retry_timer.start()
    _retry_delay = min(_retry_delay * 2, RETRY_MAX_SECONDS)


def read_counts(settings: Settings, client: Any = None) -> dict[str, Any]:
    """`{"delivered": n, "retried": n, "dropped": {reason: n}}`, or raises CountsUnavailable."""
    if not keeps_counts(settings):
        raise CountsUnavailable(f"no counts kept on a {urlsplit(settings.broker_url_or_default).scheme}:// broker")
    try:
        if settings.uses_embedded_broker:
            raw = _update_file(counts_file(settings), {})
        else:
            raw = (client or _worker_client(settings)).hgetall(REDIS_KEY)
    except Exception as error:  # noqa: BLE001
        raise CountsUnavailable(f"cannot read the counts: {type(error).__name__}") from None
    return _as_counts(raw)


def worker_own_counts(settings: Settings) -> dict[str, Any] | None:
    """This worker's counts from its data folder, when the broker keeps none (RabbitMQ)."""
    if keeps_counts(settings):
        return None
    try:
        return _as_counts(_update_file(counts_file(settings), {}))
    except Exception:  # noqa: BLE001
        return None


def add_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {DELIVERED: 0, RETRIED: 0, "dropped": {}}
    for part in parts:
        total[DELIVERED] += int(part.get(DELIVERED, 0))
        total[RETRIED] += int(part.get(RETRIED, 0))
        for reason, n in part.get("dropped", {}).items():
            total["dropped"][reason] = total["dropped"].get(reason, 0) + int(n)
    return total


def _as_counts(raw: Mapping[Any, Any]) -> dict[str, Any]:
    # kombu's Redis client answers bytes.
    raw = {(name.decode() if isinstance(name, bytes) else name): int(n) for name, n in raw.items()}
    counts: dict[str, Any] = {DELIVERED: raw.get(DELIVERED, 0), RETRIED: raw.get(RETRIED, 0), "dropped": {}}
    for name, n in sorted(raw.items()):
        if name.startswith(DROPPED_PREFIX):
            counts["dropped"][name[len(DROPPED_PREFIX):]] = n
    return counts
