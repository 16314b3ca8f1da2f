"""What a worker answers when `rubrix-telemetry status` asks it (Celery remote control).

`status` broadcasts `STATUS_COMMAND` on the broker; every worker listening there answers
with the settings it actually runs with, read in its own environment: so `status` reports
the workers' truth, not that of the shell it runs in. The same answer, raw:
`celery -A tasks inspect rubrix_telemetry_status`.

The command is registered when `tasks.celery` is imported, which a worker always does.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import celery
import kombu
from celery.worker.control import inspect_command

from telemetry_core.json_files import locked, write_json_atomically
from telemetry_core.settings import Settings, masked_url
from tasks import counters
from tasks.segment import DeliveryOutcome, batch_url

log = logging.getLogger("tasks.remote_status")

STATUS_COMMAND = "rubrix_telemetry_status"

# What a worker's last delivery attempt came to, in `last_delivery["outcome"]`.
DELIVERED = "delivered"
FAILED = "failed"  # no answer, or a 429/5xx: the events are retried (or given up after MAX_RETRY_DURATION)
REFUSED = "refused"  # another 4xx: the backend refused the events, and they were dropped
# A worker delivering many tasks a second rewrites an unchanged outcome at most this often.
UNCHANGED_REWRITE_SECONDS = 1.0


def delivery_problem(settings: Settings) -> str | None:
    """Why a worker with these settings cannot deliver a single event, or None.

    A worker switched off is not a problem: the operator asked for it. A malformed
    endpoint never gets this far (the settings refuse it at start).
    """
    if settings.lacks_write_key:
        return f"RUBRIX_TELEMETRY_KEY is not set: events are dropped, not sent to {settings.endpoint}"
    return None


def last_delivery_file(settings: Settings, hostname: str) -> Path:
    """The worker's last delivery outcome, one file per worker (node name) in its data folder:
    deliveries run in the pool's processes, the answer to `status` comes from the main one."""
    return settings.data_dir / f"last-delivery.{re.sub(r'[^A-Za-z0-9@._-]', '_', hostname)}.json"


# What this process last wrote to a last-delivery file (file, outcome, cause, endpoint), and when.
_last_written: list[Any] = [None, 0.0]


def record_last_delivery(settings: Settings, hostname: str, outcome: DeliveryOutcome) -> None:
    """Keeps what this delivery attempt came to, for `status`. Never fails a delivery."""
    if outcome.retry:
        kind, cause = FAILED, outcome.retry_cause
    elif outcome.refusal:
        kind, cause = REFUSED, outcome.refusal
    elif outcome.delivered:
        kind, cause = DELIVERED, None
    else:
        return  # no request was made (every message was over 32 KB)
    document = {"at": time.time(), "outcome": kind, "cause": cause, "endpoint": batch_url(settings)}
    path = last_delivery_file(settings, hostname)
    # The same outcome this process wrote less than UNCHANGED_REWRITE_SECONDS ago: not even the
    # file is read (a worker draining a backlog comes here for every POST).
    unchanged = (str(path), kind, cause, document["endpoint"])
    if unchanged == _last_written[0] and document["at"] - _last_written[1] < UNCHANGED_REWRITE_SECONDS:
        return
    _last_written[:] = [unchanged, document["at"]]
    try:
        with locked(path):  # the pool's processes write the same file
            current = _read_last_delivery(path)
            if current is not None:
                if current["at"] > document["at"]:
                    return  # another pool process finished a later delivery first
                if (all(current.get(key) == document[key] for key in ("outcome", "cause", "endpoint"))
                        and document["at"] - current["at"] < UNCHANGED_REWRITE_SECONDS):
                    return
            # Not fsynced: after a crash an older outcome (or none) is all that is lost.
            write_json_atomically(path, document, durable=False)
    except Exception as error:  # noqa: BLE001 (bookkeeping must never fail a delivery)
        log.debug("telemetry: could not write %s: %r", path, error)


def _read_last_delivery(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or not isinstance(document.get("at"), (int, float)):
        return None
    return document


def last_delivery(settings: Settings, hostname: str) -> dict[str, Any] | None:
    """`{"at": epoch seconds, "outcome", "cause", "endpoint"}` of this worker's last delivery
    attempt; None before the first, or when it went to another endpoint (a previous run's)."""
    document = _read_last_delivery(last_delivery_file(settings, hostname))
    if document is None or document.get("endpoint") != batch_url(settings):
        return None
    return {key: document.get(key) for key in ("at", "outcome", "cause", "endpoint")}


def _concurrency(consumer: Any) -> int | None:
    pool = getattr(consumer, "pool", None)
    processes = getattr(pool, "num_processes", None)
    return int(processes) if isinstance(processes, int) else getattr(consumer.controller, "concurrency", None)


def worker_report(settings: Settings, consumer: Any, hostname: str,
                  paused_queues: list[str] | None = None) -> dict[str, Any]:
    """The answer: JSON-serialisable, and never the write key or a broker password.

    A queue the worker stopped taking from while the backend fails (`paused_queues`, the
    circuit breaker's) is still its queue: `status` must not say nobody consumes it.
    """
    task_consumer = consumer.task_consumer
    consuming = {queue.name for queue in task_consumer.queues} if task_consumer else set()
    return {
        "name": hostname,
        "queues": sorted(consuming | set(paused_queues or [])),
        # The queues it takes no work from until its next probe of the failing backend.
        "paused_queues": sorted(paused_queues or []),
        "telemetry": {"enabled": settings.enabled, "decided_by": settings.decided_by},
        "endpoint": masked_url(settings.endpoint),
        "write_key_set": bool(settings.write_key),
        "problem": delivery_problem(settings),
        "broker": masked_url(settings.broker_url_or_default),
        "concurrency": _concurrency(consumer),
        "celery_version": celery.__version__,
        "kombu_version": kombu.__version__,
        # This worker's own counts where the broker keeps none (RabbitMQ); else the shared
        # counts are in the broker, and this is empty.
        "deliveries": counters.worker_own_counts(settings) or {},
        "last_delivery": last_delivery(settings, hostname),
    }


@inspect_command(name=STATUS_COMMAND)
def _answer_status(state: Any, **_: Any) -> dict[str, Any]:
    """Telemetry settings of this worker (rubrix-telemetry status)."""
    from tasks.celery import backend_breaker, settings  # loaded by then: the worker runs the app

    return worker_report(settings, state.consumer, state.hostname, backend_breaker.paused_queues)
