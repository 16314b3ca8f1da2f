"""Small JSON files that several processes of a deployment share (the counts, a worker's last
delivery): replaced whole, never rewritten in place.

A crash or a full disk mid-write leaves the old file, not half a new one, and readers need
no lock. Writers serialise on a lock file beside it, since the file itself is a new inode
after each write. Mode 0644: the deployment's other processes (`status`, a worker of another
user on a shared volume) read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

FILE_MODE = 0o644


def write_json_atomically(path: Path, document: Any, durable: bool = True) -> None:
    """Replaces `path` with `document` as JSON: a temporary file in the same folder, fsynced
    when `durable`, then renamed over it, so that no reader ever sees it half written."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), FILE_MODE)
            file.write(json.dumps(document, sort_keys=True))
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Holds the exclusive lock of `path`'s writers (on `<path>.lock`, created if need be)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # released when the descriptor is closed
        yield
    finally:
        os.close(descriptor)
