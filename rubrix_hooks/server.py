"""`rubrix-telemetry server`: a Rubrix server with our hooks installed, under uvicorn."""

from __future__ import annotations

import os
import socket

from rubrix_hooks.rubrix_patch import RUBRIX_APP_MODULE
from rubrix_hooks.settings import Settings

EXAMPLE_APP = "rubrix_hooks.example_app:app"
RUBRIX_APP = f"{RUBRIX_APP_MODULE}:app"
TELEMETRY_PAGE = "https://rubrix.readthedocs.io/en/stable/reference/telemetry.html"


def telemetry_notice() -> str:
    """The notice Rubrix printed at start-up while telemetry is on."""
    opt_out = "set RUBRIX_ENABLE_TELEMETRY=0" if os.name == "nt" else "export RUBRIX_ENABLE_TELEMETRY=0"
    return (
        "\nRubrix uses telemetry to report anonymous usage and error information.\n\n"
        "You can know more about what information is reported at:\n\n"
        f"    {TELEMETRY_PAGE}\n\n"
        "(`rubrix-telemetry preview` prints exactly what this machine would send.)\n\n"
        "Telemetry is currently enabled. If you want to disable it, you can configure\n"
        "the environment variable before relaunching the server:\n\n"
        f"    {opt_out}\n"
        "    (on Windows: set RUBRIX_ENABLE_TELEMETRY=0)\n"
    )


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def load_app(example: bool) -> str:
    """The app to serve, with hooks installed: the real Rubrix, patched, or the example app."""
    if example:
        return EXAMPLE_APP
    from rubrix_hooks.rubrix_patch import patch_rubrix

    patch_rubrix()  # before Rubrix's app module binds anything
    return RUBRIX_APP


def run_server(settings: Settings, host: str, port: int, example: bool, log_level: str = "info") -> None:
    import uvicorn

    app_path = load_app(example)
    if settings.enabled:
        print(telemetry_notice(), flush=True)
    # One process: uvicorn imports the app here, after patch_rubrix() has run.
    uvicorn.run(app_path, host=host, port=port, log_level=log_level)
