"""Drop-in replacements for Rubrix 0.18's `rubrix.server.commons.telemetry` hooks.

Each hook buffers the raw values of one allowlisted event (a tuple: about a microsecond,
no I/O) and no exception ever reaches the caller; the publisher thread checks them against
the contract before anything leaves the process. With telemetry switched off they return at once and
nothing else happens: no thread, no broker connection.
"""

from __future__ import annotations

import logging
import threading
from time import time_ns
from typing import Any, Callable, Protocol

from telemetry_core.contract import (
    DEFAULT_USERNAME,
    LOG_RECORDS_REQUESTED,
    SERVER_ERROR_FOUND,
    USER_INFO_REQUESTED,
    raw_text,
    timestamp_us,
)
from rubrix_hooks.publisher import Publisher
from telemetry_core.brokers import broker_for
from telemetry_core.settings import Settings, load_settings, report_switch_error

log = logging.getLogger("rubrix_hooks.telemetry")


class HasHeaders(Protocol):
    @property
    def headers(self) -> Any: ...


# Read at import, i.e. at server start-up: a bad value fails the start, not a request.
settings: Settings = load_settings()
report_switch_error(settings)  # a switch value not understood: telemetry off, and one error line
_publisher: Publisher | None = None
_publisher_lock = threading.Lock()


_write_key_warned = False


def _warn_when_workers_cannot_deliver() -> None:
    """Once per process, as the server starts: the workers drop every event of a Segment
    endpoint without a write key, and only their log and `status` would say so otherwise.
    The server itself drops nothing: it publishes as usual (another environment's workers may
    have the key)."""
    global _write_key_warned
    if settings.lacks_write_key and not _write_key_warned:
        _write_key_warned = True
        log.warning("telemetry: RUBRIX_TELEMETRY_KEY is not set: a worker with this server's environment (as "
                    "the worker alongside it has) drops every event instead of sending it to %s; set the Segment "
                    "write key where the workers run", settings.endpoint)


def publisher() -> Publisher:
    """This process's publisher, created on first use."""
    global _publisher
    if _publisher is None:
        with _publisher_lock:
            if _publisher is None:
                _warn_when_workers_cannot_deliver()  # a server without a lifespan starts here
                _publisher = Publisher(settings)
    return _publisher


def _request_headers(request: object) -> tuple[object, object]:
    headers = getattr(request, "headers", None)
    get = getattr(headers, "get", None)
    if get is None:
        return None, None
    return raw_text(get("user-agent")), raw_text(get("accept-language"))


def _with_room() -> Publisher | None:
    """This process's publisher when its buffer has room; otherwise None, the drop counted.

    Checked before an event is built: during a broker outage the buffer stays full, and
    requests should then pay nothing for telemetry (not even reading headers).
    """
    buffer = _publisher or publisher()
    if buffer.has_room():
        return buffer
    buffer.dropped["buffer_full"] += 1  # count_drop, inlined: every event of an outage comes here
    return None


def _hook_failed(event: str, error: Exception) -> None:
    # Only our own reason is counted: the error's text may carry user data.
    publisher().count_drop("hook_error")
    log.debug("telemetry: event %s not recorded: %s", event, type(error).__name__)


def record(event: str, values: Callable[[], tuple[object, ...]]) -> bool:
    """Buffers one event; False when it was not recorded (off, buffer full or a hook error).

    `values` (the event's property values in contract order) is called here, inside the
    guard, because reading a request's headers or an error's code runs code we do not
    control, and only when there is room.
    """
    if not settings.enabled:
        return False
    try:
        buffer = _with_room()
        return buffer is not None and buffer.submit((event, timestamp_us(), *values()))
    except Exception as error:  # a hook must never fail the request it observes
        _hook_failed(event, error)
        return False


# The three hooks are `record` written out: they run on every request, and a closure or
# a helper call per request would cost them a good part of their time. `time_ns() // 1000`
# is `contract.timestamp_us()`, inlined for the same reason.

async def track_login(request: HasHeaders, username: str) -> None:
    if settings.enabled:
        try:
            buffer = _with_room()
            if buffer is not None:
                buffer.submit((USER_INFO_REQUESTED, time_ns() // 1000, username == DEFAULT_USERNAME,
                               *_request_headers(request)))
        except Exception as error:  # a hook must never fail the request it observes
            _hook_failed(USER_INFO_REQUESTED, error)


async def track_bulk(task: object, records: int) -> None:
    if settings.enabled:
        try:
            # Nothing to read here: the event is built before the room check, which submit makes.
            (_publisher or publisher()).submit((LOG_RECORDS_REQUESTED, time_ns() // 1000, task, records))
        except Exception as error:
            _hook_failed(LOG_RECORDS_REQUESTED, error)


async def track_error(error: object, request: HasHeaders) -> None:
    if settings.enabled:
        try:
            buffer = _with_room()
            if buffer is not None:
                buffer.submit((SERVER_ERROR_FOUND, time_ns() // 1000, raw_text(getattr(error, "code", None)),
                               *_request_headers(request)))
        except Exception as failure:
            _hook_failed(SERVER_ERROR_FOUND, failure)


def flush(timeout: float = 5.0) -> bool:
    """Hands every buffered event to the broker, or gives up after `timeout`.

    True when nothing is left in this process's buffer.
    """
    if _publisher is None:
        return True
    return _publisher.flush(timeout)


def startup() -> None:
    """At server start (the ASGI lifespan's startup): what the broker runs beside a server
    starts now rather than at the first event. On the embedded queue that is the worker
    alongside, so events left queued by an earlier run go out without waiting for a request.
    Never raises, never waits. `TelemetryMiddleware`, `patch_rubrix()` and the example app
    call it."""
    if settings.enabled:
        _warn_when_workers_cannot_deliver()
        broker_for(settings).start_worker_alongside()


def shutdown(timeout: float | None = None) -> None:
    """Hands the buffer to the broker, waiting at most `timeout` (default
    RUBRIX_TELEMETRY_SHUTDOWN_TIMEOUT) seconds; what is left is counted as dropped.

    Call it when the server stops. An interpreter exit does it too, but uvicorn (0.29 and
    later, gunicorn's UvicornWorker included) re-raises SIGTERM after its own shutdown,
    and a process killed by a signal never runs its exit handlers: the ASGI lifespan
    shutdown is the last moment a server is sure to reach. `TelemetryMiddleware`, the
    example app and `rubrix-telemetry server` call it there.
    """
    if _publisher is not None:
        _publisher.close(settings.shutdown_timeout if timeout is None else timeout)


async def shutdown_async(timeout: float | None = None) -> None:
    """`shutdown()` for an event loop: waits in a thread, so other shutdown work goes on."""
    if _publisher is not None and _publisher.pending():
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, shutdown, timeout)


def stats() -> dict[str, Any]:
    """Counts of this process's events: published to the broker, pending, dropped by reason."""
    if _publisher is None:
        return {"published": 0, "pending": 0, "dropped": {}}
    return _publisher.stats()
