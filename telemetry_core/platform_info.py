"""The server's platform data: what the telemetry page promises to report about the machine
that runs Rubrix, collected once per process.

The server's publisher sends it with every task message, because a worker may run in
another image, host or Python than the server it reports for. A worker uses its own only
for a message that carries none (one queued by release 0.1.0, say).
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform

from telemetry_core.contract import PLATFORM_KEYS, platform_value

__all__ = ["PLATFORM_KEYS", "platform_info", "rubrix_version"]


def rubrix_version() -> str:
    """The Rubrix version installed in this environment: the server's, when the server calls it."""
    try:
        return importlib.metadata.version("rubrix")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=None)
def platform_info() -> dict[str, str]:
    """The six platform keys, each a short printable string; computed on first call, then reused.

    Callers must not change the dict (it is shared). `platform.platform()` may start a
    subprocess on some systems: the publisher thread calls this, never a request.
    """
    values = {
        "version": rubrix_version(),
        "python_version": platform.python_version(),
        "system": platform.system(),
        "sys_version": platform.version(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }
    return {key: platform_value(values[key]) for key in PLATFORM_KEYS}
