"""The event contract: the only data that may ever leave a Rubrix server.

Both sides import this module. The server's hooks build events with `build_event`; the
worker re-checks every event it takes off the queue with `validate_event`, so a producer
(buggy, outdated or hostile) cannot smuggle anything past it. Event names and property
names are Rubrix 0.18's, which the maintainers' dashboards already use.
"""

from __future__ import annotations

import re
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

EVENT_KEYS = frozenset({"event", "messageId", "timestamp", "properties"})
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class InvalidEvent(ValueError):
    """An event, or one of its properties, is outside the contract. `reason` is short and fixed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def header_value(value: object) -> str | None:
    """A header as it may be sent: printable text of at most MAX_HEADER_LENGTH characters.

    Missing or non-text values become None rather than failing the event: a hook must
    not lose an event because a client sent an odd header.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = str.__str__(value)  # an exact str: a subclass may override any method we call
    # Lone surrogates (undecodable bytes) would break JSON encoders downstream.
    value = value[: MAX_HEADER_LENGTH * 4].encode("utf-8", "replace").decode("utf-8")
    value = _CONTROL_CHARACTERS.sub("", value).strip()
    return value[:MAX_HEADER_LENGTH] or None


def _is_default_user(value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidEvent("is_default_user is not a bool")
    return value


def _task_name(value: object) -> str:
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
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RECORDS:
        raise InvalidEvent("records is not a non-negative integer")
    return value


def _error_code(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidEvent("code is not an error code")
    value = str.__str__(value)  # an exact str, whatever the subclass overrides
    if len(value) > MAX_CODE_LENGTH or not ERROR_CODE_PATTERN.fullmatch(value):
        raise InvalidEvent("code is not an error code")
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


def build_event(event: str, properties: Mapping[str, object]) -> dict[str, Any]:
    """A new event, stamped with its permanent messageId and the time it happened."""
    return {
        "event": event,
        "messageId": str(uuid.uuid4()),
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "properties": _checked_properties(event, properties),
    }


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
    """The event rebuilt from the contract alone, or InvalidEvent: never a field more."""
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
