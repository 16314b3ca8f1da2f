"""`rubrix-telemetry server`: a Rubrix server with our hooks installed, under uvicorn."""

from __future__ import annotations

import errno
import os
import socket

from rubrix_hooks.rubrix_patch import RUBRIX_APP_MODULE
from telemetry_core.settings import Settings

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


def listen_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on host:port, in one line naming the cause; None if it can."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        return f"cannot resolve the host {host!r}: pass --host a name or address of this machine"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is taken: pass --port"
            if error.errno == errno.EADDRNOTAVAIL:
                return f"{host} is not an address of this machine: pass --host"
            if error.errno == errno.EACCES:
                return f"not allowed to listen on port {port} (ports below 1024 need privileges): pass --port"
            return f"cannot listen on {host}:{port}: {error.strerror}"
    return None


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
