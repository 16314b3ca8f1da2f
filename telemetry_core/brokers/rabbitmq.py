"""RabbitMQ as the broker (`amqp://`, `amqps://`): the telemetry queue's declaration, its type
and its depth; publisher confirms; and the deployment id, kept in a stream of the vhost.
RabbitMQ stores no values, so each worker keeps its delivery counts in its own data folder.

The backlog can only be estimated here: a passive declare tells the messages ready in the
queue, not the events they carry (reading a header means consuming the message), nor the
messages workers hold. `RabbitMQBroker.backlog` counts the ready messages times the mean
events per message of what this process published lately, or, in a process that publishes
nothing (`status`, `preview`, the metrics), of what a server shared in a stream
(`rabbitmq_sizes`): a quiet server's one-event messages are no longer read as 500 events
each. Without either, each counts as `events_per_task`: an upper bound. All are blind to what
workers hold. No byte figure: AMQP reports none (`backlog_bytes` is None).
RabbitMQ's own bound (`x-max-length-bytes`, `x-overflow: reject-publish`) is not declared:
it counts bytes, not events, and a queue argument is fixed at the first declare (the README,
Brokers, says why, and how an operator can add it as a policy).

Server, workers and `status` declare the queue alike, with `RUBRIX_TELEMETRY_QUEUE_TYPE`
(`x-queue-type`). RabbitMQ refuses to re-declare an existing queue with another type
(PRECONDITION_FAILED, "inequivalent arg 'x-queue-type'"); `mismatch_message` turns that
refusal into one line naming the variable. kombu is imported inside the functions: a
server that never publishes never loads it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
import uuid
from typing import Any

from telemetry_core.brokers import rabbitmq_sizes
from telemetry_core.brokers.base import Broker, BrokerRefusedWorker, PublishUnconfirmed, QueueMisconfigured, QueueState
from telemetry_core.settings import Settings

log = logging.getLogger("telemetry_core.brokers.rabbitmq")

# The stream that holds the deployment id: its first message that is a UUID.
DEPLOYMENT_ID_STREAM = "rubrix-telemetry.deployment-id"
# How long a reader waits for the stream's first message before it counts the stream as
# empty. Only the first workers of a new deployment wait it out; a wrong "empty" costs one
# more message in the stream, never a second id.
EMPTY_STREAM_WAIT = 0.5
# How long to keep trying while the stream starts (just created, or after a broker restart).
STREAM_START_WAIT = 10.0

_CURRENT_TYPE = re.compile(r"current is (?:the value '(?P<type>\w+)'|none)")


class QueueTypeMismatch(QueueMisconfigured):
    """The queue exists on the broker with another type than RUBRIX_TELEMETRY_QUEUE_TYPE."""


def queue_arguments(settings: Settings) -> dict[str, Any]:
    # Classic is declared without the argument, as Celery and release 0.1.0 always did, so
    # that queues created by either stay equivalent.
    return {"x-queue-type": "quorum"} if settings.queue_type == "quorum" else {}


def task_queues(settings: Settings) -> list[Any]:
    """Celery's `task_queues`: the telemetry queue, of the configured type.

    Its exchange stays direct, also for a quorum queue, so Celery does not use its "native
    delayed delivery" for retries: measured with kombu 5.7, a countdown under 1 s there
    raises ValueError and the retry's events are dropped. A retry then waits in the worker,
    as on a classic queue, within RUBRIX_TELEMETRY_CONSUMER_TIMEOUT.
    """
    from kombu import Queue

    return [Queue(settings.queue, routing_key=settings.queue, queue_arguments=queue_arguments(settings) or None)]


def mismatch_message(error: BaseException, settings: Settings) -> str | None:
    """The one line for a broker's refusal of our queue's type; None for any other error."""
    text = str(getattr(error, "reply_text", "") or error)
    if "PRECONDITION_FAILED" not in text or "x-queue-type" not in text:
        return None
    found = _CURRENT_TYPE.search(text)
    current = (found.group("type") or "classic") if found else "another"
    return (f"the queue {settings.queue!r} exists on the broker as a {current} queue, but "
            f"RUBRIX_TELEMETRY_QUEUE_TYPE is {settings.queue_type}: set RUBRIX_TELEMETRY_QUEUE_TYPE={current}, "
            f"or delete the queue (once empty) to re-create it")


def _connection(settings: Settings, timeout: float) -> Any:
    from kombu import Connection

    # read/write timeouts bound every wait on the socket, the handshake's and the declares';
    # one attempt only (kombu would otherwise try three times).
    connection = Connection(settings.broker_url_or_default, connect_timeout=timeout, heartbeat=0,
                            transport_options={"read_timeout": timeout, "write_timeout": timeout})
    connection.ensure_connection(max_retries=0)
    return connection


def _declare(connection: Any, settings: Settings) -> None:
    from amqp.exceptions import PreconditionFailed

    channel = connection.channel()
    try:
        # As Celery declares it (durable, not auto-deleted), with our type.
        channel.queue_declare(settings.queue, durable=True, auto_delete=False,
                              arguments=queue_arguments(settings))
    except PreconditionFailed as error:
        message = mismatch_message(error, settings)
        if message is None:
            raise
        raise QueueTypeMismatch(message) from None


def ensure_queue(settings: Settings, timeout: float) -> None:
    """Declares the queue with the configured type; raises QueueTypeMismatch if it exists
    with another one."""
    with _connection(settings, timeout) as connection:
        _declare(connection, settings)


def queue_depth(settings: Settings, timeout: float) -> int:
    """Task messages ready in the queue (0 when it does not exist yet), asked with a passive
    declare; raises QueueTypeMismatch when the queue exists with another type."""
    from amqp.exceptions import NotFound

    with _connection(settings, timeout) as connection:
        try:
            _, depth, _ = connection.channel().queue_declare(settings.queue, passive=True)
        except NotFound:
            return 0
        # The queue exists: re-declaring it with our arguments creates nothing, and tells
        # whether its type is the one configured.
        _declare(connection, settings)
        return int(depth)


# This process's connection for the publisher's backlog check, before every publish: one
# connection per process (never shared across a fork), opened again after any error.
_backlog_channels: dict[tuple[int, str], tuple[Any, Any]] = {}


def ready_messages(settings: Settings, timeout: float) -> int:
    """Task messages ready in the queue (0 when it does not exist yet), by a passive declare on
    this process's own connection; raises when the broker does not answer."""
    from amqp.exceptions import NotFound

    key = (os.getpid(), settings.broker_url_or_default)
    connection, channel = _backlog_channels.pop(key, (None, None))
    try:
        if connection is None:
            connection = _connection(settings, timeout)
        if channel is None:
            channel = connection.channel()
        try:
            _, ready, _ = channel.queue_declare(settings.queue, passive=True)
        except NotFound:
            channel = None  # the broker closed it: a fresh one for the next look
            ready = 0
    except Exception:
        if connection is not None:
            connection.collect()  # drops the socket without a closing handshake
        raise
    _backlog_channels[key] = (connection, channel)
    return int(ready)


def shared_deployment_id(settings: Settings, offered: str, timeout: float) -> str:
    """The deployment id on RabbitMQ, which keeps no values but keeps streams: the first id in
    the durable stream DEPLOYMENT_ID_STREAM of the vhost. Every worker reads the stream from
    its start, so all agree; a worker that finds it empty appends `offered` (confirmed by the
    broker) and reads again: several doing so at once all read the same first message.
    `timeout` bounds each connection and read. Streams need RabbitMQ 3.9 or later; an older
    one raises, as an unreachable one does."""
    deadline = time.monotonic() + STREAM_START_WAIT
    while True:
        try:
            return _read_or_offer_id(settings, offered, timeout)
        except _StreamStarting as starting:
            if time.monotonic() + 0.2 >= deadline:
                raise starting.__cause__ from None
            time.sleep(0.2)


class _StreamStarting(Exception):
    """The stream answered as one still starting (`_stream_starting`): worth another try."""


def _stream_starting(error: BaseException) -> bool:
    """Whether a broker's error is one a starting stream gives.

    Measured on RabbitMQ 3.10 while the declared stream starts: 541 INTERNAL_ERROR and 406
    "does not have a replica on the local node" from basic.consume just after it is created,
    404 "home node ... is down or inaccessible" from the declare or the consume after a
    broker restart. Anything else is final at once: an access refusal (403), a queue of
    another type holding the name, a RabbitMQ before 3.9, which has no streams.
    """
    code = getattr(error, "reply_code", None)
    text = str(getattr(error, "reply_text", "") or error)
    return (code == 541 or (code == 406 and "replica on the local node" in text)
            or (code == 404 and "home node" in text))


def stored_deployment_id(settings: Settings, timeout: float) -> str | None:
    """The stream's id, if it has one; only reads (a passive declare: no stream is created)."""
    from amqp.exceptions import NotFound

    with _connection(settings, timeout) as connection:
        try:
            connection.channel().queue_declare(DEPLOYMENT_ID_STREAM, passive=True)
        except NotFound:
            return None
        return _first_id(connection, EMPTY_STREAM_WAIT)


def _read_or_offer_id(settings: Settings, offered: str, timeout: float) -> str:
    from amqp import Message
    from amqp.exceptions import ChannelError, InternalError

    with _connection(settings, timeout) as connection:
        channel = connection.channel()
        try:
            channel.queue_declare(DEPLOYMENT_ID_STREAM, durable=True, auto_delete=False,
                                  arguments={"x-queue-type": "stream"})
            found = _first_id(connection, EMPTY_STREAM_WAIT)
            if found is None:
                channel.basic_publish_confirm(Message(offered, delivery_mode=2, content_type="text/plain"),
                                              exchange="", routing_key=DEPLOYMENT_ID_STREAM, timeout=timeout,
                                              confirm_timeout=timeout)
                found = _first_id(connection, timeout)
        except (ChannelError, InternalError) as error:
            # Retried only while the stream starts: a user refused the read (403) would
            # otherwise wait the whole STREAM_START_WAIT on every ask.
            if _stream_starting(error):
                raise _StreamStarting() from error
            raise
        if found is None:
            raise TimeoutError(f"no id read from the stream {DEPLOYMENT_ID_STREAM!r} within {timeout:g}s")
        return found


def _first_id(connection: Any, wait: float) -> str | None:
    """The stream's first message that is a UUID, or None if none came within `wait` seconds."""
    channel = connection.channel()
    # One message at a time: a stream refuses rejects, and a consumer cancelled with more
    # deliveries under way would reject them.
    channel.basic_qos(0, 1, False)
    found: list[str] = []

    def take(message: Any) -> None:
        body = message.body.decode("ascii", "replace") if isinstance(message.body, bytes) else str(message.body)
        try:
            found.append(str(uuid.UUID(body.strip())))
        except ValueError:
            channel.basic_ack(message.delivery_tag)  # not an id: on to the next message

    tag = channel.basic_consume(DEPLOYMENT_ID_STREAM, callback=take, arguments={"x-stream-offset": "first"})
    deadline = time.monotonic() + wait
    while not found and (remaining := deadline - time.monotonic()) > 0:
        try:
            connection.drain_events(timeout=remaining)
        except socket.timeout:
            break
    channel.basic_cancel(tag)
    channel.close()
    return found[0] if found else None


class RabbitMQBroker(Broker):
    label = "RabbitMQ"
    keeps_deployment_id = True

    def check_settings(self) -> None:
        pass  # both queue types are RabbitMQ's

    def redelivery_limit(self) -> tuple[str, float]:
        # RabbitMQ closes the channel of a worker holding a delivery longer (celery#6760).
        return "RUBRIX_TELEMETRY_CONSUMER_TIMEOUT", self.settings.consumer_timeout

    def publisher_transport_options(self) -> dict[str, Any]:
        # Publisher confirms: a publish returns only once the broker has the message;
        # unconfirmed, a blocked or failing broker can lose it without a word.
        return {"confirm_publish": True}

    def publish_bounds(self) -> dict[str, float]:
        # A broker that blocks publishers (memory or disk alarm) stops reading: the write and
        # the wait for the confirm each give up after the publish timeout.
        return {"timeout": self.settings.publish_timeout, "confirm_timeout": self.settings.publish_timeout}

    def task_queues(self) -> list[Any]:
        return task_queues(self.settings)

    def prepare_worker(self, timeout: float) -> None:
        """The queue declared with its type (QueueTypeMismatch when it exists with another),
        and the credentials and vhost checked (BrokerRefusedWorker: ACCESS_REFUSED, NOT_ALLOWED)."""
        from amqp.exceptions import AccessRefused, NotAllowed

        try:
            ensure_queue(self.settings, timeout)
        except QueueTypeMismatch:
            raise
        except Exception as error:  # noqa: BLE001 (an unreachable broker is Celery's to retry)
            seen: BaseException | None = error
            while seen is not None:  # kombu re-raises py-amqp's error as its own, the original as the cause
                if isinstance(seen, (AccessRefused, NotAllowed)):
                    raise BrokerRefusedWorker(str(seen) or type(seen).__name__) from None
                seen = seen.__cause__ or seen.__context__
            log.debug("telemetry: could not check the queue before start: %r", error)

    def explain_publish_error(self, error: Exception) -> Exception | None:
        # py-amqp: socket.timeout waiting for the confirm, "basic_publish: timed out" writing.
        if any(isinstance(e, (socket.timeout, TimeoutError)) or "timed out" in str(e)
               for e in (error, error.__cause__) if e is not None):
            return PublishUnconfirmed(f"not confirmed within {self.settings.publish_timeout:g}s")
        mismatch = mismatch_message(error, self.settings)
        return None if mismatch is None else QueueTypeMismatch(mismatch)

    def queue_state(self, timeout: float) -> QueueState:
        super().queue_state(timeout)  # does it answer at all
        try:
            return QueueState(depth=queue_depth(self.settings, timeout))
        except QueueTypeMismatch as error:
            return QueueState(problem=str(error))

    def backlog(self, timeout: float, under: int | None = None) -> int | None:
        # An estimate (see the module's docstring): ready messages times what one carries.
        ready = ready_messages(self.settings, timeout)
        if not ready:
            return 0
        mean = rabbitmq_sizes.events_per_message(self.settings, lambda: _connection(self.settings, timeout))
        return ready * self.settings.events_per_task if mean is None else math.ceil(ready * mean)

    def message_published(self, events: int) -> None:
        rabbitmq_sizes.record_publish(self.settings, events,
                                      lambda: _connection(self.settings, self.settings.publish_timeout))

    def backlog_method(self) -> str:
        return ("an estimate: ready messages times the mean events per message of this process's last "
                f"{rabbitmq_sizes.RECENT_PUBLISHES} publishes, or (a process that publishes none) of the newest "
                f"figure a server shared in the stream {rabbitmq_sizes.SIZES_STREAM.format(queue=self.settings.queue)}, "
                "else RUBRIX_TELEMETRY_EVENTS_PER_TASK (an upper bound); messages workers hold are not seen")

    def shared_deployment_id(self, offered: str, timeout: float) -> str:
        return shared_deployment_id(self.settings, offered, timeout)

    def stored_deployment_id(self, timeout: float) -> str | None:
        return stored_deployment_id(self.settings, timeout)
