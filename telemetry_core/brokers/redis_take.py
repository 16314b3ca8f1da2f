"""The worker's Redis channel: many messages per round trip, none lost to a killed worker.

kombu's Redis transport takes one message per `BRPOP`, records it in the hash `unacked` with a
second round trip, and acknowledges it with a third. On a quiet server every event is a task
message of its own, so a drain of 20,000 one-event messages was 60,000 round trips made by the
one thread of the worker that consumes (Celery's event loop), and that thread set the pace.
Between the `BRPOP` and the record, a message belonged to nobody: a worker killed there lost it.

Here, a channel that consumes one queue:

- **takes** up to `TAKE_BATCH` messages (never beyond the prefetch limit) with one Lua script
  that pops them and records each in `unacked` and `unacked_index` as kombu does, in one
  atomic step: a message is in the queue or in `unacked`, never in neither;
- **waits** while the queue is empty with `BLMOVE queue queue RIGHT RIGHT`, which blocks until
  a message arrives and takes nothing (it moves the oldest message to where it was); the next
  round trip takes;
- **acknowledges** at the end of each turn of the event loop, with one pipeline for every
  message acknowledged in that turn. A worker killed before that write leaves those messages in
  `unacked`: they come back after the visibility timeout and are delivered again under the
  same messageIds (at least once, as before).

While the worker's breaker probes a failing backend, a take is one message (`set_probing`).

kombu's own path stays for what this does not cover: several queues on one channel, a
`global_keyprefix`, a consumer that does not acknowledge (kombu records nothing for it), no
event loop (acknowledged one by one), and a Redis that refuses the script or `BLMOVE` (before
6.2): the channel says so once and goes on with `BRPOP`.
"""

from __future__ import annotations

import collections
import logging
from queue import Empty
from time import monotonic, time
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, redis, virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

log = logging.getLogger("telemetry_core.brokers.redis")

# Messages per take. A take of 64 one-event messages (1.7 KB each) holds Redis for well under a
# millisecond; the prefetch limit (2 x the pool's 128 threads) caps it further.
TAKE_BATCH = 64

# KEYS: the queue's lists, highest priority first; then `unacked` and `unacked_index`.
# ARGV: how many to take, the time to record them at.
# Returns [recorded, message, recorded, message, ...]: recorded is 1 when the message is now in
# `unacked` under its delivery tag, 0 when it could not be read here (it is handed over as kombu
# would, and recorded there if kombu can read it).
TAKE_SCRIPT = """
local unacked, index = KEYS[#KEYS - 1], KEYS[#KEYS]
local wanted, now = tonumber(ARGV[1]), ARGV[2]
local taken = {}
for k = 1, #KEYS - 2 do
    while #taken < 2 * wanted do
        local raw = redis.call('RPOP', KEYS[k])
        if not raw then break end
        local ok, message = pcall(cjson.decode, raw)
        local properties = ok and type(message) == 'table' and message.properties
        local tag = type(properties) == 'table' and properties.delivery_tag
        local info = type(properties) == 'table' and properties.delivery_info
        if type(tag) == 'string' and type(info) == 'table' then
            -- kombu's own record (QoS.append): [message, exchange, routing_key], the message as it was
            redis.call('ZADD', index, now, tag)
            redis.call('HSET', unacked, tag,
                       '[' .. raw .. ',' .. cjson.encode(info.exchange or '') .. ',' ..
                       cjson.encode(info.routing_key or '') .. ']')
            taken[#taken + 1] = 1
        else
            taken[#taken + 1] = 0
        end
        taken[#taken + 1] = raw
    end
end
return taken
"""

_WAIT, _TAKE = "BLMOVE", "EVAL"

# Messages per take now: TAKE_BATCH, or 1 while the worker's breaker probes a failing backend
# (set_probing): a probe that took 64 messages failed all 64, and each became a retry held in
# the worker's memory (+120 MB in a minute's outage, against +80 MB taking one at a time).
_take_batch = TAKE_BATCH


def set_probing(probing: bool) -> None:
    """One message per take while the backend fails; TAKE_BATCH once a delivery succeeded."""
    global _take_batch
    _take_batch = 1 if probing else TAKE_BATCH


class QoS(redis.QoS):
    """kombu's QoS, for messages the take script already recorded, and with acknowledgements
    written once per turn of the event loop when the channel has one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded_by_take: set[str] = set()
        # Acknowledged, not yet removed from `unacked`. A deque: acks may come from any thread.
        self._pending_acks: collections.deque[str] = collections.deque()

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded_by_take:
            self.recorded_by_take.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)  # in flight, counted against the prefetch
            return
        super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        if not getattr(self.channel.connection, "acks_each_turn", False):
            super().ack(delivery_tag)
            return
        self._pending_acks.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def flush_acks(self) -> None:
        """Removes every acknowledged message from `unacked`, in one round trip."""
        tags: list[str] = []
        while self._pending_acks:
            try:
                tags.append(self._pending_acks.popleft())
            except IndexError:  # another thread took the last one meanwhile
                break
        if not tags:
            return
        try:
            with self.channel.conn_or_acquire() as client:
                with client.pipeline() as pipe:
                    pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        except Exception as error:  # noqa: BLE001 (a lost connection: Celery reconnects)
            log.warning("telemetry: could not acknowledge %d messages (%s): they come back after the visibility "
                        "timeout and are delivered again under the same messageIds", len(tags), type(error).__name__)


class _TakesManyMessages:
    """What the worker's channel changes in kombu's Redis channel (a mixin: kombu has one
    channel class for Redis and one for Sentinel)."""

    QoS = QoS
    _sent: str | None = None  # what is in flight on the polling connection: _WAIT, _TAKE or kombu's BRPOP
    _sent_for = ""  # the queue it was sent for: the consumer may be cancelled meanwhile (the breaker's pause)
    _messages_waiting = True  # start by taking: a worker usually starts on a backlog
    _take_refused = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Queues consumed without acknowledgements (a `status` reply, a broadcast): kombu records
        # nothing for them, and neither may the take, or they would wait in `unacked` and come back.
        self._no_ack_queues: set[str] = set()
        super().__init__(*args, **kwargs)

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        (self._no_ack_queues.add if no_ack else self._no_ack_queues.discard)(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)  # type: ignore[misc]

    def _own_path(self) -> bool:
        return (not self._take_refused and not self.global_keyprefix and len(self.active_queues) == 1
                and next(iter(self.active_queues)) not in self._no_ack_queues)

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self._own_path():
            self._sent = None
            return super()._brpop_start(timeout)  # type: ignore[misc]
        queue = self._sent_for = next(iter(self.active_queues))
        connection = self.client.connection
        if self._messages_waiting:
            batch = _take_batch
            room = self.qos.can_consume_max_estimate() if self.qos.prefetch_count else batch
            wanted = max(1, min(batch, room))
            keys = [self._q_for_pri(queue, priority) for priority in self.priority_steps]
            keys = list(dict.fromkeys(keys))  # priority steps that name the same list
            command = [_TAKE, TAKE_SCRIPT, len(keys) + 2, *keys, self.unacked_key, self.unacked_index_key,
                       wanted, time()]
            self._sent = _TAKE
        else:
            wait = self.brpop_timeout if timeout is None else timeout
            command = [_WAIT, queue, queue, "RIGHT", "RIGHT", wait or 0]
            self._sent = _WAIT
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        connection.send_command(*command)

    def _brpop_read(self, **options: Any) -> bool:
        sent, self._sent = self._sent, None
        if sent is None:
            return super()._brpop_read(**options)  # type: ignore[misc]
        # Delivered to that queue even if its consumer was cancelled meanwhile: kombu then puts the
        # message back (Transport._deliver rejects it with requeue), as it does with a BRPOP's.
        queue = self._sent_for
        try:
            try:
                reply = self.client.parse_response(self.client.connection, sent, **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next turn reconnects, as kombu does
                raise
            except self.ResponseError as error:  # no BLMOVE (Redis < 6.2), no Lua, no cjson ...
                self._take_refused = True
                log.warning("telemetry: Redis refused the worker's batched take (%s); taking one message per BRPOP "
                            "as kombu does", str(error).splitlines()[0])
                raise Empty() from None
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()
        if sent == _WAIT:
            # A message arrived (it is still in the queue), or the wait timed out: take at the next
            # turn (a timed-out wait also lets the take look at the queue's priority lists).
            self._messages_waiting = True
            raise Empty()
        pairs = list(zip(reply[0::2], reply[1::2]))
        self._messages_waiting = len(pairs) > 0
        if not pairs:
            raise Empty()
        for recorded, raw in pairs:
            try:
                message = loads(bytes_to_str(raw))
            except ValueError:  # not JSON: kombu's BRPOP would have lost it too, with a traceback
                log.warning("telemetry: dropped a message in queue %s that is not JSON (%d bytes)", queue, len(raw))
                continue
            if recorded:
                self.qos.recorded_by_take.add(message["properties"]["delivery_tag"])
            self.connection._deliver(message, queue)
        return True

    def close(self) -> None:
        if not self.closed:
            qos = self.__dict__.get("_qos")
            if qos is not None:
                qos.flush_acks()
            self._read_reply_in_flight()
        super().close()  # type: ignore[misc]

    def _read_reply_in_flight(self) -> None:
        """Reads the reply to the take, wait or BRPOP in flight, as kombu's close does first
        (kombu PR #1733: messages a BRPOP popped are delivered, and so restored), but a lost
        connection ends only that read, not the close.

        kombu lets the read's connection error out of `close()` before the channel is marked
        closed. After a connection error Celery (Consumer.on_connection_error_after_connected)
        calls `connection.collect()`, which swallows that error, then closes the transport's
        channels newest first and stops at the first that fails (the remote control's: its fanout
        queue cannot be deleted), and releases the transport (`transport.client = None`); then
        `connection.close()` closes this channel again. That second close goes through and
        restores the unacknowledged messages with a new redis pool (the close has just dropped
        the old one), whose parameters come from `transport.client`: "AttributeError: 'NoneType'
        object has no attribute 'hostname'" (the symptom of kombu#582), which is no connection
        error, so the worker stopped: "Unrecoverable error". It took messages not yet
        acknowledged and a reply still in flight when Redis went away: a worker waiting for more
        messages (BLMOVE, or kombu's BRPOP) while its deliveries run, or a take crossing the
        server's shutdown.

        With the read ended here, the close goes on within `collect()`, while the transport is
        still there: the restore fails on the stopped Redis (Celery ignores that) or succeeds on
        one already back. Messages it could not restore stay in `unacked` (kombu records them
        there, the take script too) and come back after the visibility timeout; a message popped
        by a BRPOP whose reply is lost is lost, as in kombu.
        """
        if not self._in_poll:
            return
        try:
            self._brpop_read()  # ours or kombu's: either clears `_in_poll`
        except Empty:
            pass
        except self.connection_errors as error:
            log.debug("telemetry: closing a channel whose connection is gone (%s)", type(error).__name__)


class Channel(_TakesManyMessages, redis.Channel):
    pass


class SentinelChannel(_TakesManyMessages, redis.SentinelChannel):
    pass


class _AcksEachTurn:
    """The transport flushes its channels' acknowledgements at every turn of the event loop."""

    acks_each_turn = False

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)  # type: ignore[misc]
        self.acks_each_turn = True
        # After a reconnection the loop holds the previous transport's flush: it goes, or every
        # reconnection would keep one more transport alive and called at every turn.
        loop.on_tick.discard(getattr(loop, "_telemetry_flush_acks", None))
        loop._telemetry_flush_acks = self._flush_acks
        loop.on_tick.add(self._flush_acks)

    def _flush_acks(self) -> None:
        for channel in list(self.cycle._channels):  # type: ignore[attr-defined]
            qos = channel.__dict__.get("_qos")
            if isinstance(qos, QoS):
                qos.flush_acks()


class Transport(_AcksEachTurn, redis.Transport):
    Channel = Channel


class SentinelTransport(_AcksEachTurn, redis.SentinelTransport):
    Channel = SentinelChannel


def use_in_this_process() -> None:
    """kombu resolves the Redis schemes to these transports from now on, in this process (the
    worker's app calls it as it is imported: a server publishes with kombu's own). Before any
    connection resolves them: kombu keeps the class it resolved for a scheme."""
    TRANSPORT_ALIASES.update({"redis": f"{__name__}:Transport", "rediss": f"{__name__}:Transport",
                              "sentinel": f"{__name__}:SentinelTransport"})
