"""The bounded buffer and the background thread that hands events to the broker.

The request path only appends a tuple of raw values to a deque (well under a microsecond).
A daemon thread wakes every flush interval, checks each event against the contract (what
fails is dropped and counted: nothing outside the allowlist leaves the process), gives it
its messageId and publishes up to `events_per_task` events as one Celery task message in
format 2 (`telemetry_core.message`). The broker is touched only from that thread, with
publish retries off and short socket timeouts, because `apply_async` can block for a long
time when the broker is down (celery/celery#4296, #4556, #6911).

A batch that cannot be published is kept and tried again with a growing pause, so a
broker blip loses nothing; meanwhile new events queue in the buffer, and those beyond
its bound are dropped and counted.

Before every publish the thread asks the broker for its backlog (`Broker.backlog`, in
events, and `Broker.backlog_bytes`); at RUBRIX_TELEMETRY_MAX_BACKLOG events or
RUBRIX_TELEMETRY_MAX_BACKLOG_BYTES bytes the batch is dropped and counted as BACKLOG_FULL,
and the next batch asks again, so publishing resumes as soon as workers make room. Asked
each time, never cached: one server process overshoots the bound by one task message at
most. The server's drops are also added to the deployment's counts where the broker keeps
them (`Broker.counts_store`), from this thread, every COUNTS_WRITE_INTERVAL at most. The thread is restarted lazily in a forked child
(`os.register_at_fork`) and the buffer is flushed at interpreter exit with a bounded wait.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures.thread  # noqa: F401 (see the note at _flush_at_exit)
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable

from telemetry_core import message
from telemetry_core.contract import (
    DELIVER_TASK_NAME,
    MAX_SEQUENCE,
    InvalidEvent,
    checked_wire_event,
    new_message_id_prefix,
)
from telemetry_core.platform_info import platform_info
from telemetry_core.brokers import broker_for
from telemetry_core.brokers.base import PublishUnconfirmed, QueueMisconfigured
from telemetry_core.counts import DROPPED_PREFIX
from telemetry_core.settings import Settings, broker_transport_options, error_text

__all__ = ["CeleryBatchSender", "Publisher", "PublishUnconfirmed"]

log = logging.getLogger("rubrix_hooks.publisher")

# What a hook buffers: (event name, timestamp in µs, property values in contract order),
# unchecked; the publisher thread checks it before anything leaves the process.
RawEvent = tuple
# Publishes one task message's kwargs (`message.encode`), or raises.
SendBatch = Callable[[dict[str, Any]], None]

# The longest pause between two attempts to reach a broker that is down.
MAX_PUBLISH_PAUSE = 30.0
# At most one warning about dropped events per this many seconds: a broker outage under
# load would otherwise write a log line per request.
DROP_WARNING_INTERVAL = 60.0
# The reason for events dropped because the broker's backlog is at RUBRIX_TELEMETRY_MAX_BACKLOG.
BACKLOG_FULL = "backlog_full"
# Seconds between two writes of this process's drops to the deployment's counts, at most.
COUNTS_WRITE_INTERVAL = 5.0
# The reasons of the server's own making, named as they are in the deployment's counts too.
SERVER_REASONS = frozenset({"buffer_full", "hook_error", "shutdown_timeout", BACKLOG_FULL})
# Any other server drop is an event the contract refused at the hook's end: in the deployment's
# counts it is told apart from the worker's refusals (`invalid: <rule>`).
SERVER_INVALID_PREFIX = "invalid in the server: "


def deployment_reason(reason: str) -> str:
    """A drop reason of `stats()` as the deployment's counts (and `status`, the metrics) name it."""
    return reason if reason in SERVER_REASONS else SERVER_INVALID_PREFIX + reason


# Once the broker said its backlog is at the bound, batches are dropped without asking again
# for this long: a check costs little now (a running count), but a server at the bound would
# otherwise ask at every batch, for nothing. Dropping while unsure never overshoots.
FULL_BACKLOG_RECHECK = 1.0


class CeleryBatchSender:
    """Publishes one batch of events as one Celery task message, or raises."""

    def __init__(self, settings: Settings) -> None:
        from celery import Celery  # imported here: an idle or disabled server never loads Celery

        self._queue = settings.queue
        self._app = Celery("rubrix_hooks", set_as_current=False)
        self._broker = broker = broker_for(settings)
        self._app.conf.update(
            broker_url=settings.broker_url_or_default,
            # RabbitMQ adds publisher confirms: a publish returns only once the broker has it.
            broker_transport_options={**broker_transport_options(settings), **broker.publisher_transport_options()},
            broker_connection_timeout=settings.publish_timeout,
            broker_connection_retry=False,
            broker_connection_max_retries=0,
            broker_pool_limit=1,
            # No heartbeats: nothing reads them between publishes, and RabbitMQ would close
            # a quiet server's connection for missing ones.
            broker_heartbeat=0,
            task_serializer="json",
            accept_content=["json"],
            task_ignore_result=True,
            task_queues=broker.task_queues(),
        )
        # Import the broker's transport now, not at the first publish (no network I/O).
        self._app.connection_for_write().release()
        # Every wait of a publish is bounded where the broker can block (RabbitMQ's alarms).
        self._bounds = broker.publish_bounds()
        self._settings = settings
        self._connection: Any = None
        self._producer: Any = None
        self._refusal_logged = False

    def __call__(self, kwargs: dict[str, Any]) -> None:
        if self._producer is None:
            from kombu import Producer

            self._connection = self._app.connection_for_write()
            self._producer = Producer(self._connection)  # kombu's, as Celery's own publishes use
        try:
            self._app.send_task(DELIVER_TASK_NAME, args=(), kwargs=kwargs, queue=self._queue, retry=False,
                                producer=self._producer, argsrepr="()", kwargsrepr=message.describe(kwargs),
                                headers=message.events_header(len(kwargs["events"])), **self._bounds)
        except Exception as error:
            # A fresh connection for the next attempt: this one may be blocked, half-written
            # or hold a confirm that arrives late (and would be taken for the next one's).
            self._discard_connection()
            # The broker's refusals as what they mean to an operator.
            clearer = self._broker.explain_publish_error(error)
            if isinstance(clearer, QueueMisconfigured) and not self._refusal_logged:
                log.error("telemetry: events held, not published: %s", clearer)
                self._refusal_logged = True
            if clearer is not None:
                raise clearer from None
            raise

    def _discard_connection(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            try:
                connection.collect()  # drops the socket without a closing handshake
            except Exception:  # noqa: BLE001 (it is being thrown away)
                pass

    def close(self) -> None:
        if self._connection is not None:
            self._connection.release()
        self._app.close()


class Publisher:
    """Owns the buffer and the publishing thread of one process."""

    def __init__(self, settings: Settings, make_sender: Callable[[], SendBatch] | None = None) -> None:
        self._settings = settings
        self._make_sender = make_sender or (lambda: CeleryBatchSender(settings))
        self._capacity = settings.buffer_size
        self._broker = broker_for(settings)  # cheap: connects to nothing until asked
        self._counts_lock = threading.Lock()  # the publisher thread, and close() at exit
        self._reset()
        _live_publishers.add(self)

    def _reset(self) -> None:
        """Fresh state: at creation and in a forked child, whose copied thread and locks are dead."""
        self.dropped: collections.Counter[str] = collections.Counter()
        self.published = 0
        self._buffer: collections.deque[RawEvent] = collections.deque()
        # Taken from the buffer, checked and encoded, not yet published: kept as is until
        # the broker has it, so a re-publish sends the very same messageIds.
        self._in_hand: dict[str, Any] | None = None
        self._in_hand_count = 0
        # A fresh prefix in a forked child: parent and child number their events apart.
        self._id_prefix = new_message_id_prefix()
        self._sequence = 0
        self._wake = threading.Event()
        self._flush_requested = False
        self._idle = threading.Condition()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._sender: SendBatch | None = None
        self._failures = 0
        self._last_drop_warning = -DROP_WARNING_INTERVAL  # the first drops are reported at once
        self._dropped_reported = 0
        self._backlog_drops_reported = 0
        self._backlog_full_until = 0.0  # monotonic time until which the bound is taken as reached
        self._bound_reached: str | None = None  # which bound the broker's backlog last reached
        # Drops already added to the deployment's counts (`Broker.counts_store`), and when.
        self._dropped_written: collections.Counter[str] = collections.Counter()
        self._next_counts_write = 0.0

    # -- request path ---------------------------------------------------------------
    def has_room(self) -> bool:
        """Whether `submit` would keep an event; when False, the caller counts the drop and
        skips building it: during a broker outage requests then pay nothing for telemetry."""
        return len(self._buffer) < self._capacity

    def submit(self, event: RawEvent) -> bool:
        """Buffers an event; False (and counted) when the buffer is full. Never blocks."""
        buffer = self._buffer
        if len(buffer) < self._capacity:
            buffer.append(event)
            if self._thread is None:
                self._start()
            return True
        self.dropped["buffer_full"] += 1  # count_drop, inlined: every event of an outage comes here
        return False

    # -- control --------------------------------------------------------------------
    def pending(self) -> int:
        return len(self._buffer) + self._in_hand_count

    def flush(self, timeout: float = 5.0) -> bool:
        """Waits until every buffered event is with the broker; False if `timeout` ran out."""
        deadline = time.monotonic() + timeout
        if self.pending() and self._thread is None:
            self._start()
        # One wake-up: the thread publishes everything at once, and keeps its own pause
        # between attempts if the broker is down (a flush must not hammer a dead broker).
        self._flush_requested = True
        self._wake.set()
        with self._idle:
            while self.pending():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.05))
        return True

    def stats(self) -> dict[str, Any]:
        return {"published": self.published, "pending": self.pending(), "dropped": dict(self.dropped)}

    def close(self, timeout: float) -> None:
        """Flushes with a bounded wait, then counts whatever is left as dropped."""
        if not self.flush(timeout):
            left = self.pending()
            self._buffer.clear()
            self._in_hand, self._in_hand_count = None, 0
            self.dropped["shutdown_timeout"] += left
            log.warning("telemetry: %d events could not reach the broker before exit and were dropped", left)
        self._write_drop_counts(force=True)

    # -- publishing thread -----------------------------------------------------------
    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="rubrix-telemetry-publisher", daemon=True)
                thread.start()
                self._thread = thread

    def _run(self) -> None:
        try:
            with _fork_guard:
                self._ensure_sender()
        except Exception:  # retried at the first publish; the failure is logged there
            pass
        # On the embedded queue, the one worker its data folder needs, unless one runs; from
        # this thread, so that the server's start never waits for it (it never raises).
        broker_for(self._settings).start_worker_alongside()
        while True:
            self._wake.wait(self._pause())
            self._wake.clear()
            drain, self._flush_requested = self._flush_requested, False
            try:
                self._publish_all(drain)
                self._report_drops()
                self._write_drop_counts()
            except Exception:  # never let the thread die: the server would silently stop reporting
                log.exception("telemetry: unexpected error in the publisher")
            with self._idle:
                self._idle.notify_all()

    def _pause(self) -> float:
        if not self._failures:
            return self._settings.flush_interval
        return min(MAX_PUBLISH_PAUSE, self._settings.flush_interval * 2 ** min(self._failures, 16))

    def _ensure_sender(self) -> SendBatch:
        if self._sender is None:
            self._sender = self._make_sender()
        return self._sender

    def _encode(self, raw_events: list[RawEvent]) -> list[list[Any]]:
        """Checks each event against the contract and numbers it; drops (and counts) the rest."""
        events = []
        if self._sequence + len(raw_events) > MAX_SEQUENCE:  # one prefix per message
            self._id_prefix, self._sequence = new_message_id_prefix(), 0
        sequence = self._sequence
        for raw in raw_events:
            try:
                events.append(checked_wire_event(raw, sequence))
            except InvalidEvent as error:
                self.count_drop(error.reason)
                continue
            except Exception:  # a rule met a value we never imagined: drop it, never the thread
                self.count_drop("hook_error")
                continue
            sequence += 1
        self._sequence = sequence
        return events

    def _take_batch(self) -> int:
        """Moves up to `events_per_task` events from the buffer into `_in_hand` (when any is
        valid); returns how many it took off the buffer."""
        take = min(self._settings.events_per_task, len(self._buffer))
        if take:
            # Counted as pending from here on, so that a flush never sees them nowhere.
            self._in_hand_count = take
            popleft = self._buffer.popleft
            events = self._encode([popleft() for _ in range(take)])
            self._in_hand_count = len(events)
            if events:
                self._in_hand = message.encode(platform_info(), self._id_prefix, events)
        return take

    def _publish_all(self, drain: bool = False) -> None:
        """Publishes what was waiting when the thread woke up, and any full task message that
        has built up since; with `drain` (a flush), everything.

        Events that arrive during a publish wait for the next wake-up: otherwise a busy server
        keeps this loop sending a stream of tiny task messages, each costing about a
        millisecond of CPU whatever it carries.
        """
        backlog = len(self._buffer)
        full_task = self._settings.events_per_task
        while True:
            if self._in_hand is None:
                if not (drain or backlog > 0 or len(self._buffer) >= full_task):
                    return
                taken = self._take_batch()
                backlog -= taken
                if self._in_hand is None:  # nothing left, or nothing valid in what was taken
                    if not taken:
                        return
                    continue
            if not self._broker_has_room():
                self.dropped[BACKLOG_FULL] += self._in_hand_count
                self._in_hand, self._in_hand_count = None, 0
                continue  # the next batch asks again: workers may have made room meanwhile
            try:
                with _fork_guard:
                    self._ensure_sender()(self._in_hand)
            except Exception as error:
                self._failures += 1
                # A queue the broker refuses was said once, in a line of its own (CeleryBatchSender):
                # the broker answers, so it is not "cannot reach".
                out_of_reach = not isinstance(error, QueueMisconfigured)
                if out_of_reach and (self._failures == 1 or self._failures % 10 == 0):
                    log.warning(
                        "telemetry: cannot reach the broker (%s); %d events held, retrying in %.1fs",
                        error_text(error, self._settings.broker_url_or_default), self.pending(),
                        self._pause(),
                    )
                return
            if self._failures:
                log.info("telemetry: the broker answers again")
            self._failures = 0
            self._broker.message_published(self._in_hand_count)  # a running count, where the broker keeps one
            self.published += self._in_hand_count
            self._in_hand, self._in_hand_count = None, 0

    def _broker_has_room(self) -> bool:
        """Whether the broker's backlog is below RUBRIX_TELEMETRY_MAX_BACKLOG events and
        RUBRIX_TELEMETRY_MAX_BACKLOG_BYTES bytes, asked now (room is never taken from a cached
        figure: the overshoot stays within one task message per process; only "full" is kept,
        for FULL_BACKLOG_RECHECK). A broker that cannot tell, or does not answer, gets the
        publish: its failure is handled there."""
        settings = self._settings
        if time.monotonic() < self._backlog_full_until:
            return False
        try:
            events = self._broker.backlog(settings.publish_timeout, under=settings.max_backlog)
            at_bound = self._bound_reached = (
                f"RUBRIX_TELEMETRY_MAX_BACKLOG={settings.max_backlog} events"
                if events is not None and events >= settings.max_backlog else None)
            if at_bound is None:
                size = self._broker.backlog_bytes(settings.publish_timeout)
                if size is not None and size >= settings.max_backlog_bytes:
                    at_bound = self._bound_reached = f"RUBRIX_TELEMETRY_MAX_BACKLOG_BYTES={settings.max_backlog_bytes} bytes"
        except Exception as error:  # noqa: BLE001
            log.debug("telemetry: could not read the broker's backlog: %r", error)
            return True
        if at_bound is None:
            return True
        self._backlog_full_until = time.monotonic() + FULL_BACKLOG_RECHECK
        return False

    def _write_drop_counts(self, force: bool = False) -> None:
        """Adds this process's new drops to the deployment's counts where the broker keeps them,
        every COUNTS_WRITE_INTERVAL at most (`force`: now, at exit). One try, bounded by the
        publish timeout; what is not written is tried again next time."""
        if not self._broker.keeps_counts or (not force and time.monotonic() < self._next_counts_write):
            return
        with self._counts_lock:
            self._next_counts_write = time.monotonic() + COUNTS_WRITE_INTERVAL
            new = collections.Counter(dict(self.dropped))  # one C call: request threads may add meanwhile
            new.subtract(self._dropped_written)
            increments = {DROPPED_PREFIX + deployment_reason(reason): n for reason, n in new.items() if n > 0}
            if not increments:
                return
            try:
                store = self._broker.counts_store(self._settings.publish_timeout)
                if store is None:
                    return
                store.add(increments)
            except Exception as error:  # noqa: BLE001 (bookkeeping: the events are counted in stats())
                log.debug("telemetry: could not add the drops to the broker's counts yet: %r", error)
                return
            self._dropped_written.update({reason: n for reason, n in new.items() if n > 0})

    def count_drop(self, reason: str) -> None:
        """Counts one dropped event. On the request path during an outage (every event is
        dropped then), so only a counter: the publisher thread reports drops (`_report_drops`)."""
        self.dropped[reason] += 1

    def _report_drops(self) -> None:
        """At most one warning per DROP_WARNING_INTERVAL about events dropped since the last."""
        counts = dict(self.dropped)  # one C call: request threads may add a reason meanwhile
        total = sum(counts.values())
        now = time.monotonic()
        if total > self._dropped_reported and now - self._last_drop_warning >= DROP_WARNING_INTERVAL:
            at_bound = (f"; the broker's backlog is at {self._bound_reached or 'its bound'} (is a worker running?)"
                        if counts.get(BACKLOG_FULL, 0) > self._backlog_drops_reported else "")
            log.warning(
                "telemetry: dropped %d events since the last report (%s); the server is not affected%s",
                total - self._dropped_reported,
                ", ".join(f"{why}: {n}" for why, n in counts.items()), at_bound,
            )
            self._last_drop_warning = now
            self._dropped_reported = total
            self._backlog_drops_reported = counts.get(BACKLOG_FULL, 0)


_live_publishers: "weakref.WeakSet[Publisher]" = weakref.WeakSet()

# Held while the publisher thread imports Celery or publishes. A fork in the middle of
# either would hand the child half-imported modules and locks owned by a thread it does
# not have (its publishes would then fail for ever); so a fork waits, at most one publish.
_fork_guard = threading.Lock()


def _after_fork_in_child() -> None:
    _fork_guard.release()
    # The parent still owns (and will send) the events buffered before the fork.
    for publisher in list(_live_publishers):
        publisher._reset()


os.register_at_fork(before=_fork_guard.acquire, after_in_parent=_fork_guard.release,
                    after_in_child=_after_fork_in_child)


# A server that exits right after its first events may import the broker's transport
# only now. redis-py imports concurrent.futures.thread, whose first import registers a
# threading atexit hook, which raises once shutdown has begun: hence the import above.
@atexit.register
def _flush_at_exit() -> None:
    for publisher in list(_live_publishers):
        publisher.close(publisher._settings.shutdown_timeout)
