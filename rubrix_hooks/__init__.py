"""Server side of rubrix-telemetry: hooks that record allowlisted events and hand them off.

    from rubrix_hooks import track_login, track_bulk, track_error, flush, shutdown_async

Attributes are loaded on first use, so that importing the shared contract or settings
(as the workers do) does not read the hooks' configuration or start anything.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "track_login": "rubrix_hooks.telemetry",
    "track_bulk": "rubrix_hooks.telemetry",
    "track_error": "rubrix_hooks.telemetry",
    "flush": "rubrix_hooks.telemetry",
    "stats": "rubrix_hooks.telemetry",
    "shutdown": "rubrix_hooks.telemetry",
    "shutdown_async": "rubrix_hooks.telemetry",
    "patch_rubrix": "rubrix_hooks.rubrix_patch",
    "TelemetryMiddleware": "rubrix_hooks.middleware",
    "ConfigurationError": "telemetry_core.settings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rubrix_hooks' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
