"""Delivery to a Segment-compatible HTTP tracking API: `POST {endpoint}/v1/batch`.

One `requests.Session` per process. Messages over Segment's 32 KB limit are dropped;
the rest are packed into batches under its 500 KB limit. Each batch's answer decides
what happens to its messages: delivered, to be retried (connection errors, timeouts,
429, 5xx) or dropped (any other 4xx: sending it again would fail again).
"""

from __future__ import annotations

import collections
import email.utils
import gzip
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import requests

from telemetry_core.settings import Settings, masked_url

log = logging.getLogger("tasks.segment")

MAX_MESSAGE_BYTES = 32 << 10  # Segment rejects larger messages
# Bodies go out gzip-compressed, as Segment's own client and Rubrix 0.18 send them. A batch is
# the same few keys and values over and over: level 1 already cuts it to under 4 % of its
# size, for a third of level 6's CPU and a fifth of level 9's (`python -m bench.wire_bytes`,
# docs/benchmarks.md); the worker's CPU is what bounds its throughput.
GZIP_LEVEL = 1
# Segment accepts 500 KB per batch; keep room for the envelope and any proxy's headers.
MAX_BATCH_BYTES = 475_000
BATCH_PATH = "/v1/batch"

Message = dict[str, Any]


@dataclass
class DeliveryOutcome:
    delivered: list[Message] = field(default_factory=list)
    retry: list[Message] = field(default_factory=list)
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    # Why the retried messages failed ("HTTP 503", "ConnectTimeout", ...), for logs and Flower.
    retry_reason: str | None = None
    # The same for an operator: the URL and the cause ("cannot connect to URL: Connection refused").
    retry_cause: str | None = None
    # The backend's last refusal (a 4xx: its events dropped), named as retry_cause is.
    refusal: str | None = None
    # The backend's Retry-After, in seconds, when it sent one.
    retry_after: float | None = None


_session: requests.Session | None = None
_session_pid = 0


def http_session() -> requests.Session:
    """This process's session: connections are reused, never shared across a fork."""
    global _session, _session_pid
    if _session is None or _session_pid != os.getpid():
        _session = requests.Session()
        _session.headers["User-Agent"] = "rubrix-telemetry"
        _session_pid = os.getpid()
    return _session


def segment_message(event: dict[str, Any], platform: dict[str, str], anonymous_id: str) -> Message:
    """A checked event in Segment's wire shape, its `context` the platform data of the server
    that recorded it."""
    return {
        "type": "track",
        "event": event["event"],
        "anonymousId": anonymous_id,
        "messageId": event["messageId"],
        "timestamp": event["timestamp"],
        "properties": event["properties"],
        "context": platform,
    }


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def pack_batches(messages: list[Message]) -> tuple[list[list[tuple[Message, bytes]]], int]:
    """Messages grouped into batches under MAX_BATCH_BYTES, and how many were too large."""
    batches: list[list[tuple[Message, bytes]]] = []
    current: list[tuple[Message, bytes]] = []
    current_size = 0
    too_large = 0
    for message in messages:
        body = encode(message)
        if len(body) > MAX_MESSAGE_BYTES:
            too_large += 1
            continue
        if current and current_size + len(body) + 1 > MAX_BATCH_BYTES:
            batches.append(current)
            current, current_size = [], 0
        current.append((message, body))
        current_size += len(body) + 1
    if current:
        batches.append(current)
    return batches, too_large


def _batch_body(encoded: list[bytes]) -> bytes:
    sent_at = datetime.now(timezone.utc).isoformat()
    return b'{"batch":[' + b",".join(encoded) + b'],"sentAt":"' + sent_at.encode() + b'"}'


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def batch_url(settings: Settings) -> str:
    """Where the batches go, as logs and `status` show it (never a password in it)."""
    return masked_url(settings.endpoint + BATCH_PATH)


def _innermost_os_error(error: BaseException) -> OSError | None:
    # requests wraps urllib3's errors, which wrap the socket's: the errno text is what says
    # what happened ("Connection refused", "Name or service not known").
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current
        linked = (getattr(current, "reason", None), current.__cause__, current.__context__, *current.args)
        pending.extend(item for item in linked if isinstance(item, BaseException))
    return None


def failure_cause(error: requests.RequestException, url: str, timeout: tuple[float, float]) -> str:
    """One line naming the URL and why no answer came from it."""
    if isinstance(error, requests.ConnectTimeout):
        return f"cannot connect to {url}: no connection within {timeout[0]:g}s"
    if isinstance(error, requests.ReadTimeout):
        return f"no answer from {url} within {timeout[1]:g}s (RUBRIX_TELEMETRY_HTTP_TIMEOUT)"
    os_error = _innermost_os_error(error)
    if isinstance(error, requests.ConnectionError) and os_error is not None:
        return f"cannot connect to {url}: {os_error.strerror}"
    return f"{type(error).__name__} from {url}" + (f": {os_error.strerror}" if os_error is not None else "")


def refusal_cause(status: int, url: str, settings: Settings) -> str:
    cause = f"HTTP {status} from {url}"
    if status == 404 and settings.endpoint.rstrip("/").endswith(BATCH_PATH):
        cause += (f"; RUBRIX_TELEMETRY_ENDPOINT ends in {BATCH_PATH}, which the worker adds itself: "
                  f"set it to the base URL ({settings.endpoint.rstrip('/')[:-len(BATCH_PATH)] or '/'})")
    return cause


def deliver_messages(messages: list[Message], settings: Settings) -> DeliveryOutcome:
    outcome = DeliveryOutcome()
    batches, too_large = pack_batches(messages)
    if too_large:
        outcome.dropped["message over 32 KB"] += too_large
        log.warning("telemetry: dropped %d messages over Segment's 32 KB limit", too_large)
    url = settings.endpoint + BATCH_PATH
    auth = (settings.write_key or "", "")
    # Connecting should be quick; reading may wait for a slow backend up to the full timeout.
    timeout = (min(5.0, settings.http_timeout), settings.http_timeout)
    for batch in batches:
        batch_messages = [message for message, _ in batch]
        try:
            response = http_session().post(
                url,
                data=gzip.compress(_batch_body([body for _, body in batch]), compresslevel=GZIP_LEVEL, mtime=0),
                auth=auth,
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                timeout=timeout,
            )
        except requests.RequestException as error:
            outcome.retry.extend(batch_messages)
            outcome.retry_reason = type(error).__name__
            outcome.retry_cause = failure_cause(error, batch_url(settings), timeout)
            continue
        status = response.status_code
        if 200 <= status < 300:
            outcome.delivered.extend(batch_messages)
        elif status == 429 or status >= 500:
            outcome.retry.extend(batch_messages)
            outcome.retry_reason = f"HTTP {status}"
            outcome.retry_cause = f"HTTP {status} from {batch_url(settings)}"
            if status == 429:
                outcome.retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        else:
            outcome.dropped[f"HTTP {status}"] += len(batch_messages)
            outcome.refusal = refusal_cause(status, batch_url(settings), settings)
            log.error("telemetry: the backend refused %d events (dropped): %s: %s",
                      len(batch_messages), outcome.refusal, response.text[:200])
    return outcome
