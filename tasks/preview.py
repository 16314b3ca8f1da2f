"""What this machine would send as a server: the switch, its platform data, one example of each event."""

from __future__ import annotations

from typing import Any

from rubrix_hooks import message
from rubrix_hooks.contract import (
    EVENT_FIELDS,
    LOG_RECORDS_REQUESTED,
    SERVER_ERROR_FOUND,
    USER_INFO_REQUESTED,
    checked_values,
    new_message_id_prefix,
    timestamp_us,
)
from rubrix_hooks.platform_info import platform_info
from rubrix_hooks.settings import Settings
from tasks.deliver import to_message

EXAMPLE_HEADERS = {"user-agent": "python-requests/2.31.0", "accept-language": "en-US,en;q=0.9"}
EXAMPLE_PROPERTIES: dict[str, dict[str, object]] = {
    USER_INFO_REQUESTED: {"is_default_user": True, **EXAMPLE_HEADERS},
    LOG_RECORDS_REQUESTED: {"task": "TextClassification", "records": 100},
    SERVER_ERROR_FOUND: {"code": "rubrix.api.errors::EntityNotFoundError", **EXAMPLE_HEADERS},
}


def example_messages() -> list[dict[str, Any]]:
    """One message of each event, encoded as a server's publisher does and read back as a
    worker does, so that the preview shows exactly what would leave."""
    events = [[name, timestamp_us(), sequence, *checked_values(name, [props[field] for field in EVENT_FIELDS[name]])]
              for sequence, (name, props) in enumerate(EXAMPLE_PROPERTIES.items())]
    batch = message.read([], message.encode(platform_info(), new_message_id_prefix(), events))
    assert batch.platform is not None and not batch.dropped, batch.dropped
    return [to_message(event, batch.platform) for event in batch.events]


def preview(settings: Settings) -> dict[str, Any]:
    return {
        "telemetry": "on" if settings.enabled else "off",
        "decided_by": settings.decided_by,
        "endpoint": settings.endpoint,
        # This machine's, as its server would send them with every task message.
        "platform": platform_info(),
        "examples": example_messages(),
    }
