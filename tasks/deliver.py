"""The telemetry task: re-validate, attach the server's platform data, deliver, retry with backoff."""

from __future__ import annotations

import collections
import logging
import random
import time
from datetime import datetime
from typing import Any

from celery import Task
from celery.exceptions import InvalidTaskError, Reject, Retry
from celery.worker.request import Request

from telemetry_core import message
from telemetry_core.contract import DELIVER_TASK_NAME
from telemetry_core.platform_info import platform_info
from telemetry_core.settings import Settings
from tasks import counters
from tasks.celery import app, backend_breaker, broker, settings
from tasks.group_commit import GroupSender
from tasks.installation_id import deployment_id
from tasks.segment import DeliveryOutcome, segment_message

log = logging.getLogger("tasks.deliver")


class DeliveryFailed(Exception):
    """The backend could not take the events this time; the task is retried. `retry_after` is
    the backend's Retry-After, when it sent one (kept in `args`: it crosses from the pool's
    process to the worker's main one, where the breaker reads it)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after)

    @property
    def retry_after(self) -> float | None:
        value = self.args[1] if len(self.args) > 1 else None
        return float(value) if isinstance(value, (int, float)) else None

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# The longest a worker waits before probing a failing backend again: a probe is one POST, and
# once the backend answers the backlog starts draining within this long, however long the outage.
PROBE_INTERVAL_MAX = 60.0


# The reason events too old to deliver are counted under (`status`, the metrics exporter).
EXPIRED = "expired"


class RetryNotQueued(Reject):
    """The broker did not take a retry (a full disk, a broker refusing writes): the original
    message goes back to the queue, so its events are neither lost nor counted twice."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause, requeue=True)


# Pauses before a message whose retry the broker refused goes back: the worker takes it
# straight back, so without them a failing backend and a full disk make a hot loop. Doubled
# at each refusal in a row, from the retry's own countdown, up to this many seconds: short
# enough that the worker still answers `status` and stops promptly.
RETRY_NOT_QUEUED_PAUSE_MAX = 10.0
_refused_in_a_row = 0


class _NoTracebackForRetryNotQueued(logging.Filter):
    # Celery logs every Reject with its traceback; the cause is in our one line already.
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RetryNotQueued):
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("celery.app.trace").addFilter(_NoTracebackForRetryNotQueued())


def _cause(error: BaseException | None) -> str:
    """A publish failure's root cause in a few words: the OS's (`No space left on device`)
    when there is one, else the innermost error's type and text."""
    innermost = error
    while error is not None:
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        innermost = error
        error = error.__cause__ or error.__context__
    return f"{type(innermost).__name__}: {str(innermost)[:200]}" if innermost is not None else "unknown"


def _retry_queued() -> None:
    global _refused_in_a_row
    _refused_in_a_row = 0


def _retry_not_queued(refused: Reject, events: int, countdown: float) -> RetryNotQueued:
    """Waits before the message goes back to the queue; one log line names the cause."""
    global _refused_in_a_row
    cause = _cause(refused.reason if isinstance(refused.reason, BaseException) else refused)
    pause = min(RETRY_NOT_QUEUED_PAUSE_MAX, countdown * 2**min(_refused_in_a_row, 16))
    _refused_in_a_row += 1
    log.error("telemetry: the broker did not take the retry of %d events (%s); their message goes back "
              "to the queue in %.1fs", events, cause, pause)
    time.sleep(pause)
    return RetryNotQueued(cause)


class CheckedRequest(Request):
    """Celery's request, refusing a body that is not `[args, kwargs, embed]`.

    Celery unpacks the body inside Request() and, on a body of another shape (valid JSON
    written by a buggy or hostile producer), stops the worker with "Unrecoverable error";
    the message then goes back to the queue and stops the next worker too. As an
    InvalidTaskError it is logged and discarded, and the worker goes on.
    """

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(message, *args, **kwargs)
            task_args, task_kwargs, embed = self._payload
        except (ValueError, TypeError) as error:
            raise InvalidTaskError(f"malformed task body ({type(error).__name__})") from None
        if not (isinstance(task_args, (list, tuple)) and isinstance(task_kwargs, dict)
                and isinstance(embed, (dict, type(None)))):
            raise InvalidTaskError("malformed task body (not [args, kwargs, embed])")

    # These run in the worker's main process (prefork: from the pool's results), which owns the
    # consumer: the breaker stops taking work while the backend fails (tasks/celery.py), and
    # takes in batches again once a delivery succeeded.
    def on_success(self, failed__retval__runtime: Any, **kwargs: Any) -> None:
        super().on_success(failed__retval__runtime, **kwargs)
        failed, summary, _ = failed__retval__runtime
        if not failed and isinstance(summary, dict) and summary.get("delivered"):
            backend_breaker.backend_answered()

    def on_retry(self, exc_info: Any) -> None:
        super().on_retry(exc_info)
        retry = exc_info.exception
        failed = getattr(retry, "exc", None) if isinstance(retry, Retry) else None
        retry_after = failed.retry_after if isinstance(failed, DeliveryFailed) else None
        backend_breaker.backend_failed(probe_pause(backend_breaker.pauses_in_a_row(), retry_after, settings))


def probe_pause(pauses: int, retry_after: float | None, settings: Settings) -> float:
    """How long a worker takes no work after a failed delivery: the backoff for this many pauses
    in a row (a backend down for long is probed ever less often), at most PROBE_INTERVAL_MAX,
    and never before the backend's Retry-After."""
    return max(min(PROBE_INTERVAL_MAX, retry_countdown(pauses, None, settings)), retry_after or 0.0)


def retry_countdown(retries: int, retry_after: float | None, settings: Settings) -> float:
    """Seconds to wait before the next attempt: exponential, jittered, capped.

    "Equal jitter" (half fixed, half random) spreads workers apart while keeping each
    wait at least half the nominal backoff. The cap stays below the broker's visibility
    timeout (settings guarantee backoff_max < visibility_timeout): a longer wait on Redis
    with acks_late would make the broker hand the message to a second worker.
    """
    nominal = min(settings.backoff_max, settings.backoff_base * 2**min(retries, 32))
    countdown = random.uniform(nominal / 2, nominal)
    if retry_after is not None:
        countdown = max(countdown, retry_after)
    return min(countdown, settings.backoff_max)


def _hook_fired_at(event: dict[str, Any]) -> float | None:
    """Seconds since the epoch when the event's hook fired (its `timestamp`, checked by the
    contract on reading), or None for a timestamp this worker cannot read."""
    try:
        return datetime.fromisoformat(event["timestamp"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def _without_expired(events: list[dict[str, Any]], now: float, dropped: collections.Counter[str],
                     when: str) -> list[dict[str, Any]]:
    """The events still young enough to deliver; the others are counted as `expired`, in one
    log line. An event's age runs from its hook, whether it waited in the queue (no worker)
    or in retries (the backend failing); a timestamp ahead of this worker's clock is young."""
    oldest_allowed = now - settings.max_event_age
    fresh = [event for event in events if (_hook_fired_at(event) or now) >= oldest_allowed]
    expired = len(events) - len(fresh)
    if expired:
        dropped[EXPIRED] += expired
        log.warning("telemetry: dropped %d events %s: older than %gs (RUBRIX_TELEMETRY_MAX_EVENT_AGE), expired",
                    expired, when, settings.max_event_age)
    return fresh


def _unexpected(error: Exception, events: int, dropped: collections.Counter[str]) -> collections.Counter[str]:
    """Counts events that an unexpected error (a bug, an input the contract missed) kept from
    being sent. Raised out of the task instead, they would vanish uncounted: with acks_late a
    failed task is acknowledged. Only the error's type is named: its text may carry the events."""
    reason = f"unexpected error ({type(error).__name__})"
    dropped[reason] += events
    log.error("telemetry: dropped %d events: %s while building or sending them", events, reason)
    return dropped


# This process's one sender: the tasks running at once share its POSTs (tasks/group_commit.py).
group_sender = GroupSender(settings)


def _tell_broker(task: Task, retried: list[Any] | None = None) -> None:
    """Tells the broker's running count that the task's message is settled for good (and, when it
    was replaced by its retry, that the retry holds `retried`). Never fails the task."""
    try:
        broker.message_settled(message.header_events(task.request.headers, 0))
        if retried is not None:
            broker.message_published(len(retried))
    except Exception as error:  # noqa: BLE001 (the broker's recount finds what this misses)
        log.debug("telemetry: the broker's running count missed a message: %r", error)


def _summary(delivered: int, dropped: collections.Counter[str]) -> dict[str, Any]:
    # Every final outcome of a task passes here: the one place it is counted.
    counters.record(settings, delivered=delivered, dropped=dropped)
    return {"delivered": delivered, "dropped": dict(dropped)}


@app.task(
    name=DELIVER_TASK_NAME,
    Request=CheckedRequest,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,  # bounded by RUBRIX_TELEMETRY_MAX_EVENT_AGE instead (events expire)
    typing=False,  # a malformed message is counted and dropped below, not failed by Celery
)
def deliver_events(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Delivers the events of one task message (any format `telemetry_core.message` reads); the
    return value says what was delivered and what was dropped why."""
    summary = _deliver(self, args, kwargs)  # raises the Retry once the broker took it
    _tell_broker(self)
    return summary


def _deliver(self: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    batch = message.read(args, kwargs)
    dropped = batch.dropped
    if not settings.enabled:
        off = collections.Counter({f"telemetry off ({settings.decided_by})": len(batch.events) + sum(dropped.values())})
        return _summary(0, off)
    if dropped:
        log.warning("telemetry: rejected events outside the contract: %s", dict(dropped))
    if not batch.events:
        return _summary(0, dropped)
    if settings.is_segment and not settings.write_key:
        dropped["RUBRIX_TELEMETRY_KEY not set"] += len(batch.events)
        log.error("telemetry: RUBRIX_TELEMETRY_KEY is not set; %d events not sent to %s",
                  len(batch.events), settings.endpoint)
        return _summary(0, dropped)

    now = time.time()
    events = _without_expired(batch.events, now, dropped, "before sending")
    if not events:
        return _summary(0, dropped)
    # The server's platform data; this worker's own only for a message that carries none.
    platform = batch.platform or platform_info()
    # Kept in the retry message for older workers, which gave up that long after it.
    started = batch.first_attempt_at if batch.first_attempt_at is not None and batch.first_attempt_at <= now else now
    try:
        anonymous_id = deployment_id(settings)  # kept for the process once the broker answered
        # With the events of the other tasks waiting at this moment, in one POST; this task's
        # own outcome comes back (the sender also records it for `status`).
        outcome: DeliveryOutcome = group_sender.deliver(
            [segment_message(event, platform, anonymous_id) for event in events], self.request.hostname)
    except Exception as error:  # noqa: BLE001
        return _summary(0, _unexpected(error, len(events), dropped))
    dropped.update(outcome.dropped)
    if outcome.retry:
        outcome.retry = _without_expired(outcome.retry, time.time(), dropped, f"instead of retrying ({outcome.retry_reason})")
    if not outcome.retry:
        return _summary(len(outcome.delivered), dropped)

    countdown = retry_countdown(self.request.retries, outcome.retry_after, settings)
    # Only what failed is retried, unchanged: same messageId, so the backend can de-duplicate.
    try:
        retry_args, retry_kwargs = batch.retry_message(outcome.retry, platform, started)
    except Exception as error:  # noqa: BLE001
        return _summary(len(outcome.delivered), _unexpected(error, len(outcome.retry), dropped))
    try:
        retry = self.retry(
            args=retry_args,
            kwargs=retry_kwargs,
            kwargsrepr=message.describe(retry_kwargs) if retry_kwargs.get("format") == message.FORMAT else None,
            countdown=countdown,
            headers=message.events_header(len(outcome.retry)),  # the backlog counts only what is retried
            exc=DeliveryFailed(f"{outcome.retry_reason}; {len(outcome.retry)} events retry in {countdown:.1f}s",
                               outcome.retry_after),
            throw=False,
        )
    except Reject as refused:
        # Celery would reject the original without requeue: deleted, its events uncounted.
        # It goes back instead, counted by the attempt that finally settles it.
        raise _retry_not_queued(refused, len(outcome.retry), countdown) from None
    _retry_queued()
    _tell_broker(self, retried=outcome.retry)
    # Counted only now that the broker has the retry.
    log.info("telemetry: %d events delivered, %d to retry in %.1fs (%s): %s",
             len(outcome.delivered), len(outcome.retry), countdown, outcome.retry_reason, outcome.retry_cause)
    counters.record(settings, delivered=len(outcome.delivered), retried=len(outcome.retry), dropped=dropped)
    raise retry
