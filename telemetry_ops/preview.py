"""What this machine would send: the switch, the platform data, one example of each event."""

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
from tasks.deliver import to_message
from tasks.platform_info import platform_info

EXAMPLE_HEADERS = {"user-agent": "python-requests/2.31.0", "accept-language": "en-US,en;q=0.9"}
EXAMPLE_PROPERTIES: dict[str, dict[str, object]] = {
    USER_INFO_REQUESTED: {"is_default_user": True, **EXAMPLE_HEADERS},
    LOG_RECORDS_REQUESTED: {"task": "TextClassification", "records": 100},
    SERVER_ERROR_FOUND: {"code": "rubrix.api.errors::EntityNotFoundError", **EXAMPLE_HEADERS},
}


def preview(settings: Settings) -> dict[str, Any]:
    return {
        "telemetry": "on" if settings.enabled else "off",
        "decided_by": settings.decided_by,
        "endpoint": settings.endpoint,
        "platform": platform_info(),
        # Built and re-validated exactly as a hook and a worker do it.
        "examples": [to_message(validate_event(build_event(name, props)))
                     for name, props in EXAMPLE_PROPERTIES.items()],
    }
