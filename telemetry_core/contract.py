"""The event contract: the only data that may ever leave a Rubrix server.

Both sides import this module. The server's publisher checks every event with
`checked_wire_event` before it leaves the process; the worker checks it again when it takes it
off the queue (`telemetry_core.message`), so a producer (buggy, outdated or hostile) cannot
smuggle anything past it. Event names, property names and platform keys are Rubrix 0.18's,
which the maintainers' dashboards already use.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

# Celery task name: the hand-off point between the server's publisher and the workers.
DELIVER_TASK_NAME = "telemetry.deliver_events"

USER_INFO_REQUESTED = "UserInfoRequested"
LOG_RECORDS_REQUESTED = "LogRecordsRequested"
SERVER_ERROR_FOUND = "ServerErrorFound"

RUBRIX_TASKS = frozenset({"TextClassification", "TokenClassification", "Text2Text"})
# Rubrix's default user; only whether the caller is it is reported, never the name.
DEFAULT_USERNAME = "rubrix"

# Long enough for any real browser or SDK user-agent (typically < 200 characters), short
# enough that a header can never carry a payload out.
MAX_HEADER_LENGTH = 256
# Error codes look like `rubrix.api.errors::EntityNotFoundError`: a dotted class path.
MAX_CODE_LENGTH = 128
ERROR_CODE_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:(?:\.|::)[A-Za-z_][A-Za-z0-9_]*)*")
# JSON numbers are safe as integers up to 2**53; no bulk request comes near it.
MAX_RECORDS = 2**53 - 1
# `2026-11-27T23:40:41.123456+00:00` is 32 characters.
MAX_TIMESTAMP_LENGTH = 40
# Event times travel as integer microseconds since the epoch (cheap to take and to encode);
# anything outside 2000-2100 is not a time a hook took.
MIN_TIMESTAMP_US = 946_684_800 * 10**6
MAX_TIMESTAMP_US = 4_102_444_800 * 10**6
# Text a hook keeps for the publisher thread to check: enough for any value the rules then
# cut to MAX_HEADER_LENGTH, small enough that a full buffer stays a few tens of MB at most.
MAX_RAW_TEXT = MAX_HEADER_LENGTH * 4

# The platform data of the server, merged into every event's `context` (Rubrix 0.18's keys).
PLATFORM_KEYS = ("version", "python_version", "system", "sys_version", "machine", "platform")
# `platform.version()` on macOS is ~110 characters; nothing legitimate comes near 256.
MAX_PLATFORM_VALUE_LENGTH = 256

EVENT_KEYS = frozenset({"event", "messageId", "timestamp", "properties"})
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class InvalidEvent(ValueError):
    """An event, or one of its properties, is outside the contract. `reason` is short and fixed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Clean header values by raw value: a server sees the same few user-agents over and over,
# so the publisher thread pays for the cleaning once per distinct value, not per event.
_HEADER_CACHE: dict[str, str | None] = {}
_HEADER_CACHE_SIZE = 1024


def header_value(value: object) -> str | None:
    """A header as it may be sent: printable text of at most MAX_HEADER_LENGTH characters.

    Missing or non-text values become None rather than failing the event: a hook must
    not lose an event because a client sent an odd header.
    """
    # Exact str only (a subclass may override hashing and equality), and only short ones:
    # a hostile message must not be able to fill the cache with large strings.
    if type(value) is str and len(value) <= MAX_RAW_TEXT:
        try:
            return _HEADER_CACHE[value]
        except KeyError:
            pass
        cleaned = _clean_header(value)
        if len(_HEADER_CACHE) >= _HEADER_CACHE_SIZE:
            _HEADER_CACHE.clear()
        _HEADER_CACHE[value] = cleaned
        return cleaned
    return _clean_header(value)


def _clean_header(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = str.__str__(value)  # an exact str: a subclass may override any method we call
    # Lone surrogates (undecodable bytes) would break JSON encoders downstream.
    value = value[: MAX_HEADER_LENGTH * 4].encode("utf-8", "replace").decode("utf-8")
    value = _CONTROL_CHARACTERS.sub("", value).strip()
    return value[:MAX_HEADER_LENGTH] or None


# The rules below run for every event in the server's publisher thread: each starts with
# the common case (an exact str or int) so that a valid event costs a few type checks.

def _is_default_user(value: object) -> bool:
    if value is True or value is False:
        return value
    if not isinstance(value, bool):
        raise InvalidEvent("is_default_user is not a bool")
    return value


def _task_name(value: object) -> str:
    if type(value) is str and value in RUBRIX_TASKS:
        return value
    # Rubrix passes its TaskType, a str Enum: compare its value, never str(task).
    value = getattr(value, "value", value)
    if not isinstance(value, str):
        raise InvalidEvent("task is not a Rubrix task")
    # An exact str: a subclass could compare equal to anything and carry its own text
    # (a dataset name, say) out.
    value = str.__str__(value)
    if value not in RUBRIX_TASKS:
        raise InvalidEvent("task is not a Rubrix task")
    return value


def _record_count(value: object) -> int:
    if type(value) is int and 0 <= value <= MAX_RECORDS:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RECORDS:
        raise InvalidEvent("records is not a non-negative integer")
    return value


# Valid error codes seen so far: a server raises the same few over and over.
_KNOWN_CODES: set[str] = set()


def _error_code(value: object) -> str:
    if type(value) is str and value in _KNOWN_CODES:
        return value
    if not isinstance(value, str):
        raise InvalidEvent("code is not an error code")
    value = str.__str__(value)  # an exact str, whatever the subclass overrides
    if len(value) > MAX_CODE_LENGTH or not ERROR_CODE_PATTERN.fullmatch(value):
        raise InvalidEvent("code is not an error code")
    if len(_KNOWN_CODES) >= _HEADER_CACHE_SIZE:
        _KNOWN_CODES.clear()
    _KNOWN_CODES.add(value)
    return value


PropertyRule = Callable[[object], Any]

# Each event's properties: exactly these keys, each value passed through its rule.
EVENT_PROPERTIES: dict[str, dict[str, PropertyRule]] = {
    USER_INFO_REQUESTED: {
        "is_default_user": _is_default_user,
        "user-agent": header_value,
        "accept-language": header_value,
    },
    LOG_RECORDS_REQUESTED: {
        "task": _task_name,
        "records": _record_count,
    },
    SERVER_ERROR_FOUND: {
        "code": _error_code,
        "user-agent": header_value,
        "accept-language": header_value,
    },
}


def _checked_properties(event: str, properties: Mapping[str, object]) -> dict[str, Any]:
    rules = EVENT_PROPERTIES.get(event)
    if rules is None:
        raise InvalidEvent("unknown event")
    if set(properties) != set(rules):
        raise InvalidEvent("properties outside the contract")
    return {name: rule(properties[name]) for name, rule in rules.items()}


# Each event's properties in a fixed order: a message carries their values by position
# (cheaper to encode than a dict per event), and both sides rebuild the names from here.
EVENT_FIELDS: dict[str, tuple[str, ...]] = {event: tuple(rules) for event, rules in EVENT_PROPERTIES.items()}
_EVENT_RULES: dict[str, tuple[PropertyRule, ...]] = {
    event: tuple(rules.values()) for event, rules in EVENT_PROPERTIES.items()}


def _wire_encoder(event: str, rules: tuple[PropertyRule, ...]) -> Callable[[tuple[Any, ...], int], list[Any]]:
    """`(event, timestamp_us, *values), sequence` -> `[event, timestamp_us, sequence, *checked values]`.

    Written out per number of properties: on the server's hot path a loop over the rules
    costs several times the checks themselves.
    """
    if len(rules) == 2:
        first, second = rules

        def encode_two(raw: tuple[Any, ...], sequence: int) -> list[Any]:
            if len(raw) != 4:
                raise InvalidEvent("properties outside the contract")
            return [event, raw[1], sequence, first(raw[2]), second(raw[3])]

        return encode_two
    if len(rules) == 3:
        first, second, third = rules

        def encode_three(raw: tuple[Any, ...], sequence: int) -> list[Any]:
            if len(raw) != 5:
                raise InvalidEvent("properties outside the contract")
            return [event, raw[1], sequence, first(raw[2]), second(raw[3]), third(raw[4])]

        return encode_three
    raise AssertionError(f"no wire encoder for {len(rules)} properties")


_WIRE_ENCODERS = {event: _wire_encoder(event, rules) for event, rules in _EVENT_RULES.items()}


def checked_wire_event(raw: tuple[Any, ...], sequence: int) -> list[Any]:
    """A hook's raw event checked against the contract, as a format-2 message carries it.

    `raw` is `(event, timestamp_us, *property values in EVENT_FIELDS order)`, as the hooks
    buffer it; raises InvalidEvent when any part is outside the contract.
    """
    encoder = _WIRE_ENCODERS.get(raw[0]) if type(raw[0]) is str else None
    if encoder is None:
        raise InvalidEvent("unknown event")
    return encoder(raw, sequence)


def raw_text(value: object) -> object:
    """What a hook keeps of a header or an error code until the publisher thread checks it.

    Text is cut to MAX_RAW_TEXT (the buffer must stay bounded whatever a client sends);
    anything that is not text becomes None, which the rules then treat as they always do.
    """
    if type(value) is str:
        return value[:MAX_RAW_TEXT]
    if isinstance(value, str):
        return str.__str__(value)[:MAX_RAW_TEXT]  # the base method: no subclass code runs
    if isinstance(value, bytes):
        return bytes(value[:MAX_RAW_TEXT])
    return None


def timestamp_us() -> int:
    """Now, in integer microseconds since the epoch: what a hook stamps on its event."""
    return time.time_ns() // 1000


def checked_timestamp_us(value: object) -> int:
    if type(value) is not int or not MIN_TIMESTAMP_US <= value <= MAX_TIMESTAMP_US:
        raise InvalidEvent("timestamp is not a time")
    return value


def iso_timestamp(microseconds: int) -> str:
    """Segment's `timestamp`: ISO-8601 in UTC, to the microsecond."""
    moment = datetime.fromtimestamp(microseconds // 10**6, timezone.utc)
    return moment.replace(microsecond=microseconds % 10**6).isoformat(timespec="microseconds")


def new_message_id_prefix() -> str:
    """The first 24 characters of a random UUID: each event's messageId is this prefix and
    12 hex digits of a counter, so one random draw serves 2**48 events (a uuid4 per event
    costs the server several µs). 74 random bits keep prefixes of different processes apart."""
    return str(uuid.uuid4())[:24]


def message_id(prefix: str, sequence: int) -> str:
    return f"{prefix}{sequence:012x}"


def checked_message_id_prefix(value: object) -> str:
    if type(value) is not str or len(value) != 24 or value[-1] != "-":
        raise InvalidEvent("messageId prefix is not a UUID prefix")
    _message_id(message_id(value, 0))
    return value


MAX_SEQUENCE = 16**12 - 1


def checked_sequence(value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_SEQUENCE:
        raise InvalidEvent("messageId sequence is not a counter")
    return value


def encodes_as_utf8(text: str) -> bool:
    """False for a str holding a lone surrogate ("\\ud800", which JSON can carry as an escape):
    it would pass every other check, then fail the worker's encoding of the whole batch."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def platform_value(value: object) -> str:
    """A platform string as it may be sent: printable UTF-8 text, at most MAX_PLATFORM_VALUE_LENGTH."""
    text = str(value)
    if not encodes_as_utf8(text):  # undecodable bytes from the OS: as `header_value` does
        text = text.encode("utf-8", "replace").decode("utf-8")
    text = _CONTROL_CHARACTERS.sub("", text).strip()
    return text[:MAX_PLATFORM_VALUE_LENGTH] or "unknown"


def checked_platform(raw: object) -> dict[str, str]:
    """The server's platform data, exactly PLATFORM_KEYS, each a short printable UTF-8 string."""
    if not isinstance(raw, Mapping) or set(raw) != set(PLATFORM_KEYS):
        raise InvalidEvent("platform data outside the contract")
    checked = {}
    for key in PLATFORM_KEYS:
        value = raw[key]
        if type(value) is not str or not value or len(value) > MAX_PLATFORM_VALUE_LENGTH \
                or _CONTROL_CHARACTERS.search(value) or not encodes_as_utf8(value):
            raise InvalidEvent("platform data outside the contract")
        checked[key] = value
    return checked


def _message_id(value: object) -> str:
    if not isinstance(value, str) or len(value) != 36:
        raise InvalidEvent("messageId is not a UUID")
    try:
        if str(uuid.UUID(value)) != value:
            raise ValueError
    except ValueError:
        raise InvalidEvent("messageId is not a UUID") from None
    return value


def _timestamp(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_TIMESTAMP_LENGTH:
        raise InvalidEvent("timestamp is not an ISO-8601 time")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidEvent("timestamp is not an ISO-8601 time") from None
    if moment.tzinfo is None:
        raise InvalidEvent("timestamp has no time zone")
    return moment.astimezone(timezone.utc).isoformat()


def validate_event(raw: object) -> dict[str, Any]:
    """An event in Segment's shape (`event`, `messageId`, `timestamp`, `properties`), rebuilt
    from the contract alone, or InvalidEvent: never a field more. Format 1 messages carry
    events in this shape."""
    if not isinstance(raw, Mapping):
        raise InvalidEvent("event is not an object")
    if set(raw) != EVENT_KEYS:
        raise InvalidEvent("event fields outside the contract")
    event, properties = raw["event"], raw["properties"]
    if not isinstance(event, str) or event not in EVENT_PROPERTIES:
        raise InvalidEvent("unknown event")
    if not isinstance(properties, Mapping):
        raise InvalidEvent("properties is not an object")
    return {
        "event": event,
        "messageId": _message_id(raw["messageId"]),
        "timestamp": _timestamp(raw["timestamp"]),
        "properties": _checked_properties(event, properties),
    }
