"""What this machine would send as a server: the switch, its platform data, one example of each event.

Preview only reads: it creates neither the installation id nor the embedded queue's
folders (a worker does, when it delivers), so it does not import the worker's app. On Redis
and RabbitMQ it reads the deployment id the workers send from the broker. It also shows the
broker's backlog against RUBRIX_TELEMETRY_MAX_BACKLOG, as a server's publisher checks it.
"""

from __future__ import annotations

from typing import Any

from telemetry_core import message
from telemetry_core.contract import (
    EVENT_FIELDS,
    LOG_RECORDS_REQUESTED,
    SERVER_ERROR_FOUND,
    USER_INFO_REQUESTED,
    checked_wire_event,
    new_message_id_prefix,
    timestamp_us,
)
from telemetry_core.brokers import broker_for
from telemetry_core.platform_info import platform_info
from telemetry_core.settings import Settings, masked_url
from tasks.installation_id import stored_deployment_id, stored_installation_id
from tasks.segment import segment_message

EXAMPLE_HEADERS = {"user-agent": "python-requests/2.31.0", "accept-language": "en-US,en;q=0.9"}
EXAMPLE_PROPERTIES: dict[str, dict[str, object]] = {
    USER_INFO_REQUESTED: {"is_default_user": True, **EXAMPLE_HEADERS},
    LOG_RECORDS_REQUESTED: {"task": "TextClassification", "records": 100},
    SERVER_ERROR_FOUND: {"code": "rubrix.api.errors::EntityNotFoundError", **EXAMPLE_HEADERS},
}
# Shown as the anonymousId until the first delivery has created the installation id.
ID_NOT_CREATED_YET = "(not created yet: the first delivery creates it)"


def example_messages(anonymous_id: str) -> list[dict[str, Any]]:
    """One message of each event, checked and encoded as a server's publisher does, read back
    as a worker does and shaped as it sends them: exactly what would leave."""
    events = [checked_wire_event((name, timestamp_us(), *(props[field] for field in EVENT_FIELDS[name])), sequence)
              for sequence, (name, props) in enumerate(EXAMPLE_PROPERTIES.items())]
    batch = message.read([], message.encode(platform_info(), new_message_id_prefix(), events))
    assert batch.platform is not None and not batch.dropped, batch.dropped
    return [segment_message(event, batch.platform, anonymous_id) for event in batch.events]


# Seconds preview waits for the broker's backlog.
BACKLOG_TIMEOUT = 2.0


def backlog(settings: Settings) -> dict[str, Any]:
    """The broker's backlog against its bound, as a server's publisher sees it; only reads (no
    folder or queue is created), and says what it could not read instead of failing."""
    broker = broker_for(settings)
    shown: dict[str, Any] = {"events": None, "max": settings.max_backlog, "bytes": None,
                             "max_bytes": settings.max_backlog_bytes, "counted_by": broker.backlog_method()}
    if not settings.enabled:
        return {**shown, "error": "telemetry is off: the broker was not asked"}
    try:
        shown["events"] = broker.backlog(BACKLOG_TIMEOUT)
        shown["bytes"] = broker.backlog_bytes(BACKLOG_TIMEOUT)
    except Exception as error:  # noqa: BLE001 (a preview says what it could not read, it does not fail)
        shown["error"] = f"the broker could not be read ({type(error).__name__})"
    return shown


def preview(settings: Settings) -> dict[str, Any]:
    deployment_id, read_from = stored_deployment_id(settings)
    return {
        "telemetry": "on" if settings.enabled else "off",
        "decided_by": settings.decided_by,
        "endpoint": masked_url(settings.endpoint),
        # This data folder's; the deployment's (the anonymousId sent) is the broker's on Redis and RabbitMQ.
        "installation_id": stored_installation_id(settings.data_dir),
        "deployment_id": deployment_id,
        "deployment_id_from": read_from,
        # This machine's, as its server sends them with every task message.
        "platform": platform_info(),
        "examples": example_messages(deployment_id or ID_NOT_CREATED_YET),
        # What waits in the broker, in events and bytes, against RUBRIX_TELEMETRY_MAX_BACKLOG(_BYTES).
        "backlog": backlog(settings),
    }
