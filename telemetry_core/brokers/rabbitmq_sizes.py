"""What a task message carries on RabbitMQ, in events: the factor of its backlog estimate.

RabbitMQ reports the messages ready in a queue, not the events they carry (a header is read
only by consuming the message). A server's publisher knows what it sent: `PublishedSizes`
keeps the events of this process's last RECENT_PUBLISHES messages. A process that publishes
nothing (`status`, `preview`, the metrics) reads what the servers share: each publishing
process appends its figure (events and messages of its window, JSON) to the stream SIZES_STREAM
of the vhost at its first publish and every SHARE_INTERVAL after, and a reader takes the
newest (offset "last": one chunk, a few messages at most), kept for SHARE_INTERVAL. Several
servers: the last to share wins (a quiet server and a busy one alternate). Streams need
RabbitMQ 3.9 or later; where the stream cannot be written or read, readers count each ready
message as `events_per_task`, an upper bound. Never raises into the publisher.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Callable

from telemetry_core.settings import Settings

log = logging.getLogger("telemetry_core.brokers.rabbitmq_sizes")

# The stream of the vhost that servers share their figure in: one per telemetry queue.
SIZES_STREAM = "rubrix-telemetry.{queue}.events-per-message"
# Retention: a stream keeps its segments until they are older than this; small segments, so
# that retention can drop them (it never drops the one being written).
STREAM_ARGUMENTS = {"x-queue-type": "stream", "x-max-age": "1h", "x-stream-max-segment-size-bytes": 64 * 1024}
# How many of this process's latest publishes its mean is taken over.
RECENT_PUBLISHES = 1000
# Seconds between two shares by a publisher, and how long a reader keeps what it read.
SHARE_INTERVAL = 30.0
# After a share failed (a RabbitMQ before 3.9 has no streams), the next try comes this much later.
RETRY_SHARE_INTERVAL = 5.0
# Seconds a share may wait for the broker to write and confirm it.
SHARE_TIMEOUT = 1.0
# How long a reader waits for the stream's newest message, and for one more after it.
READ_WAIT = 1.0
MORE_WAIT = 0.05


class PublishedSizes:
    """The events of this process's latest RECENT_PUBLISHES task messages, and their mean."""

    def __init__(self) -> None:
        self._events: collections.deque[int] = collections.deque(maxlen=RECENT_PUBLISHES)
        self._sum = 0
        self._lock = threading.Lock()
        self.next_share = 0.0  # monotonic time of the next share to the stream

    def add(self, events: int) -> None:
        with self._lock:
            if len(self._events) == self._events.maxlen:
                self._sum -= self._events[0]
            self._events.append(events)
            self._sum += events

    def window(self) -> tuple[int, int]:
        """(events, messages) of the window."""
        with self._lock:
            return self._sum, len(self._events)

    def mean(self) -> float | None:
        events, messages = self.window()
        return events / messages if messages else None


# Per process (a forked child starts afresh), broker URL and queue.
_published: dict[tuple[int, str, str], PublishedSizes] = {}
# What a reader read from the stream: (monotonic time, mean or None), per the same key.
_read: dict[tuple[int, str, str], tuple[float, float | None]] = {}


def _key(settings: Settings) -> tuple[int, str, str]:
    return os.getpid(), settings.broker_url_or_default, settings.queue


def published_sizes(settings: Settings) -> PublishedSizes:
    return _published.setdefault(_key(settings), PublishedSizes())


def record_publish(settings: Settings, events: int, connect: Callable[[], Any]) -> None:
    """A message of `events` events was published: added to this process's window, and shared
    at the first publish and every SHARE_INTERVAL after. `connect` opens a connection.
    Never raises."""
    sizes = published_sizes(settings)
    sizes.add(events)
    if time.monotonic() < sizes.next_share:
        return
    total, messages = sizes.window()
    try:
        from amqp import Message

        with connect() as connection:
            channel = connection.channel()
            stream = SIZES_STREAM.format(queue=settings.queue)
            channel.queue_declare(stream, durable=True, auto_delete=False, arguments=STREAM_ARGUMENTS)
            # Confirmed: a stream just declared may still be starting, and drop what it cannot take.
            channel.basic_publish_confirm(Message(json.dumps({"events": total, "messages": messages}),
                                                  content_type="application/json"),
                                          exchange="", routing_key=stream, timeout=SHARE_TIMEOUT,
                                          confirm_timeout=SHARE_TIMEOUT)
        sizes.next_share = time.monotonic() + SHARE_INTERVAL
    except Exception as error:  # noqa: BLE001 (readers fall back to the upper bound)
        sizes.next_share = time.monotonic() + RETRY_SHARE_INTERVAL
        log.debug("telemetry: could not share the events per message: %r", error)


def events_per_message(settings: Settings, connect: Callable[[], Any]) -> float | None:
    """This process's mean if it published, else the newest a server shared (read at most every
    SHARE_INTERVAL), else None. Never raises: a stream that cannot be read is no figure."""
    own = published_sizes(settings).mean()
    if own is not None:
        return own
    key = _key(settings)
    read_at, shared = _read.get(key, (-SHARE_INTERVAL, None))
    if time.monotonic() - read_at < SHARE_INTERVAL:
        return shared
    try:
        with connect() as connection:
            shared = _newest_shared(connection, SIZES_STREAM.format(queue=settings.queue))
    except Exception as error:  # noqa: BLE001 (a RabbitMQ before 3.9, a stream starting, a user who may not read it)
        log.debug("telemetry: could not read the events per message the servers shared: %r", error)
        shared = None
    _read[key] = (time.monotonic(), shared)
    return shared


def _newest_shared(connection: Any, stream: str) -> float | None:
    from amqp.exceptions import NotFound

    channel = connection.channel()
    try:
        channel.queue_declare(stream, passive=True)
    except NotFound:
        return None  # no server has shared yet
    channel = connection.channel()
    channel.basic_qos(0, 1, False)  # a stream consumer must set a prefetch
    newest: list[float] = []

    def take(message: Any) -> None:
        channel.basic_ack(message.delivery_tag)
        try:
            figure = json.loads(message.body)
            if figure["messages"] > 0 and figure["events"] >= 0:
                newest.append(figure["events"] / figure["messages"])
        except (ValueError, KeyError, TypeError, ZeroDivisionError):
            pass  # not a figure of ours: the next one may be

    tag = channel.basic_consume(stream, callback=take, arguments={"x-stream-offset": "last"})
    wait, deadline = READ_WAIT, time.monotonic() + 2 * READ_WAIT
    while (remaining := deadline - time.monotonic()) > 0:  # the last chunk's messages, the newest last
        try:
            connection.drain_events(timeout=min(wait, remaining))
        except socket.timeout:
            break
        wait = MORE_WAIT
    channel.basic_cancel(tag)
    channel.close()
    return newest[-1] if newest else None
