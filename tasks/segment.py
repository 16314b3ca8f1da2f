"""Delivery to a Segment-compatible HTTP tracking API: `POST {endpoint}/v1/batch`.

One `requests.Session` per process. Messages over Segment's 32 KB limit are dropped;
the rest are packed into batches under its limits (500 KB, 2,500 events), the messages of
several tasks together when the group-commit sender hands over several (`tasks.group_commit`).
Each batch's answer decides what happens to its messages: delivered, to be retried (connection
errors, timeouts, 429, 5xx) or dropped (any other 4xx: sending it again would fail again; a
batch of several tasks is narrowed down first, so that only the refused task's are dropped).
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
# Segment accepts 2,500 events per batch.
MAX_BATCH_EVENTS = 2_500
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


def http_session(url: str) -> requests.Session:
    """This process's session for `url`: connections are reused, never shared across a fork.

    The environment's proxies (HTTPS_PROXY, NO_PROXY, ...) and CA bundle (REQUESTS_CA_BUNDLE,
    CURL_CA_BUNDLE) are read once, here: requests would read them again at every POST, which
    walks the whole environment (1.5 ms a POST, measured on a busy worker)."""
    global _session, _session_pid
    if _session is None or _session_pid != os.getpid():
        _session = requests.Session()
        _session.headers["User-Agent"] = "rubrix-telemetry"
        _session.trust_env = False
        _session.proxies.update(requests.utils.get_environ_proxies(url))
        _session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
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


@dataclass
class Group:
    """The messages of one task, encoded, as the group-commit sender carries them
    (`tasks.group_commit`): its events share POSTs with other tasks' but keep their own outcome."""

    encoded: list[tuple[Message, bytes]]
    too_large: int  # messages over MAX_MESSAGE_BYTES, dropped
    outcome: DeliveryOutcome = field(default_factory=DeliveryOutcome)

    @property
    def size(self) -> int:
        """Its bytes in a batch body (each message and one comma)."""
        return sum(len(body) + 1 for _, body in self.encoded)


def encode_group(messages: list[Message]) -> Group:
    encoded = [(message, encode(message)) for message in messages]
    kept = [(message, body) for message, body in encoded if len(body) <= MAX_MESSAGE_BYTES]
    return Group(kept, len(encoded) - len(kept))


# One item of a batch: the group its message belongs to, the message and its encoding.
Item = tuple[Group, Message, bytes]


def pack_items(items: list[Item]) -> list[list[Item]]:
    """Items grouped in their order into batches under MAX_BATCH_BYTES and MAX_BATCH_EVENTS."""
    batches: list[list[Item]] = []
    current: list[Item] = []
    current_size = 0
    for item in items:
        size = len(item[2]) + 1
        if current and (current_size + size > MAX_BATCH_BYTES or len(current) >= MAX_BATCH_EVENTS):
            batches.append(current)
            current, current_size = [], 0
        current.append(item)
        current_size += size
    if current:
        batches.append(current)
    return batches


def pack_batches(messages: list[Message]) -> tuple[list[list[tuple[Message, bytes]]], int]:
    """Messages grouped into batches under Segment's limits, and how many were too large."""
    group = encode_group(messages)
    batches = pack_items([(group, message, body) for message, body in group.encoded])
    return [[(message, body) for _, message, body in batch] for batch in batches], group.too_large


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
    """Delivers one task's messages on their own (the group-commit sender delivers many tasks')."""
    group = encode_group(messages)
    deliver_groups([group], settings)
    return group.outcome


def deliver_groups(groups: list[Group], settings: Settings) -> None:
    """Delivers the messages of every group in as few POSTs as Segment's limits allow, and sets
    each group's outcome from the answers to its own messages.

    A refusal (a 4xx) of a batch that carries several groups drops none of them: the batch is
    sent again in halves, group by group, until each refused batch holds one group's messages
    only; that group's are dropped, the others' are delivered. A failure (connection error,
    timeout, 429, 5xx) makes every group of the batch retry its own messages."""
    for group in groups:
        if group.too_large:
            group.outcome.dropped["message over 32 KB"] += group.too_large
            log.warning("telemetry: dropped %d messages over Segment's 32 KB limit", group.too_large)
    items = [(group, message, body) for group in groups for message, body in group.encoded]
    for batch in pack_items(items):
        _deliver_batch(batch, settings)


def _groups_of(batch: list[Item]) -> list[Group]:
    return list({id(group): group for group, _, _ in batch}.values())


def _deliver_batch(batch: list[Item], settings: Settings) -> None:
    url = settings.endpoint + BATCH_PATH
    # Connecting should be quick; reading may wait for a slow backend up to the full timeout.
    timeout = (min(5.0, settings.http_timeout), settings.http_timeout)
    try:
        response = http_session(url).post(
            url,
            data=gzip.compress(_batch_body([body for _, _, body in batch]), compresslevel=GZIP_LEVEL, mtime=0),
            auth=(settings.write_key or "", ""),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            timeout=timeout,
        )
    except requests.RequestException as error:
        for group, message, _ in batch:
            group.outcome.retry.append(message)
            group.outcome.retry_reason = type(error).__name__
            group.outcome.retry_cause = failure_cause(error, batch_url(settings), timeout)
        return
    status = response.status_code
    if 200 <= status < 300:
        for group, message, _ in batch:
            group.outcome.delivered.append(message)
    elif status == 429 or status >= 500:
        retry_after = retry_after_seconds(response.headers.get("Retry-After")) if status == 429 else None
        for group, message, _ in batch:
            group.outcome.retry.append(message)
            group.outcome.retry_reason = f"HTTP {status}"
            group.outcome.retry_cause = f"HTTP {status} from {batch_url(settings)}"
            group.outcome.retry_after = retry_after if status == 429 else group.outcome.retry_after
    else:
        groups = _groups_of(batch)
        if len(groups) > 1:
            # Which group's messages the backend refuses is unknown: narrow it down by halves.
            log.info("telemetry: the backend refused a batch of %d events from %d tasks (HTTP %d); "
                     "sending it again in halves", len(batch), len(groups), status)
            first = {id(group) for group in groups[:len(groups) // 2]}
            _deliver_batch([item for item in batch if id(item[0]) in first], settings)
            _deliver_batch([item for item in batch if id(item[0]) not in first], settings)
            return
        outcome = groups[0].outcome
        outcome.dropped[f"HTTP {status}"] += len(batch)
        outcome.refusal = refusal_cause(status, batch_url(settings), settings)
        log.error("telemetry: the backend refused %d events (dropped): %s: %s",
                  len(batch), outcome.refusal, response.text[:200])


def merged(outcomes: list[DeliveryOutcome]) -> DeliveryOutcome:
    """What several groups' deliveries came to together (for `status`'s last delivery)."""
    total = DeliveryOutcome()
    for outcome in outcomes:
        total.delivered.extend(outcome.delivered)
        total.retry.extend(outcome.retry)
        total.dropped.update(outcome.dropped)
        total.retry_reason = outcome.retry_reason or total.retry_reason
        total.retry_cause = outcome.retry_cause or total.retry_cause
        total.refusal = outcome.refusal or total.refusal
    return total
