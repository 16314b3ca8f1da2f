"""The anonymous id of this installation: random, stable across restarts, one-way.

Rubrix 0.18 used `uuid.UUID(int=uuid.getnode())`, which is the MAC address in disguise.
Ours is a random UUID stored in the data folder the first time it is needed: it says
nothing about the machine, and a volume keeps it across container restarts.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from pathlib import Path

log = logging.getLogger("tasks.installation_id")
FILE_NAME = "installation-id"


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii").strip()
        return str(uuid.UUID(text))
    except (OSError, ValueError):
        return None


def stored_installation_id(data_dir: Path) -> str | None:
    """The id if one is stored already; never creates it (for `rubrix-telemetry preview`)."""
    return _read(data_dir / FILE_NAME)


@functools.cache
def installation_id(data_dir: Path) -> str:
    path = data_dir / FILE_NAME
    existing = _read(path)
    if existing:
        return existing
    new_id = str(uuid.uuid4())
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        draft = data_dir / f".{FILE_NAME}.{os.getpid()}"
        draft.write_text(new_id + "\n", encoding="ascii")
        try:
            # link() never replaces: when two workers start together, exactly one
            # complete id wins and both use it.
            os.link(draft, path)
        except FileExistsError:
            return _read(path) or new_id
        finally:
            draft.unlink(missing_ok=True)
        return new_id
    except OSError as error:
        log.warning("telemetry: cannot store the installation id in %s (%s); using one for this process only",
                    data_dir, error.strerror)
        return new_id
