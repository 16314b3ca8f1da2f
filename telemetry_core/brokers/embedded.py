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

Celery's broadcast queues (remote control, which `status` and Flower use, and task events,
which Flower reads) are declared with a message TTL and an expiry that kombu's filesystem
transport ignores: the queue of a consumer that is gone (a worker stopped or killed, a
Flower killed) stays bound, and every broadcast (each `status`, each worker heartbeat every
2 s, three events per task) left a file there for ever. Here such a message that nobody took
within Celery's own TTL (remote control 300 s, events 5 s; transport options
`control_message_ttl` and `event_message_ttl`) is deleted and its queue unbound; a live
consumer binds its queues again at every sweep, so a stall longer than the TTL costs it
only the broadcasts of that moment.

Those broadcasts live in a folder of their own, `broadcast/`, beside `queue/` (which holds the
task messages only): a worker polls its mailbox ten times a second, and while its task queue is
paused (the breaker, in an outage) that poll listed every waiting task message (21 % of a core
at 20,000 files). An earlier release's broadcast files found in `queue/` are moved there.

Costs that do not follow what waits:
- a consumer lists the task queue's folder once, sorts the names and takes from that listing
  until it is used up (a name another consumer took first is skipped: its rename fails), then
  lists again; kombu listed and sorted the whole folder for each message (draining 50,000
  files took 10.7 messages a second);
- the backlog (messages, events, bytes) is a running count kept in `broker/backlog.json`,
  changed under a lock by every publish, ack and drop, and recounted from the listings every
  30 s by one consumer (`embedded_count.py`), so the server's check before each publish and
  `status` read one small file whatever waits;
- the sweep every 5 s lists `unacked/` and `broadcast/` only; the partial files in `queue/`
  are looked for by the recount's listing.

Every move is a rename inside the data folder: atomic, so exactly one consumer takes each
message, and no file is written anywhere else. Message files keep kombu's names
(`<ms>_<uuid>.<queue>.msg`), so a returned message sorts before newer ones; a task message
carrying `message.EVENTS_HEADER` gets its event count after the uuid
(`<ms>_<uuid>_<events>.<queue>.msg`), so that the count (and its recount) knows a message's
events from its name, never by reading the file. POSIX only (fcntl), as is the rest of the
data folder's locking.

The URL `embedded://` names this transport; `register()` makes kombu know it, in every
process that connects (`EmbeddedBroker.transport_options` calls it). The delivery counts and
the deployment id live in the same data folder, which server and workers share anyway.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from functools import cached_property
from pathlib import Path
from queue import Empty
from typing import Any, Iterator

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

from telemetry_core.brokers import alongside
from telemetry_core.brokers.base import Broker, QueueState
from telemetry_core.brokers.embedded_count import (COUNT_FILE, READER_RECOUNT_AFTER, RECOUNT_INTERVAL, BacklogCount,
                                                   Census, Change, Tally, queue_of)
from telemetry_core.counts import FileCounts
from telemetry_core.message import EVENTS_HEADER
from telemetry_core.settings import EMBEDDED_SCHEME, Settings

log = logging.getLogger("telemetry_core.brokers.embedded")

# How often a consumer looks for messages whose owner has died (besides at its start),
# and for broadcasts nobody took.
ORPHAN_SWEEP_INTERVAL = 5.0
# Celery's defaults for the message TTL of its broadcast queues (control_queue_ttl,
# event_queue_ttl). Queues are told apart by the names Celery gives them.
CONTROL_MESSAGE_TTL = 300.0  # `<worker>.celery.pidbox`, and `<uuid>.reply.celery.pidbox`
EVENT_MESSAGE_TTL = 5.0  # `celeryev.<uuid>`
# How long an idle consumer waits between two looks at the queue folder: a listdir, ten
# times a second. kombu's default of 1 s would add up to a second to every delivery.
POLLING_INTERVAL = 0.1
# A message is written under `.<its name>.partial` and renamed to its name once whole. A
# partial file older than this was left by a publisher that died mid-write: the sweep deletes it.
PARTIAL_SUFFIX = ".partial"
ABANDONED_PARTIAL_AGE = 300.0
# A file under a message's name that does not parse, modified less than this long ago, may still
# be being written in place (by kombu's own `_put`, as a server of an earlier release does during
# an upgrade): it goes back into the queue and is read again at a later poll.
UNREADABLE_GRACE = 30.0


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
            # 0o666, the umask decides: another user of the deployment must open it read-write to
            # test the claim once this process is gone (restore_orphans).
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
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


# The entries of the broker folder a sweep could not open or move, each warned about once
# (a sweep runs every 5 s); the warning says how the deployment's modes should be.
_warned_entries: set[Path] = set()
_warned_lock = threading.Lock()


def _warn_once(path: Path, doing: str, error: OSError) -> None:
    with _warned_lock:
        if path in _warned_entries:
            return
        _warned_entries.add(path)
    log.warning("embedded queue: cannot %s %s (%s): skipped; every process of the deployment must be able to "
                "read and write the broker folder's files (README, Workers)", doing, path,
                error.strerror or error)


def restore_orphans(unacked_root: Path, queue_folder: Path, skip: str | None = None,
                    broadcast_folder: Path | None = None) -> int:
    """Moves back into the queue every taken message whose owner process has ended (a broadcast
    into `broadcast_folder`, when given); returns how many.

    An entry it cannot open or move (another user's, a bad mode) is skipped with one warning,
    never raised: a raise here would stop the worker that sweeps, and every worker after it.
    """
    restored = 0
    try:
        entries = os.listdir(unacked_root)
    except FileNotFoundError:
        return 0
    except OSError as error:
        _warn_once(unacked_root, "list", error)
        return 0
    for entry in entries:
        name, dot, suffix = entry.rpartition(".")
        if not dot or suffix != "lock" or name == skip:
            continue
        try:
            # Read-write: a POSIX write lock (the owner's claim) can only be tested through such a descriptor.
            fd = os.open(unacked_root / entry, os.O_RDWR)
        except FileNotFoundError:
            continue  # another sweeper has just finished with it
        except OSError as error:
            _warn_once(unacked_root / entry, "open", error)
            continue
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
            except OSError as error:
                _warn_once(folder, "list", error)
                continue
            stuck = False
            for message in taken:
                home = broadcast_folder if broadcast_folder is not None and is_broadcast_name(message) else queue_folder
                try:
                    os.rename(folder / message, home / message)
                    restored += 1
                except FileNotFoundError:
                    pass
                except OSError as error:
                    _warn_once(folder, "move messages out of", error)
                    stuck = True
                    break
            if stuck:
                continue  # keep the lock file: the folder's messages are still there
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                continue  # something we did not put there: keep the lock file, try again later
            try:
                (unacked_root / entry).unlink(missing_ok=True)
            except OSError as error:
                _warn_once(unacked_root / entry, "remove", error)
        finally:
            os.close(fd)
    if restored:
        log.warning("embedded queue: %d message(s) taken by a process that has ended are back in the queue",
                    restored)
    return restored


def remove_abandoned_partials(queue_folder: Path, names: list[str] | None = None) -> int:
    """Deletes the partial files of publishers that died mid-write (never renamed into place,
    so never a message anyone took or counted); returns how many. `names`: the folder's
    entries, when a listing has them already."""
    now = time.time()
    removed = 0
    for name in os.listdir(queue_folder) if names is None else names:
        if not (name.startswith(".") and name.endswith(PARTIAL_SUFFIX)):
            continue
        try:
            if now - (queue_folder / name).stat().st_mtime >= ABANDONED_PARTIAL_AGE:
                (queue_folder / name).unlink()
                removed += 1
        except FileNotFoundError:
            continue  # renamed into place, or removed by another sweeper
        except OSError as error:
            _warn_once(queue_folder / name, "remove", error)
    if removed:
        log.warning("embedded queue: removed %d message file(s) a publisher left half written", removed)
    return removed


def broadcast_ttl(queue: str, control_ttl: float, event_ttl: float) -> float | None:
    """The TTL of a message in one of Celery's broadcast queues; None for any other queue."""
    if queue.endswith(".celery.pidbox"):
        return control_ttl
    if queue.startswith("celeryev."):
        return event_ttl
    return None


def is_broadcast_queue(queue: str) -> bool:
    """Whether the queue is one of Celery's broadcast queues (a worker's mailbox, a reply queue,
    an event queue): kept in `broadcast/`, never counted in the backlog."""
    return broadcast_ttl(queue, 0.0, 0.0) is not None


def is_broadcast_name(name: str) -> bool:
    queue = queue_of(name)
    return queue is not None and is_broadcast_queue(queue)


def is_counted_queue(queue: str) -> bool:
    return not is_broadcast_queue(queue)


def expire_broadcasts(channel: Channel, control_ttl: float, event_ttl: float) -> set[str]:
    """Deletes every broadcast message older than its TTL, and unbinds its queue (the queue of
    a consumer that is gone: a live one took it long ago); returns those queues."""
    queue_folder = channel.broadcast_folder
    now = time.time()
    stale: set[str] = set()
    for name in os.listdir(queue_folder):
        queue = queue_of(name)  # `<ms>_<uuid>.<queue>.msg`
        ttl = broadcast_ttl(queue, control_ttl, event_ttl) if queue is not None else None
        if ttl is None:
            continue
        try:
            if now - (queue_folder / name).stat().st_mtime < ttl:
                continue
            (queue_folder / name).unlink()
        except FileNotFoundError:
            continue  # taken, or deleted by another sweeper
        except OSError as error:
            _warn_once(queue_folder / name, "remove", error)
            continue
        stale.add(queue)
    if not stale:
        return stale
    for exchange_file in Path(channel.control_folder).glob("*.exchange"):
        exchange = exchange_file.name.removesuffix(".exchange")
        for binding in channel.get_table(exchange):
            if binding.queue in stale:
                # kombu's delete: drops the binding and whatever else waits in the queue.
                channel._delete(binding.queue, exchange, binding.routing_key, binding.pattern)
    log.info("embedded queue: unbound %d broadcast queue(s) nobody consumes: %s", len(stale), sorted(stale))
    return stale


def _events_suffix(payload: Any) -> str:
    """`_<events>` for a task message whose header says how many events it carries, else ''."""
    headers = payload.get("headers") if isinstance(payload, dict) else None
    events = headers.get(EVENTS_HEADER) if isinstance(headers, dict) else None
    return f"_{events}" if isinstance(events, int) and not isinstance(events, bool) and events >= 0 else ""


class Channel(filesystem.Channel):
    """The filesystem channel, taking messages by rename into this process's unacked folder."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._taken: dict[str, tuple[Path, int]] = {}  # delivery tag -> its file in our unacked folder, its size
        self._no_ack_queues: set[str] = set()  # remote control and event queues: no acks come
        self._next_sweep = 0.0
        self._own_bindings: set[tuple[str, str, str, str]] = set()  # (exchange, routing key, pattern, queue)
        # Per task queue, the names of its last listing not taken yet, in kombu's order (oldest first).
        self._listings: dict[str, collections.deque[str]] = {}
        self._owner_pid, self._owner_folder = 0, Path()

    @property
    def unacked_root(self) -> Path:
        return Path(self.transport_options.get("unacked_folder", "unacked"))

    @cached_property
    def broadcast_folder(self) -> Path:
        folder = Path(self.transport_options.get("broadcast_folder") or self.queue_folder.parent / "broadcast")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @cached_property
    def backlog_count(self) -> BacklogCount:
        return BacklogCount(self.queue_folder.parent, self.queue_folder, self.unacked_root)

    @cached_property
    def queue_folder(self) -> Path:
        return Path(self.data_folder_in)

    def _folder_of(self, queue: str) -> Path:
        return self.broadcast_folder if is_broadcast_queue(queue) else self.queue_folder

    def _taken_folder(self) -> Path:
        """This process's folder of taken messages (looked up once per process: a drain asks
        for it at every message)."""
        pid = os.getpid()
        if self._owner_pid != pid:
            self._owner_folder, self._owner_pid = _owner_for(self.unacked_root).folder, pid
        return self._owner_folder

    # -- taking ----------------------------------------------------------------------
    def _get(self, queue: str) -> dict[str, Any]:
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + ORPHAN_SWEEP_INTERVAL
            self._sweep()
        folder = self._folder_of(queue)
        names = self._listings.setdefault(queue, collections.deque())
        if is_broadcast_queue(queue):
            names.clear()  # a small folder: listed at each poll, so a broadcast is taken in order
        listed = False
        while True:
            if not names:
                if listed:
                    raise Empty()
                # The one listing (and sort) of the folder until these names are used up.
                wanted = f"{queue}.msg"
                names.extend(sorted(name for name in os.listdir(folder) if name.partition(".")[2] == wanted))
                listed = True
                continue
            payload = self._take(folder, names.popleft(), queue)
            if payload is not None:
                return payload

    def _take(self, folder: Path, name: str, queue: str) -> dict[str, Any] | None:
        """The message, moved into our unacked folder; None when it is not to be taken now."""
        taken = self._taken_folder() / name
        try:
            os.rename(folder / name, taken)
        except FileNotFoundError:
            return None  # another consumer took it first
        try:
            raw = taken.read_bytes()
            payload = loads(bytes_to_str(raw))
            tag = payload["properties"]["delivery_tag"]
        except PermissionError as error:
            # Another user's file, its mode too narrow for us (a publisher's umask): left in the
            # queue for a process that can read it, or for us once the mode is fixed.
            _warn_once(folder / name, "read", error)
            with contextlib.suppress(FileNotFoundError):
                os.rename(taken, folder / name)
            return None
        except (ValueError, TypeError, KeyError):
            # Since `_put` renames a message in only once it is whole, this is a file written
            # in place (still being written, if recent) or not a message at all.
            self._set_aside_unreadable(taken, folder)
            return None
        if queue in self._no_ack_queues:
            self._remove(taken, len(raw))
        else:
            self._taken[tag] = (taken, len(raw))
        return payload

    def _set_aside_unreadable(self, taken: Path, folder: Path) -> None:
        """A file that does not parse: back into the queue while it may still be being written,
        then into `unreadable/` beside the queue, kept for the operator and never taken again
        (nor counted in the backlog)."""
        try:
            if time.time() - taken.stat().st_mtime < UNREADABLE_GRACE:
                os.rename(taken, folder / taken.name)
                return
            self.unreadable_folder.mkdir(exist_ok=True)
            with self._counted_change(taken.name) as change:
                size = taken.stat().st_size
                os.rename(taken, self.unreadable_folder / taken.name)
                if change is not None:
                    change.remove(taken.name, size)
        except FileNotFoundError:
            return
        log.warning("embedded queue: %s is not a readable message: moved to %s", taken.name, self.unreadable_folder)

    def _counted_change(self, name: str) -> contextlib.AbstractContextManager[Change | None]:
        """The backlog count's lock for a move of this message in or out of what waits, and where
        to note it; for a broadcast, which is not counted, nothing to hold (None)."""
        return contextlib.nullcontext() if is_broadcast_name(name) else self.backlog_count.change()

    def _remove(self, taken: Path, size: int) -> None:
        """Deletes a message this process took, settled for good, and takes it off the count."""
        with self._counted_change(taken.name) as change:
            try:
                taken.unlink()
            except FileNotFoundError:
                return
            if change is not None:
                change.remove(taken.name, size)

    # -- publishing ------------------------------------------------------------------------
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        """kombu's `_put`, but the message appears under its name only once it is whole, and is counted.

        kombu creates the file under its final name and then writes it, so a consumer listing
        the folder meanwhile took it empty or cut short (and dropped it as unreadable). Here
        it is written under a name no consumer and no count matches, flushed to disk (a crash
        must not leave a renamed but empty file) and renamed into place, under the backlog
        count's lock (a broadcast into `broadcast/`, uncounted): kombu's name and ordering are kept.
        """
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}{_events_suffix(payload)}.{queue}.msg"
        folder = self._folder_of(queue)
        final = folder / name
        partial = folder / f".{name}{PARTIAL_SUFFIX}"
        data = str_to_bytes(dumps(payload))
        unwritten = memoryview(data)
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides the mode
            try:
                while unwritten:
                    unwritten = unwritten[os.write(fd, unwritten):]
                os.fsync(fd)
            finally:
                os.close(fd)
            with self._counted_change(name) as change:
                os.rename(partial, final)
                if change is not None:
                    change.add(name, len(data))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"Cannot add file {str(final)!r} to directory") from exc

    @property
    def unreadable_folder(self) -> Path:
        return Path(self.transport_options.get("unreadable_folder") or self.unacked_root.parent / "unreadable")

    def _sweep(self) -> None:
        """Every ORPHAN_SWEEP_INTERVAL: listings of `unacked/` and `broadcast/` (small whatever
        waits), and every RECOUNT_INTERVAL the backlog's recount, which lists `queue/`."""
        mine = _owners.get((os.getpid(), self.unacked_root))
        restore_orphans(self.unacked_root, self.queue_folder, skip=mine.name if mine else None,
                        broadcast_folder=self.broadcast_folder)
        remove_abandoned_partials(self.broadcast_folder)
        expire_broadcasts(self, float(self.transport_options.get("control_message_ttl", CONTROL_MESSAGE_TTL)),
                          float(self.transport_options.get("event_message_ttl", EVENT_MESSAGE_TTL)))
        # Bind again the queues this channel consumes: another sweeper unbinds a queue whose
        # broadcast waited past its TTL, which a consumer stalled that long would have let happen.
        for exchange, routing_key, pattern, queue in self._own_bindings:
            if queue in self._active_queues:
                super()._queue_bind(exchange, routing_key, pattern, queue)
        census = self.backlog_count.recount(RECOUNT_INTERVAL, is_counted_queue)
        if census is not None:
            self._tidy_queue_folder(self.queue_folder, census)

    def _tidy_queue_folder(self, queue_folder: Path, census: Census) -> None:
        """What the recount's listing of `queue/` found besides task messages: partial files
        (removed once abandoned) and an earlier release's broadcasts (moved to `broadcast/`)."""
        remove_abandoned_partials(queue_folder, census.hidden)
        for name in census.uncounted:
            with contextlib.suppress(FileNotFoundError):
                os.rename(queue_folder / name, self.broadcast_folder / name)

    def _purge(self, queue: str) -> int:
        """kombu's purge (also what deleting a queue does), in the queue's own folder, off the count."""
        folder = self._folder_of(queue)
        wanted = f"{queue}.msg"
        purged = 0
        for name in os.listdir(folder):
            if name.partition(".")[2] != wanted:
                continue
            try:
                self._remove(folder / name, (folder / name).stat().st_size)
            except OSError:
                continue  # taken meanwhile
            purged += 1
        return purged

    def _size(self, queue: str) -> int:
        """The messages of the queue (asked at each queue declare): from the count for a task
        queue, held ones included; kombu listed the folder."""
        if is_broadcast_queue(queue):
            wanted = f"{queue}.msg"
            return sum(1 for name in os.listdir(self.broadcast_folder) if name.partition(".")[2] == wanted)
        state = self.backlog_count.read()
        return state.tally(queue).messages if state is not None else 0

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        super()._queue_bind(exchange, routing_key, pattern, queue)
        self._own_bindings.add((exchange, routing_key or "", pattern or "", queue))

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
        """Back into its folder under its own name (kombu would write a copy and lose track of
        ours); uncounted: it never left what waits."""
        taken, _ = self._taken.pop(message.delivery_tag, (None, 0))
        if taken is None:
            return super()._restore(message)
        home = self.broadcast_folder if is_broadcast_name(taken.name) else self.queue_folder
        try:
            os.rename(taken, home / taken.name)
        except FileNotFoundError:
            pass

    def _wake_consumer(self) -> None:
        transport = self.connection  # None once the channel is closed (a late ack after a reconnect)
        if transport is not None:
            transport.message_settled()

    def _discard(self, delivery_tag: str) -> None:
        taken, size = self._taken.pop(delivery_tag, (None, 0))
        if taken is not None:
            self._remove(taken, size)


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


def broker_folders(settings: Settings) -> dict[str, Path]:
    """Where the embedded queue keeps its files; creates nothing (`status` only reads)."""
    root = settings.data_dir / "broker"
    return {name: root / name for name in ("queue", "control", "unacked", "broadcast")}


def _names_in(folder: Path) -> Iterator[str]:
    """The folder's entries; none when it has just gone (its worker acked its last message)."""
    try:
        yield from os.listdir(folder)
    except FileNotFoundError:
        return


class EmbeddedBroker(Broker):
    label = "embedded queue"
    keeps_counts = True  # counts.json in the shared data folder

    def transport_options(self) -> dict[str, Any]:
        # Both sides build their broker connection right after this call: kombu must know the
        # embedded scheme by then.
        register()
        folders = broker_folders(self.settings)
        for folder in folders.values():  # kombu's filesystem transport expects them to exist
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "control_folder": str(folders["control"]),
            "unacked_folder": str(folders["unacked"]),
            "broadcast_folder": str(folders["broadcast"]),
        }

    def start_worker_alongside(self) -> None:
        # The design and its locks: telemetry_core/brokers/alongside.py.
        alongside.start_for_server(self.settings)

    def worker_starting(self) -> None:
        alongside.hold_for_worker(self.settings)

    def reply_transport_options(self) -> dict[str, Any]:
        # kombu's default polling interval (1 s) would add up to a second to each answer.
        return {"polling_interval": POLLING_INTERVAL}

    def _tally(self) -> Tally | None:
        """What waits in the telemetry queue, queued and held, from the running count (recounted
        first when no consumer has for READER_RECOUNT_AFTER); None when nothing has started on
        this data folder yet. Raises when the queue's folder cannot be used."""
        folders = broker_folders(self.settings)
        if not folders["queue"].is_dir():
            return None
        if not os.access(folders["queue"], os.R_OK | os.W_OK):
            raise PermissionError(f"cannot read and write {folders['queue']}")
        count = BacklogCount(folders["queue"].parent, folders["queue"], folders["unacked"])
        return count.current(READER_RECOUNT_AFTER, is_counted_queue).tally(self.settings.queue)

    def _held(self) -> int:
        """The telemetry queue's messages in the workers' unacked folders (a few per worker)."""
        unacked = broker_folders(self.settings)["unacked"]
        ours = f"{self.settings.queue}.msg"
        held_folders = [folder for folder in unacked.iterdir() if folder.is_dir()] if unacked.is_dir() else []
        return sum(1 for folder in held_folders for name in _names_in(folder) if name.partition(".")[2] == ours)

    def queue_state(self, timeout: float) -> QueueState:
        tally = self._tally()
        if tally is None:
            queue = broker_folders(self.settings)["queue"]
            raise FileNotFoundError(f"the embedded queue {queue} does not exist yet: "
                                    "no server or worker with this RUBRIX_TELEMETRY_DATA_DIR has started")
        held = self._held()
        # The count holds both; the held ones are listed, so `depth` lags the truth only as the count does.
        return QueueState(depth=max(0, tally.messages - held), held=held)

    def backlog(self, timeout: float, under: int | None = None) -> int | None:
        tally = self._tally()
        return 0 if tally is None else tally.events(self.settings.events_per_task)

    def backlog_bytes(self, timeout: float) -> int | None:
        tally = self._tally()
        return 0 if tally is None else max(0, tally.bytes)

    def backlog_method(self) -> str:
        return (f"a running count of the message files' events and bytes (queue and unacked folders) in "
                f"broker/{COUNT_FILE}, recounted from their names every {RECOUNT_INTERVAL:.0f} s")

    def counts_store(self, timeout: float) -> FileCounts:
        return FileCounts(self.settings.data_dir)
