"""Task events leave the worker in batches, at most every FLUSH_INTERVAL seconds, not at every
iteration of the consumer's event loop.

Celery's Events step buffers the task events (task-received, -started, -succeeded: three per
task) and asks the event loop to publish them as one `task.multi` message at its next iteration
(`Consumer.on_send_event_buffered`); on a transport that only polls (the embedded queue's) there
is no event loop, and it publishes every event as a message of its own: three per task. Draining a backlog, the loop takes about one message per
iteration, so that is one broker publish per task message: a third of the consumer's time,
which is the worker's bottleneck. Here a flush is scheduled at most once per interval, and the
buffer is published as soon as it holds BATCH_EVENTS events; without an event loop the
consumer's timer thread publishes it. Flower and `celery events` read
`task.multi` lists already (Celery's EventReceiver splits them); they see each event at most
FLUSH_INTERVAL later.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import bootsteps

# Flower sees an event at most this late. On a 20,000-message Redis drain 0.2 s made no faster
# drain than 0.1 s (555 publishes against 622, 34.7 s against 33.2 s): the publishes left are
# about 1.5 % of the consumer's time (docs/reliability.md).
FLUSH_INTERVAL = 0.1
# A buffer this full is published at once: a draining worker fills it within FLUSH_INTERVAL,
# so many publishes carry this many events (~90 on average measured). 128 of them are about
# 40 KB of JSON (measured on Redis), far below any broker's message limit.
BATCH_EVENTS = 128
# The dispatcher's own limit (Celery's default is 24), out of the way: every thread that buffered
# an event while a full buffer was being published flushed too, waiting for the dispatcher's lock,
# and then published the few events that came meanwhile (measured: 195 of 355 publishes carried
# fewer than 16 events). BATCH_EVENTS is applied here instead, by one thread at a time.
_NO_LIMIT = 2**62


class IntervalFlush:
    """The dispatcher's `on_send_buffered`: publishes a full buffer, else asks the event loop for
    one flush in FLUSH_INTERVAL, unless one is due already."""

    def __init__(self, consumer: Any, interval: float = FLUSH_INTERVAL, batch: int = BATCH_EVENTS) -> None:
        self.consumer = consumer
        self.hub = consumer.hub  # None on a transport that only polls: the consumer's timer thread flushes
        self.interval = interval
        self.batch = batch
        self._lock = threading.Lock()
        self._due = False  # a flush is scheduled: more events just wait for it
        self._publishing = threading.Lock()  # held by the one thread publishing a full buffer
        self.batching = True  # False once the worker stops: Celery's flush at every iteration again

    def on_send_buffered(self) -> None:
        """Called by the dispatcher after it buffered a task event, from the loop's thread
        (task-received) or a pool thread (task-started, task-succeeded)."""
        if not self.batching:
            # Stopping: the loop is gone, but the hub still runs what is ready when it closes (after
            # the pool finished its tasks), and that is where Celery's own flush goes out. Without
            # a hub, Celery would have published the event at once: so does this.
            if self.hub is not None:
                self.consumer.on_send_event_buffered()
            else:
                self.flush_now()
            return
        if self._buffered() >= self.batch and self._publishing.acquire(blocking=False):
            try:
                self.flush_now()  # this event is in it
            finally:
                self._publishing.release()
            return
        # Not full, or another thread is publishing it (this event may have come after its copy):
        # the next timed flush takes it.
        with self._lock:
            if self._due:
                return
            self._due = True
        if self.hub is None:
            # Celery's timer thread (timer2: its schedule is under a lock), which runs the flush.
            self.consumer.timer.call_after(self.interval, self._flush)
            return
        # The hub's timer is not thread-safe (a heap): it is set from the loop's thread. call_soon
        # is (kombu's hub takes a lock and wakes the poller).
        self.hub.call_soon(self._schedule)

    def _buffered(self) -> int:
        dispatcher = self.consumer.event_dispatcher
        # The dispatcher's own buffer (Celery has no public accessor): a list per group.
        return len(dispatcher._group_buffer["task"]) if dispatcher is not None else 0

    def _schedule(self) -> None:
        self.hub.call_later(self.interval, self._flush)

    def _flush(self) -> None:
        # Cleared first: an event buffered from here on schedules the next flush; one buffered
        # before is in the buffer this flush publishes.
        with self._lock:
            self._due = False
        self.flush_now()

    def flush_now(self) -> None:
        dispatcher = self.consumer.event_dispatcher
        if dispatcher is not None:
            dispatcher.flush()

    def reset(self) -> None:
        """At every (re)start. Celery keeps the loop's timer and ready callbacks across a
        reconnection, so a scheduled flush normally survives it; should one have been dropped,
        `_due` would wait for it for ever and only full buffers would go out. A surviving one
        then just flushes once more."""
        with self._lock:
            self._due = False
        self.batching = True


class EventFlushStep(bootsteps.StartStopStep):
    """Installs IntervalFlush on the dispatcher the Events step made; again after every
    reconnection, which makes a new one."""

    requires = {"celery.worker.consumer.events:Events"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.flusher: IntervalFlush | None = None
        self.dispatcher: Any = None  # the one we set up: the previous one, at a reconnection

    def start(self, parent: Any) -> None:
        dispatcher = parent.event_dispatcher
        previous, self.dispatcher = self.dispatcher, None
        # Celery buffers task events only with an event loop; without one (a transport that only
        # polls, such as the embedded queue's) they are buffered here too. With task events off
        # (no -E, worker_send_task_events off) the hook is never called; `celery control
        # enable_events` then gets the batching too.
        if dispatcher is None:
            return
        if parent.hub is None:
            dispatcher.buffer_group = frozenset(dispatcher.buffer_group) | {"task"}
        if self.flusher is None:
            self.flusher = IntervalFlush(parent)
        self.flusher.reset()
        if previous is not None and previous is not dispatcher:
            self._take_over(previous, dispatcher)
        dispatcher.buffer_limit = _NO_LIMIT
        dispatcher.on_send_buffered = self.flusher.on_send_buffered
        self.dispatcher = dispatcher

    @staticmethod
    def _take_over(previous: Any, dispatcher: Any) -> None:
        """Events buffered in the old connection's dispatcher go out with the new one: Celery
        carries over only what failed to publish (extend_buffer), and at every iteration its
        group buffer was empty; here it can hold up to FLUSH_INTERVAL's worth."""
        with previous.mutex:
            left = {group: list(events) for group, events in previous._group_buffer.items() if events}
            for events in previous._group_buffer.values():
                events.clear()
        if left:
            with dispatcher.mutex:
                for group, events in left.items():
                    dispatcher._group_buffer[group][:0] = events
            dispatcher.flush()

    def stop(self, parent: Any) -> None:
        flusher = self.flusher
        if flusher is None or self.dispatcher is None:
            return
        if parent.blueprint.state == bootsteps.RUN:
            return  # a reconnection (the blueprint restarts): start takes the buffer over
        # The worker stops: what waits goes out now; the pool's last tasks' events go out with
        # Celery's own flush, which the hub runs as it closes. A timer still set never fires once
        # the loop has stopped; if it does, it flushes what is left, or nothing (the dispatcher
        # gone or closed).
        flusher.batching = False
        flusher.flush_now()

    terminate = stop

    def shutdown(self, parent: Any) -> None:
        # Runs before the Events step closes the dispatcher (this step requires it): the last
        # events, sent after the hub closed, are not left in its buffer.
        if self.flusher is not None and self.dispatcher is not None:
            self.flusher.batching = False
            self.flusher.flush_now()
