"""Worker side of rubrix-telemetry: the Celery app, its task, platform data and delivery.

Operators start a worker with `celery -A tasks worker -Q telemetry -E -l INFO` and watch it with
`celery -A tasks flower`. `tasks.app` is loaded on first use, so that the
`rubrix-telemetry` command can report a bad setting as one clear line.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "settings"):
        from tasks import celery

        return getattr(celery, name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
