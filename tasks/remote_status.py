"""What a worker answers when `rubrix-telemetry status` asks it (Celery remote control).

`status` broadcasts `STATUS_COMMAND` on the broker; every worker listening there answers
with the settings it actually runs with, read in its own environment: so `status` reports
the workers' truth, not that of the shell it runs in. The same answer, raw:
`celery -A tasks inspect rubrix_telemetry_status`.

The command is registered when `tasks.celery` is imported, which a worker always does.
"""

from __future__ import annotations

from typing import Any

import celery
import kombu
from celery.worker.control import inspect_command

from telemetry_core.settings import Settings, masked_url
from tasks import counters

STATUS_COMMAND = "rubrix_telemetry_status"


def delivery_problem(settings: Settings) -> str | None:
    """Why a worker with these settings cannot deliver a single event, or None.

    A worker switched off is not a problem: the operator asked for it. A malformed
    endpoint never gets this far (the settings refuse it at start).
    """
    if settings.enabled and settings.is_segment and not settings.write_key:
        return f"RUBRIX_TELEMETRY_KEY is not set: events are dropped, not sent to {settings.endpoint}"
    return None


def _concurrency(consumer: Any) -> int | None:
    pool = getattr(consumer, "pool", None)
    processes = getattr(pool, "num_processes", None)
    return int(processes) if isinstance(processes, int) else getattr(consumer.controller, "concurrency", None)


def worker_report(settings: Settings, consumer: Any, hostname: str) -> dict[str, Any]:
    """The answer: JSON-serialisable, and never the write key or a broker password."""
    task_consumer = consumer.task_consumer
    return {
        "name": hostname,
        "queues": sorted(queue.name for queue in task_consumer.queues) if task_consumer else [],
        "telemetry": {"enabled": settings.enabled, "decided_by": settings.decided_by},
        "endpoint": settings.endpoint,
        "write_key_set": bool(settings.write_key),
        "problem": delivery_problem(settings),
        "broker": masked_url(settings.broker_url_or_default),
        "concurrency": _concurrency(consumer),
        "celery_version": celery.__version__,
        "kombu_version": kombu.__version__,
        # This worker's own counts where the broker keeps none (RabbitMQ); else the shared
        # counts are in the broker, and this is empty.
        "deliveries": counters.worker_own_counts(settings) or {},
    }


@inspect_command(name=STATUS_COMMAND)
def _answer_status(state: Any, **_: Any) -> dict[str, Any]:
    """Telemetry settings of this worker (rubrix-telemetry status)."""
    from tasks.celery import settings  # loaded by then: the worker runs the app

    return worker_report(settings, state.consumer, state.hostname)
