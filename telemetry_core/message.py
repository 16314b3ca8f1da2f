"""The task message from a server's publisher to the workers, in both directions.

Every message is a Celery task `telemetry.deliver_events` (protocol 2, JSON). Its format is
versioned so that server and workers can be upgraded one at a time: a worker reads every
format listed here, and a server writes only the newest.

Format 2 (this release), all in the task's kwargs:

    {"format": 2,
     "platform": {"version": ..., "python_version": ..., "system": ..., "sys_version": ...,
                  "machine": ..., "platform": ...},        # the server's, once per message
     "id_prefix": "0b8e5a4c-6f1d-4e2a-9c3b-",              # first 24 characters of a uuid4
     "events": [[event, timestamp_us, sequence, value, ...], ...]}

An event is its name, the moment its hook fired (integer microseconds since the epoch), a
counter, and its property values in the contract's order (`contract.EVENT_FIELDS`). Its
`messageId` is `id_prefix` followed by the counter as 12 hex digits: fixed when the server
first encodes it, kept across re-publishes, worker retries and redelivery. A worker's retry
re-sends the failed events in the same format with `"first_attempt_at"` added.

Every message of this release also carries the header EVENTS_HEADER: how many events it
holds (a retry: only the failed ones), so that a broker can count its backlog in events
without reading the bodies (`Broker.backlog`). A message without it (an older release's)
counts as `events_per_task` events.

Format 1 (release 0.1.0): args `[events]`, each `{"event", "messageId", "timestamp"
(ISO-8601), "properties"}`, no platform data; kwargs `{}` or `{"first_attempt_at": t}`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from telemetry_core.contract import (
    EVENT_FIELDS,
    EVENT_KEYS,
    InvalidEvent,
    checked_message_id_prefix,
    checked_platform,
    checked_sequence,
    checked_timestamp_us,
    checked_wire_event,
    iso_timestamp,
    message_id,
    validate_event,
)

FORMAT = 2
SUPPORTED_FORMATS = (1, 2)
# The task message header holding its number of events. Plain ASCII without quotes or
# spaces: the Redis broker finds it in the raw message JSON with a Lua pattern.
EVENTS_HEADER = "rubrix_telemetry_events"

WireEvent = list  # [event, timestamp_us, sequence, *values]
Event = dict  # Segment's shape: event, messageId, timestamp (ISO-8601), properties


def encode(platform: Mapping[str, str], id_prefix: str, events: list[WireEvent],
           first_attempt_at: float | None = None) -> dict[str, Any]:
    """The kwargs of one format-2 task message."""
    kwargs: dict[str, Any] = {"format": FORMAT, "platform": platform, "id_prefix": id_prefix, "events": events}
    if first_attempt_at is not None:
        kwargs["first_attempt_at"] = first_attempt_at
    return kwargs


def events_header(count: int) -> dict[str, int]:
    """The headers of a task message carrying `count` events (Celery's `headers=`)."""
    return {EVENTS_HEADER: count}


def header_events(headers: Mapping[str, Any] | None, default: int) -> int:
    """The events a message's headers say it carries; `default` when they say nothing usable."""
    value = (headers or {}).get(EVENTS_HEADER)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return default


def describe(kwargs: Mapping[str, Any]) -> str:
    """A short stand-in for the kwargs in Celery's `kwargsrepr` header, what Flower shows:
    how many events, and the messageIds of the first and the last. (Celery's own repr of
    500 events costs the server more than encoding them, and tells an operator less.)"""
    events, prefix = kwargs.get("events"), kwargs.get("id_prefix")
    if not isinstance(events, list) or not events or not isinstance(prefix, str):
        return f"{{'format': {kwargs.get('format')!r}, 'events': 0}}"
    first, last = (message_id(prefix, events[i][2]) for i in (0, -1))
    return f"{{'format': {kwargs.get('format')!r}, 'events': {len(events)}, 'messageIds': '{first} .. {last}'}}"


@dataclass
class ReceivedBatch:
    """What a worker takes out of one task message, every part re-checked against the contract."""

    format: int | None
    events: list[Event] = field(default_factory=list)
    # The server's platform data; None when the message carries none (format 1).
    platform: dict[str, str] | None = None
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    first_attempt_at: float | None = None
    # Builds the (args, kwargs) of a retry carrying only the given events, unchanged.
    _retry: Callable[[list[Event], dict[str, str], float], tuple[list[Any], dict[str, Any]]] | None = None

    def retry_message(self, events: list[Event], platform: dict[str, str],
                      first_attempt_at: float) -> tuple[list[Any], dict[str, Any]]:
        assert self._retry is not None
        return self._retry(events, platform, first_attempt_at)


def _first_attempt(kwargs: Mapping[str, Any]) -> float | None:
    value = kwargs.get("first_attempt_at")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _count_all(batch: ReceivedBatch, events: object, reason: str) -> ReceivedBatch:
    batch.dropped[reason] += len(events) if isinstance(events, list) else 1
    return batch


def _read_format_1(args: Sequence[Any], kwargs: Mapping[str, Any]) -> ReceivedBatch:
    raw = args[0] if args else kwargs.get("events")
    batch = ReceivedBatch(format=1, first_attempt_at=_first_attempt(kwargs))
    if not isinstance(raw, list):
        return _count_all(batch, None, "not a list of events")
    for item in raw:
        try:
            batch.events.append(validate_event(item))
        except InvalidEvent as error:
            batch.dropped[f"invalid: {error.reason}"] += 1

    def retry(events: list[Event], _platform: dict[str, str], started: float) -> tuple[list[Any], dict[str, Any]]:
        return [[{key: event[key] for key in EVENT_KEYS} for event in events]], {"first_attempt_at": started}

    batch._retry = retry
    return batch


def _read_format_2(kwargs: Mapping[str, Any]) -> ReceivedBatch:
    raw_events = kwargs.get("events")
    batch = ReceivedBatch(format=2, first_attempt_at=_first_attempt(kwargs))
    if not isinstance(raw_events, list):
        return _count_all(batch, None, "not a list of events")
    try:
        platform = kwargs.get("platform")
        batch.platform = None if platform is None else checked_platform(platform)
        prefix = checked_message_id_prefix(kwargs.get("id_prefix"))
    except InvalidEvent as error:
        # Without trustworthy platform data or ids, none of the message's events can be sent.
        return _count_all(batch, raw_events, f"invalid: {error.reason}")
    wire_by_id: dict[str, WireEvent] = {}
    for raw in raw_events:
        try:
            if not isinstance(raw, list) or len(raw) < 3:
                raise InvalidEvent("event is not [event, timestamp, sequence, values...]")
            # The publisher's own check: one set of rules on both sides of the broker.
            wire = checked_wire_event((raw[0], raw[1], *raw[3:]), checked_sequence(raw[2]))
            event = {
                "event": wire[0],
                "messageId": message_id(prefix, wire[2]),
                "timestamp": iso_timestamp(checked_timestamp_us(wire[1])),
                "properties": dict(zip(EVENT_FIELDS[wire[0]], wire[3:])),
            }
        except InvalidEvent as error:
            batch.dropped[f"invalid: {error.reason}"] += 1
            continue
        batch.events.append(event)
        wire_by_id[event["messageId"]] = wire

    def retry(events: list[Event], platform: dict[str, str], started: float) -> tuple[list[Any], dict[str, Any]]:
        return [], encode(platform, prefix, [wire_by_id[event["messageId"]] for event in events], started)

    batch._retry = retry
    return batch


def read(args: Sequence[Any], kwargs: Mapping[str, Any]) -> ReceivedBatch:
    """The events of one task message, whatever format it is in; what fails the contract is
    counted in `dropped` by reason, never raised."""
    message_format = kwargs.get("format", 1)
    if message_format == 1 and "format" not in kwargs:
        return _read_format_1(args, kwargs)
    if message_format == 2 and type(message_format) is int and not args:
        return _read_format_2(kwargs)
    # A newer server than this worker: its events cannot be read, and are counted.
    shown = message_format if isinstance(message_format, int) else "?"
    return _count_all(ReceivedBatch(format=None), kwargs.get("events"), f"unknown message format {shown}")
