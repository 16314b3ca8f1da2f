"""The embedded queue (the default broker): kombu's filesystem transport, made at-least-once.

kombu's filesystem transport deletes a message file the moment a worker takes it (after
moving it through the system temp folder), so a worker killed before it acknowledges loses
the message: with nothing left on disk, `acks_late` has nothing to redeliver. This subclass
changes only what happens to the file between "taken" and "acknowledged":

- taking a message renames its file into a folder of the taking process's own under
  `unacked/`; an ack deletes it there; a reject with requeue, or a warm shutdown, renames it
  back into the queue;
- each process's folder `unacked/<pid>-<random>/` is claimed by a POSIX lock that the process
  holds on `unacked/<pid>-<random>.lock` for its whole life. The kernel drops the lock when the
  process ends, even by SIGKILL, so a consumer that can take the lock knows the owner is gone
  and renames its messages back into the queue: at its start and every few seconds. A lock,
  not a pid check, because pids are reused (a restarted container's worker often gets the same
  one) and are not comparable across the pid namespaces of containers sharing the data folder.

Every move is a rename inside the data folder: atomic, so exactly one consumer takes each
message, and no file is written anywhere else. Message files keep kombu's names
(`<ms>_<uuid>.<queue>.msg`), so a returned message sorts before newer ones and `status`
counts the queue as before. POSIX only (fcntl), as is the rest of the data folder's locking.

The URL `embedded://` names this transport; `register()` makes kombu know it, in every
process that connects (`settings.broker_transport_options` calls it).
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from rubrix_hooks.settings import EMBEDDED_SCHEME

log = logging.getLogger("rubrix_hooks.embedded_queue")

# How often a consumer looks for messages whose owner has died (besides at its start).
ORPHAN_SWEEP_INTERVAL = 5.0
# How long an idle consumer waits between two looks at the queue folder: a listdir, ten
# times a second. kombu's default of 1 s would add up to a second to every delivery.
POLLING_INTERVAL = 0.1


def register() -> None:
    """Lets kombu resolve `embedded://` URLs to this module's Transport (idempotent)."""
    TRANSPORT_ALIASES[EMBEDDED_SCHEME] = f"{__name__}:Transport"


class _Owner:
    """This process's claim on its folder of taken messages, held by a POSIX lock until it ends."""

    def __init__(self, unacked_root: Path) -> None:
        unacked_root.mkdir(parents=True, exist_ok=True)
        while True:
            name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            lock_path = unacked_root / f"{name}.lock"
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            # Blocks only while a sweeper that opened the new file is testing it. Such a sweeper
            # found it unlocked and removed it: then the lock we hold is on a deleted file.
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                ours = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                ours = False
            if ours:
                break
            os.close(fd)
        # Never opened again by this process: closing any descriptor of a file drops the
        # process's POSIX locks on it.
        self._lock_fd = fd
        self._pid = os.getpid()
        self.name = name
        self.lock_path = lock_path
        self.folder = unacked_root / name
        self.folder.mkdir()
        atexit.register(self._release)

    def _release(self) -> None:
        """At a clean exit, after kombu has put back what we held: remove our empty folder."""
        if os.getpid() != self._pid:
            return  # a forked child inherits exit handlers, not the claim
        try:
            self.folder.rmdir()
        except OSError:
            return  # still holds messages: the next consumer's sweep returns them
        self.lock_path.unlink(missing_ok=True)


_owners: dict[tuple[int, Path], _Owner] = {}
_owners_lock = threading.Lock()


def _owner_for(unacked_root: Path) -> _Owner:
    """One owner per process and folder; a forked child (which holds no POSIX lock) gets its own."""
    key = (os.getpid(), unacked_root)
    with _owners_lock:
        owner = _owners.get(key)
        if owner is None:
            owner = _owners[key] = _Owner(unacked_root)
        return owner


def restore_orphans(unacked_root: Path, queue_folder: Path, skip: str | None = None) -> int:
    """Moves back into the queue every taken message whose owner process has ended; returns how many."""
    restored = 0
    try:
        entries = os.listdir(unacked_root)
    except FileNotFoundError:
        return 0
    for entry in entries:
        name, dot, suffix = entry.rpartition(".")
        if not dot or suffix != "lock" or name == skip:
            continue
        try:
            fd = os.open(unacked_root / entry, os.O_RDWR)
        except FileNotFoundError:
            continue  # another sweeper has just finished with it
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            folder = unacked_root / name
            try:
                taken = os.listdir(folder)
            except FileNotFoundError:
                taken = []
            for message in taken:
                try:
                    os.rename(folder / message, queue_folder / message)
                    restored += 1
                except FileNotFoundError:
                    pass
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                continue  # something we did not put there: keep the lock file, try again later
            (unacked_root / entry).unlink(missing_ok=True)
        finally:
            os.close(fd)
    if restored:
        log.warning("embedded queue: %d message(s) taken by a process that has ended are back in the queue",
                    restored)
    return restored


class Channel(filesystem.Channel):
    """The filesystem channel, taking messages by rename into this process's unacked folder."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._taken: dict[str, Path] = {}  # delivery tag -> its file in our unacked folder
        self._no_ack_queues: set[str] = set()  # remote control and event queues: no acks come
        self._next_sweep = 0.0

    @property
    def unacked_root(self) -> Path:
        return Path(self.transport_options.get("unacked_folder", "unacked"))

    # -- taking ----------------------------------------------------------------------
    def _get(self, queue: str) -> dict[str, Any]:
        queue_folder = self.data_folder_in
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + ORPHAN_SWEEP_INTERVAL
            mine = _owners.get((os.getpid(), self.unacked_root))
            restore_orphans(self.unacked_root, Path(queue_folder), skip=mine.name if mine else None)
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(queue_folder)):
            if name.partition(".")[2] != wanted:
                continue
            taken = _owner_for(self.unacked_root).folder / name
            try:
                os.rename(os.path.join(queue_folder, name), taken)
            except FileNotFoundError:
                continue  # another consumer took it first
            try:
                payload = loads(bytes_to_str(taken.read_bytes()))
                tag = payload["properties"]["delivery_tag"]
            except (ValueError, TypeError, KeyError):
                # Not a message kombu wrote: drop it, or every restart would take it again.
                log.warning("embedded queue: dropped %s, not a readable message", name)
                taken.unlink()
                continue
            if queue in self._no_ack_queues:
                taken.unlink()
            else:
                self._taken[tag] = taken
            return payload
        raise Empty()

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        else:
            self._no_ack_queues.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self._discard(message.delivery_tag)
        return message

    # -- settling (acks may come from the pool's result thread) --------------------------
    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)
        self._discard(delivery_tag)
        self._wake_consumer()

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue)  # a requeue goes through _restore below
        self._discard(delivery_tag)
        self._wake_consumer()

    def _restore(self, message: Any) -> None:
        """Back into the queue under its own name (kombu would write a copy and lose track of ours)."""
        taken = self._taken.pop(message.delivery_tag, None)
        if taken is None:
            return super()._restore(message)
        try:
            os.rename(taken, os.path.join(self.data_folder_in, taken.name))
        except FileNotFoundError:
            pass

    def _wake_consumer(self) -> None:
        transport = self.connection  # None once the channel is closed (a late ack after a reconnect)
        if transport is not None:
            transport.message_settled()

    def _discard(self, delivery_tag: str) -> None:
        taken = self._taken.pop(delivery_tag, None)
        if taken is not None:
            taken.unlink(missing_ok=True)


class Transport(filesystem.Transport):
    """kombu's filesystem transport with redelivery, and a poll that wakes when a message is settled."""

    Channel = Channel
    polling_interval = POLLING_INTERVAL

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._settled = threading.Event()

    def message_settled(self) -> None:
        self._settled.set()

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """kombu's loop, but the pause between two empty polls ends as soon as a message is settled.

        A consumer at its prefetch limit gets Empty until it acknowledges; kombu then sleeps
        the whole polling interval, so a prefork worker (prefetch 2) took 2 tasks a second.
        Celery (>= 5.7) acknowledges from the pool's result thread the moment a task ends,
        which sets the event this loop waits on.
        """
        started = time.monotonic()
        while True:
            self._settled.clear()
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                pass
            waited = time.monotonic() - started
            if timeout is not None and waited >= timeout:
                raise socket.timeout()
            pause = self.polling_interval if timeout is None else min(self.polling_interval, timeout - waited)
            self._settled.wait(pause)
