"""`patch_rubrix()`: route Rubrix 0.18's own telemetry call sites through our hooks.

Rubrix calls `telemetry.track_login / track_bulk / track_error` on the module
`rubrix.server.commons.telemetry` at request time, so replacing those three attributes
is enough; its built-in Segment client is never created.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from rubrix_hooks import telemetry

RUBRIX_TELEMETRY_MODULE = "rubrix.server.commons.telemetry"
RUBRIX_APP_MODULE = "rubrix.server.server"
HOOKS = ("track_login", "track_bulk", "track_error")


class RubrixNotInstalled(RuntimeError):
    pass


def _rubrix_telemetry_module() -> ModuleType:
    try:
        return importlib.import_module(RUBRIX_TELEMETRY_MODULE)
    except ModuleNotFoundError as error:
        if error.name and (error.name == "rubrix" or error.name.startswith("rubrix.")):
            raise RubrixNotInstalled(
                "patch_rubrix() needs the Rubrix server: pip install --no-deps rubrix==0.18.0 "
                "&& pip install -r requirements/rubrix-0.18-server.txt"
            ) from None
        raise RubrixNotInstalled(f"the Rubrix server cannot be imported: {error}") from None


def patch_rubrix() -> None:
    """Installs the hooks in Rubrix (idempotent). Raises RubrixNotInstalled without Rubrix.

    Also hands the buffer to the broker when Rubrix's app shuts down: under uvicorn a
    SIGTERM ends the process without running exit handlers (see telemetry.shutdown).
    """
    module = _rubrix_telemetry_module()
    for name in HOOKS:
        setattr(module, name, getattr(telemetry, name))
    app = importlib.import_module(RUBRIX_APP_MODULE).app
    if telemetry.shutdown_async not in app.router.on_shutdown:
        app.router.on_shutdown.append(telemetry.shutdown_async)
    if telemetry.startup not in app.router.on_startup:
        app.router.on_startup.append(telemetry.startup)  # the worker alongside, on the embedded queue


def is_patched() -> bool:
    try:
        module = _rubrix_telemetry_module()
    except RubrixNotInstalled:
        return False
    return all(getattr(module, name, None) is getattr(telemetry, name) for name in HOOKS)
