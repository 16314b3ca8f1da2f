"""Delivery counts kept in the broker, so that every worker and `rubrix-telemetry status`
see the same numbers.

Fields: `delivered`, `retried` (events scheduled for another attempt) and
`dropped:<reason>`. On Redis they are one hash (HINCRBY is atomic across workers); on the
embedded on-disk broker, a small JSON file in the data folder, replaced whole at each write
(a broken one, from before, is set aside and counting goes on).
A broker that stores no values (RabbitMQ) gets the same file in each worker's data folder,
and each worker reports its own in its answer to `rubrix-telemetry status`, which adds them
up (`tasks/remote_status.py`). Counting is bookkeeping: it never makes a task fail.

A count the broker cannot take (it is down, or failing over to a Sentinel replica) is kept
in the process and added with the next one, or by a timer within seconds of the broker
answering again; a worker stopping tries once more and logs what it could not write.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping
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


# A file of this module's (counts.json, a worker's last delivery) is replaced whole, never
# rewritten in place: a crash or a full disk mid-write leaves the old file, not half a new one,
# and readers need no lock. Writers serialise on a lock file beside it, since the file itself
# is a new inode after each write. Mode 0644: the deployment's other processes (`status`, a
# worker of another user on a shared volume) read it.
FILE_MODE = 0o644
BROKEN_SUFFIX = ".broken-"
# A "name": integer pair that is whole (a comma or the closing brace follows it): what a
# counts file cut short by a crash still holds for sure.
_WHOLE_PAIR = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:\s*(\d+)\s*(?=[,}])')


def write_json_atomically(path: Path, document: Any, durable: bool = True) -> None:
    """Replaces `path` with `document` as JSON: a temporary file in the same folder, fsynced
    when `durable`, then renamed over it, so that no reader ever sees it half written."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), FILE_MODE)
            file.write(json.dumps(document, sort_keys=True))
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Holds the exclusive lock of `path`'s writers (on `<path>.lock`, created if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # released when the descriptor is closed
        yield
    finally:
        os.close(descriptor)


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


def _update_file(path: Path, increments: Mapping[str, int]) -> dict[str, int]:
    """Adds `increments` to the counts in `path` (none: only reads) and answers them; a broken
    file is set aside and counting starts again from what it still held."""
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


def no_counts_reason(settings: Settings) -> str:
    """What `status` says where the broker keeps no counts (RabbitMQ, SQS, ...)."""
    return f"no counts kept on {urlsplit(settings.broker_url_or_default).scheme}:// brokers"


def read_counts(settings: Settings, client: Any = None) -> dict[str, Any]:
    """`{"delivered": n, "retried": n, "dropped": {reason: n}}`, or raises CountsUnavailable."""
    if not keeps_counts(settings):
        raise CountsUnavailable(no_counts_reason(settings))
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
