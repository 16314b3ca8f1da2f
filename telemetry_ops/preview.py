"""What this machine would send: the switch, the platform data, one example of each event.

Preview only reads: it creates neither the installation id nor the embedded queue's
folders (a worker does, when it delivers), so it does not import the worker's app.
"""

from __future__ import annotations

from typing import Any

from rubrix_hooks.contract import (
    LOG_RECORDS_REQUESTED,
    SERVER_ERROR_FOUND,
    USER_INFO_REQUESTED,
    build_event,
    validate_event,
)
from rubrix_hooks.settings import Settings
from tasks.installation_id import stored_installation_id
from tasks.platform_info import platform_info

EXAMPLE_HEADERS = {"user-agent": "python-requests/2.31.0", "accept-language": "en-US,en;q=0.9"}
EXAMPLE_PROPERTIES: dict[str, dict[str, object]] = {
    USER_INFO_REQUESTED: {"is_default_user": True, **EXAMPLE_HEADERS},
    LOG_RECORDS_REQUESTED: {"task": "TextClassification", "records": 100},
    SERVER_ERROR_FOUND: {"code": "rubrix.api.errors::EntityNotFoundError", **EXAMPLE_HEADERS},
}
# Shown as the anonymousId until the first delivery has created the installation id.
ID_NOT_CREATED_YET = "(not created yet: the first delivery creates it)"


def example_message(event: dict[str, Any], anonymous_id: str) -> dict[str, Any]:
    """The message a worker sends for `event` (tasks.deliver.to_message builds it there;
    tests/test_cli.py checks that both agree), with the installation id given, not created."""
    return {
        "type": "track",
        "event": event["event"],
        "anonymousId": anonymous_id,
        "messageId": event["messageId"],
        "timestamp": event["timestamp"],
        "properties": event["properties"],
        "context": platform_info(),
    }


def preview(settings: Settings) -> dict[str, Any]:
    stored_id = stored_installation_id(settings.data_dir)
    return {
        "telemetry": "on" if settings.enabled else "off",
        "decided_by": settings.decided_by,
        "endpoint": settings.endpoint,
        "installation_id": stored_id,
        "platform": platform_info(),
        # Built and re-validated exactly as a hook and a worker do it.
        "examples": [example_message(validate_event(build_event(name, props)), stored_id or ID_NOT_CREATED_YET)
                     for name, props in EXAMPLE_PROPERTIES.items()],
    }
