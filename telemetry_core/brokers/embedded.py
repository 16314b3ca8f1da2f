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

Every move is a rename inside the data folder: atomic, so exactly one consumer takes each
message, and no file is written anywhere else. Message files keep kombu's names
(`<ms>_<uuid>.<queue>.msg`), so a returned message sorts before newer ones and `status`
counts the queue as before; a task message carrying `message.EVENTS_HEADER` gets its event
count after the uuid (`<ms>_<uuid>_<events>.<queue>.msg`), so that the backlog is counted in
events from the folders' listings alone, never by reading a file. POSIX only (fcntl), as is the rest of the data folder's locking.

The URL `embedded://` names this transport; `register()` makes kombu know it, in every
process that connects (`EmbeddedBroker.transport_options` calls it). The delivery counts and
the deployment id live in the same data folder, which server and workers share anyway.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any, Iterator

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

from telemetry_core.brokers import alongside
from telemetry_core.brokers.base import Broker, QueueState
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


def restore_orphans(unacked_root: Path, queue_folder: Path, skip: str | None = None) -> int:
    """Moves back into the queue every taken message whose owner process has ended; returns how many.

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
                try:
                    os.rename(folder / message, queue_folder / message)
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


def remove_abandoned_partials(queue_folder: Path) -> int:
    """Deletes the partial files of publishers that died mid-write (never renamed into place,
    so never a message anyone took or counted); returns how many."""
    now = time.time()
    removed = 0
    for name in os.listdir(queue_folder):
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


def expire_broadcasts(channel: filesystem.Channel, control_ttl: float, event_ttl: float) -> set[str]:
    """Deletes every broadcast message older than its TTL, and unbinds its queue (the queue of
    a consumer that is gone: a live one took it long ago); returns those queues."""
    queue_folder = Path(channel.data_folder_in)
    now = time.time()
    stale: set[str] = set()
    for name in os.listdir(queue_folder):
        queue = name.partition(".")[2].removesuffix(".msg")  # `<ms>_<uuid>.<queue>.msg`
        ttl = broadcast_ttl(queue, control_ttl, event_ttl)
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


def events_in_name(name: str, default: int) -> int:
    """The events a message file's name says it carries (`<ms>_<uuid>_<events>.<queue>.msg`);
    `default` for a name without the count (kombu's, or an older release's)."""
    parts = name.partition(".")[0].split("_")
    return int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else default


class Channel(filesystem.Channel):
    """The filesystem channel, taking messages by rename into this process's unacked folder."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._taken: dict[str, Path] = {}  # delivery tag -> its file in our unacked folder
        self._no_ack_queues: set[str] = set()  # remote control and event queues: no acks come
        self._next_sweep = 0.0
        self._own_bindings: set[tuple[str, str, str, str]] = set()  # (exchange, routing key, pattern, queue)

    @property
    def unacked_root(self) -> Path:
        return Path(self.transport_options.get("unacked_folder", "unacked"))

    # -- taking ----------------------------------------------------------------------
    def _get(self, queue: str) -> dict[str, Any]:
        queue_folder = self.data_folder_in
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + ORPHAN_SWEEP_INTERVAL
            self._sweep(Path(queue_folder))
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
            except PermissionError as error:
                # Another user's file, its mode too narrow for us (a publisher's umask): left in the
                # queue for a process that can read it, or for us once the mode is fixed.
                _warn_once(Path(queue_folder, name), "read", error)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(taken, os.path.join(queue_folder, name))
                continue
            except (ValueError, TypeError, KeyError):
                # Since `_put` renames a message in only once it is whole, this is a file written
                # in place (still being written, if recent) or not a message at all.
                self._set_aside_unreadable(taken, queue_folder)
                continue
            if queue in self._no_ack_queues:
                taken.unlink()
            else:
                self._taken[tag] = taken
            return payload
        raise Empty()

    def _set_aside_unreadable(self, taken: Path, queue_folder: str) -> None:
        """A file that does not parse: back into the queue while it may still be being written,
        then into `unreadable/` beside the queue, kept for the operator and never taken again."""
        try:
            if time.time() - taken.stat().st_mtime < UNREADABLE_GRACE:
                os.rename(taken, os.path.join(queue_folder, taken.name))
                return
            self.unreadable_folder.mkdir(exist_ok=True)
            os.rename(taken, self.unreadable_folder / taken.name)
        except FileNotFoundError:
            return
        log.warning("embedded queue: %s is not a readable message: moved to %s", taken.name, self.unreadable_folder)

    # -- publishing ------------------------------------------------------------------------
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        """kombu's `_put`, but the message appears under its name only once it is whole.

        kombu creates the file under its final name and then writes it, so a consumer listing
        the folder meanwhile took it empty or cut short (and dropped it as unreadable). Here
        it is written under a name no consumer and no `status` count matches, flushed to
        disk (a crash must not leave a renamed but empty file) and renamed into place:
        kombu's name and ordering are kept.
        """
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}{_events_suffix(payload)}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, f".{name}{PARTIAL_SUFFIX}")
        data = memoryview(str_to_bytes(dumps(payload)))
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides the mode
            try:
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc

    @property
    def unreadable_folder(self) -> Path:
        return Path(self.transport_options.get("unreadable_folder") or self.unacked_root.parent / "unreadable")

    def _sweep(self, queue_folder: Path) -> None:
        mine = _owners.get((os.getpid(), self.unacked_root))
        restore_orphans(self.unacked_root, queue_folder, skip=mine.name if mine else None)
        remove_abandoned_partials(queue_folder)
        expire_broadcasts(self, float(self.transport_options.get("control_message_ttl", CONTROL_MESSAGE_TTL)),
                          float(self.transport_options.get("event_message_ttl", EVENT_MESSAGE_TTL)))
        # Bind again the queues this channel consumes: another sweeper unbinds a queue whose
        # broadcast waited past its TTL, which a consumer stalled that long would have let happen.
        for exchange, routing_key, pattern, queue in self._own_bindings:
            if queue in self._active_queues:
                super()._queue_bind(exchange, routing_key, pattern, queue)

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


def broker_folders(settings: Settings) -> dict[str, Path]:
    """Where the embedded queue keeps its files; creates nothing (`status` only reads)."""
    root = settings.data_dir / "broker"
    return {name: root / name for name in ("queue", "control", "unacked")}


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
        }

    def start_worker_alongside(self) -> None:
        # The design and its locks: telemetry_core/brokers/alongside.py.
        alongside.start_for_server(self.settings)

    def worker_starting(self) -> None:
        alongside.hold_for_worker(self.settings)

    def reply_transport_options(self) -> dict[str, Any]:
        # kombu's default polling interval (1 s) would add up to a second to each answer.
        return {"polling_interval": POLLING_INTERVAL}

    def _message_names(self) -> tuple[list[str], list[str]]:
        """The names of the telemetry queue's messages: (waiting, held by workers); raises when
        the queue's folder does not exist yet or cannot be used."""
        folders = broker_folders(self.settings)
        if not folders["queue"].is_dir():
            raise FileNotFoundError(f"the embedded queue {folders['queue']} does not exist yet: "
                                    "no server or worker with this RUBRIX_TELEMETRY_DATA_DIR has started")
        if not os.access(folders["queue"], os.R_OK | os.W_OK):
            raise PermissionError(f"cannot read and write {folders['queue']}")
        # kombu's filesystem transport names each message `<time>_<id>.<queue>.msg`; a taken
        # message keeps its name in its worker's folder `unacked/<pid>-<random>/` until the ack
        # deletes it (or it goes back to the queue when its worker dies).
        ours = f"{self.settings.queue}.msg"
        waiting = [name for name in os.listdir(folders["queue"]) if name.partition(".")[2] == ours]
        unacked = folders["unacked"]
        held_folders = [folder for folder in unacked.iterdir() if folder.is_dir()] if unacked.is_dir() else []
        held = [name for folder in held_folders for name in _names_in(folder) if name.partition(".")[2] == ours]
        return waiting, held

    def queue_state(self, timeout: float) -> QueueState:
        waiting, held = self._message_names()
        return QueueState(depth=len(waiting), held=len(held))

    def backlog(self, timeout: float, under: int | None = None) -> int | None:
        # Exact for this release's messages, from the listings alone (the count is in the name).
        if not broker_folders(self.settings)["queue"].is_dir():
            return 0  # nothing has started on this data folder yet: nothing waits
        waiting, held = self._message_names()
        default = self.settings.events_per_task
        return sum(events_in_name(name, default) for names in (waiting, held) for name in names)

    def backlog_method(self) -> str:
        return "the event count in each message file's name (queue and unacked folders)"

    def counts_store(self, timeout: float) -> FileCounts:
        return FileCounts(self.settings.data_dir)
