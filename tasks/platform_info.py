"""Static data about the machine a worker runs on, collected once per worker process."""

from __future__ import annotations

import functools
import importlib.metadata
import platform

# Rubrix 0.18's key names: the maintainers' dashboards group events by them.
PLATFORM_KEYS = ("version", "python_version", "system", "sys_version", "machine", "platform")


def rubrix_version() -> str:
    try:
        return importlib.metadata.version("rubrix")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def platform_info() -> dict[str, str]:
    """The six platform keys, each a string; computed on first call, then reused."""
    return {
        "version": rubrix_version(),
        "python_version": platform.python_version(),
        "system": platform.system(),
        "sys_version": platform.version(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }
