"""Delivery counts kept where the broker says (`Broker.counts_store`), so that every worker
and `rubrix-telemetry status` see the same numbers.

Fields (`telemetry_core.counts`): `delivered`, `retried` (events scheduled for another
attempt) and `dropped:<reason>`. A broker that keeps them (Redis: one hash, atomic across
workers; the embedded queue: a JSON file in the shared data folder) has them for the whole
deployment. A broker that stores no values (RabbitMQ) gets the same file in each worker's
data folder, and each worker reports its own in its answer to `rubrix-telemetry status`,
which adds them up (`tasks/remote_status.py`). Counting is bookkeeping: it never makes a
task fail.

A count the broker cannot take (it is down, or failing over to a Sentinel replica) is kept
in the process and added with the next one, or by a timer within seconds of the broker
answering again; a worker stopping tries once more and logs what it could not write.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from typing import Any, Mapping

from telemetry_core.brokers import broker_for
from telemetry_core.brokers.base import CountsStore
from telemetry_core.counts import CountsUnavailable, FileCounts, as_counts, increments
from telemetry_core.settings import Settings

__all__ = ["CountsUnavailable", "keeps_counts", "read_counts", "record", "worker_own_counts", "write_unwritten"]

log = logging.getLogger("tasks.counters")

RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0

# Increments this process has not written yet, and how many records added to them: the lock
# guards both. The tasks that end at once (the group-commit sender releases them together)
# share one write: each adds its increments, then one writer at a time (a task or the retry
# timer) writes everything added so far; a task whose increments another's write took along
# returns without writing (group commit, as for the POSTs: no count is lost or written twice).
_unwritten: Counter[str] = Counter()
_unwritten_lock = threading.Lock()
_records_added = 0
_records_written = 0  # written, or held for the retry timer
_write_lock = threading.Lock()
_retry_timer: threading.Timer | None = None
_retry_delay = RETRY_FIRST_SECONDS


def _forget_parent_increments() -> None:
    # A forked pool child starts with none of its parent's: the parent writes its own.
    global _unwritten_lock, _write_lock, _retry_timer, _retry_delay, _records_added, _records_written
    _unwritten.clear()
    _unwritten_lock, _write_lock = threading.Lock(), threading.Lock()
    _records_added = _records_written = 0
    _retry_timer, _retry_delay = None, RETRY_FIRST_SECONDS


os.register_at_fork(after_in_child=_forget_parent_increments)


def _store_timeout(settings: Settings) -> float:
    return max(settings.publish_timeout, 2.0)


def _store(settings: Settings) -> CountsStore:
    """The deployment's store, or this worker's own file where the broker keeps none."""
    broker = broker_for(settings)
    store = broker.counts_store(_store_timeout(settings)) if broker.keeps_counts else None
    return store if store is not None else FileCounts(settings.data_dir)


def keeps_counts(settings: Settings) -> bool:
    """Whether the broker keeps the deployment's counts (else each worker reports its own)."""
    return broker_for(settings).keeps_counts


def record(settings: Settings, delivered: int = 0, retried: int = 0,
           dropped: Mapping[str, int] | None = None) -> None:
    """Adds to the shared counts, with any this process could not write before; what the
    broker does not take now is kept and retried (see the module's docstring). Returns once
    they were written (or are held for the retry timer)."""
    global _records_added
    added = increments(delivered, retried, dropped or {})
    if not added:
        return
    with _unwritten_lock:
        _unwritten.update(added)
        _records_added += 1
        mine = _records_added
    with _write_lock:
        if _records_written < mine:
            _write_unwritten(settings)


def write_unwritten(settings: Settings) -> dict[str, int]:
    """Tries once to write what this process holds; answers what is still unwritten."""
    with _write_lock:
        _write_unwritten(settings)
        with _unwritten_lock:
            return dict(_unwritten)


def _write_unwritten(settings: Settings) -> None:
    # Called with _write_lock held.
    global _retry_delay, _records_written
    with _unwritten_lock:
        taken, upto = Counter(_unwritten), _records_added
        _unwritten.clear()
    if not taken:
        _records_written = upto
        return
    try:
        _store(settings).add(taken)
    except Exception as error:  # noqa: BLE001 (bookkeeping must never fail a delivery)
        log.debug("telemetry: could not write the counts %s yet: %r", dict(taken), error)
        with _unwritten_lock:
            _unwritten.update(taken)
        _records_written = upto
        _schedule_retry(settings)
        return
    _records_written = upto
    _retry_delay = RETRY_FIRST_SECONDS


def _schedule_retry(settings: Settings) -> None:
    # Called with _write_lock held. One timer at a time, backing off while the broker
    # stays away; a daemon thread, so it never holds a stopping worker.
    global _retry_timer, _retry_delay
    if _retry_timer is not None and _retry_timer.is_alive() and _retry_timer is not threading.current_thread():
        return
    _retry_timer = threading.Timer(_retry_delay, write_unwritten, args=(settings,))
    _retry_timer.daemon = True
    _retry_timer.start()
    _retry_delay = min(_retry_delay * 2, RETRY_MAX_SECONDS)


def read_counts(settings: Settings, timeout: float | None = None) -> dict[str, Any]:
    """`{"delivered": n, "retried": n, "dropped": {reason: n}}` of the deployment, or raises
    CountsUnavailable (broker down, or a broker that keeps none)."""
    broker = broker_for(settings)
    if not broker.keeps_counts:
        raise CountsUnavailable(broker.no_counts_reason())
    try:
        store = broker.counts_store(_store_timeout(settings) if timeout is None else timeout)
        assert store is not None
        return as_counts(store.read())
    except Exception as error:  # noqa: BLE001
        raise CountsUnavailable(f"cannot read the counts: {type(error).__name__}") from None


def worker_own_counts(settings: Settings) -> dict[str, Any] | None:
    """This worker's counts from its data folder, when the broker keeps none (RabbitMQ)."""
    if keeps_counts(settings):
        return None
    try:
        return as_counts(FileCounts(settings.data_dir).read())
    except Exception:  # noqa: BLE001
        return None
