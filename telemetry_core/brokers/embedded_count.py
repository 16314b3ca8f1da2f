"""The embedded queue's running count of what waits: messages, events and bytes per queue, in one small file.

Counting the backlog by listing the queue folder cost 11 ms at 10,000 waiting files and 48 ms
at 50,000, and the publisher asks before every publish. Here every change is counted as it is
made, in `<broker folder>/backlog.json`, under an exclusive flock(2) on that file:

- a publish (`Channel._put`) renames its message into the queue and adds it (1 message, the
  events its name carries, its size) under the same lock;
- an ack, a drop for good, a purge, or a file set aside as unreadable, removes it and
  subtracts it under the same lock;
- a take, a requeue, a warm shutdown's restore, a dead worker's messages put back: these
  move a message between the queue folder and `unacked/`; what waits does not change, and
  neither does the count.

Reading it (`EmbeddedBroker.backlog`, `backlog_bytes`, `queue_state`) is one open, a shared
lock and a read, whatever waits.

The count cannot see what was written without it: an earlier release's files, a file an
operator copied in, a publisher killed between its rename and its count. So it is recounted
from the folders' listings (`take_census`: the unacked folders, the queue folder, the unacked
folders again, so that a message moving between them during the listing is seen in one of
them; one stat(2) per file for its size) every `RECOUNT_INTERVAL` by one consumer at a time (a
flock on `recount.lock`), or by a reader (the server's check, `status`) when no consumer has
for `READER_RECOUNT_AFTER`. While a recount lists, each counted change is also appended to
`backlog.journal`; the recount's result is the names it saw plus those published meanwhile,
minus those removed meanwhile, so that nothing that moved during it is counted twice or
missed. A recounter killed mid-way leaves its journal to the next one, which starts afresh.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger("telemetry_core.brokers.embedded")

COUNT_FILE = "backlog.json"
JOURNAL_FILE = "backlog.journal"
RECOUNT_LOCK = "recount.lock"
# A consumer (its sweep runs every 5 s) recounts once the last recount is this old: a message
# the count did not see written is counted within RECOUNT_INTERVAL + 5 s.
RECOUNT_INTERVAL = 30.0
# A reader recounts only when no consumer has for this long (no worker runs): consumers, not
# the server's publisher thread, should pay for the listing.
READER_RECOUNT_AFTER = 45.0
# A recount given up (its journal too long to merge: publishers writing faster than it lists)
# is tried again at the next sweep.
JOURNAL_LIMIT = 100_000


def queue_of(name: str) -> str | None:
    """The queue a message file's name `<ms>_<uuid>[_<events>].<queue>.msg` belongs to; None
    for any other name (a `.partial`, a lock, a folder)."""
    if name.startswith(".") or not name.endswith(".msg"):
        return None
    queue = name.partition(".")[2].removesuffix(".msg")
    return queue or None


def events_in_name(name: str) -> int | None:
    """The events a message file's name says it carries (`<ms>_<uuid>_<events>.<queue>.msg`);
    None for a name without the count (kombu's, or an older release's)."""
    parts = name.partition(".")[0].split("_")
    return int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else None


@dataclass
class Tally:
    """What waits in one queue, queued and held by workers."""

    messages: int = 0
    named_events: int = 0  # the events of the messages whose name carries their count
    unnamed: int = 0  # messages whose name carries no count (an older release's)
    bytes: int = 0

    def change(self, name: str, size: int, sign: int) -> None:
        events = events_in_name(name)
        self.messages += sign
        self.bytes += sign * size
        if events is None:
            self.unnamed += sign
        else:
            self.named_events += sign * events

    def events(self, per_unnamed: int) -> int:
        """The events, a message without a count in its name counting `per_unnamed` (never below 0:
        a file the count never saw written may be removed before the recount finds it)."""
        return max(0, self.named_events + self.unnamed * per_unnamed)

    def as_list(self) -> list[int]:
        return [self.messages, self.named_events, self.unnamed, self.bytes]


@dataclass
class State:
    """The content of `backlog.json`."""

    queues: dict[str, Tally] = field(default_factory=dict)
    recounted_at: float = 0.0  # time.time() of the last recount's end; 0: never
    recounting: bool = False  # a recount lists now: changes go to the journal too

    def tally(self, queue: str) -> Tally:
        return self.queues.setdefault(queue, Tally())

    def due(self, after: float, now: float) -> bool:
        """Whether the last recount is `after` seconds old (or in the future: the clock went back)."""
        return not 0 <= now - self.recounted_at < after

    def dumps(self) -> bytes:
        return json.dumps({"queues": {queue: tally.as_list() for queue, tally in self.queues.items()},
                           "recounted_at": self.recounted_at, "recounting": self.recounting}).encode()

    @classmethod
    def loads(cls, raw: bytes) -> State | None:
        """None for an empty or damaged file (a crash mid-write): then only a recount knows."""
        try:
            document = json.loads(raw)
            queues = {str(queue): Tally(*(int(n) for n in figures)) for queue, figures in document["queues"].items()}
            return cls(queues, float(document["recounted_at"]), bool(document["recounting"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    @classmethod
    def of(cls, messages: dict[str, int], recounted_at: float) -> State:
        """The count of these message files (name -> size; names `queue_of` accepts)."""
        # One pass, grouped by the name's `<queue>.msg` end: at 100,000 files a recount's cost is
        # mostly this loop's.
        figures_by_end: dict[str, list[int]] = {}
        for name, size in messages.items():
            head, _, end = name.partition(".")
            figures = figures_by_end.get(end)
            if figures is None:
                figures = figures_by_end[end] = [0, 0, 0, 0]
            figures[0] += 1
            figures[3] += size
            parts = head.split("_")
            if len(parts) == 3 and parts[2].isdigit():
                figures[1] += int(parts[2])
            else:
                figures[2] += 1
        return cls({end.removesuffix(".msg"): Tally(*figures) for end, figures in figures_by_end.items()},
                   recounted_at)


@dataclass
class Change:
    """The messages one locked change adds and removes: (name, size, +1 or -1)."""

    entries: list[tuple[str, int, int]] = field(default_factory=list)

    def add(self, name: str, size: int) -> None:
        self.entries.append((name, size, +1))

    def remove(self, name: str, size: int) -> None:
        self.entries.append((name, size, -1))


@dataclass
class Census:
    """What a recount's listing found: the counted messages (name -> size), and the queue
    folder's other entries (hidden: `.partial` files; uncounted: messages of queues
    `counted` refused)."""

    messages: dict[str, int] = field(default_factory=dict)
    hidden: list[str] = field(default_factory=list)
    uncounted: list[str] = field(default_factory=list)
    # Whether a name ending so (`<queue>.msg`) is a counted message (2), an uncounted one (1) or
    # no message (0): decided once per queue, not once per file.
    kinds: dict[str, int] = field(default_factory=dict)

    def kind(self, name: str, counted: Callable[[str], bool]) -> int:
        end = name.partition(".")[2]
        kind = self.kinds.get(end)
        if kind is None:
            queue = queue_of(name)  # depends on `end` alone for a name not starting with "."
            kind = self.kinds[end] = 0 if queue is None else 2 if counted(queue) else 1
        return kind


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _warn_once(what: str, error: OSError) -> None:
    with _warned_lock:
        if what in _warned:
            return
        _warned.add(what)
    log.warning("embedded queue: cannot %s (%s): the backlog's running count misses this process's changes "
                "until a recount (every %.0f s); every process of the deployment must be able to read and write the broker folder's files "
                "(README, Workers)", what, error.strerror or error, RECOUNT_INTERVAL)


class BacklogCount:
    """The running count of the queues in `queue_folder` and the folders under `unacked_root`."""

    def __init__(self, broker_root: Path, queue_folder: Path, unacked_root: Path) -> None:
        self.path = broker_root / COUNT_FILE
        self.journal_path = broker_root / JOURNAL_FILE
        self.recount_lock_path = broker_root / RECOUNT_LOCK
        self.queue_folder = queue_folder
        self.unacked_root = unacked_root

    # -- the file ---------------------------------------------------------------------------
    def _open(self, mode: int) -> int | None:
        """The count file, locked (fcntl.LOCK_EX to change it, LOCK_SH to read it); None when it
        cannot be opened (a read-only user: `status` as another user)."""
        try:
            if mode == fcntl.LOCK_EX:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # the umask decides
            else:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as error:
            _warn_once(f"open {self.path}", error)
            return None
        try:
            fcntl.flock(fd, mode)  # one per open file: threads of a process exclude each other too
        except OSError as error:  # a file system without locks
            os.close(fd)
            _warn_once(f"lock {self.path}", error)
            return None
        return fd

    @staticmethod
    def _read(fd: int) -> State | None:
        chunks = []
        while chunk := os.pread(fd, 65536, sum(map(len, chunks))):
            chunks.append(chunk)
        return State.loads(b"".join(chunks))

    def _write(self, fd: int, state: State) -> None:
        data = state.dumps()
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except OSError as error:  # a full disk: the recount corrects what this misses
            _warn_once(f"write {self.path}", error)

    def read(self) -> State | None:
        """The count as it stands; None when there is none yet (or it is damaged)."""
        fd = self._open(fcntl.LOCK_SH)
        if fd is None:
            return None
        try:
            return self._read(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def change(self) -> Iterator[Change]:
        """Holds the count's lock while the caller moves message files in or out of what waits,
        and notes on `Change` what it moved; applies that once the block ends without raising.

        The move happens under the lock so that a recount's end sees each move either whole
        (the file where it went, and the count changed) or not at all. When the count cannot
        be kept (its file cannot be opened), the move still happens, uncounted."""
        noted = Change()
        fd = self._open(fcntl.LOCK_EX)
        try:
            yield noted
            if fd is not None and noted.entries:
                state = self._read(fd)
                if state is None:
                    # No count yet (or a damaged one): a recount is due at the next look, and
                    # counts whatever this change moved.
                    return
                for name, size, sign in noted.entries:
                    queue = queue_of(name)
                    if queue is not None:
                        state.tally(queue).change(name, size, sign)
                if state.recounting:
                    self._journal(noted)
                self._write(fd, state)
        finally:
            if fd is not None:
                os.close(fd)

    def _journal(self, noted: Change) -> None:
        lines = "".join(f"{'+' if sign > 0 else '-'} {size} {name}\n" for name, size, sign in noted.entries)
        try:
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                os.write(fd, lines.encode())
            finally:
                os.close(fd)
        except OSError as error:
            _warn_once(f"write {self.journal_path}", error)

    def _journal_entries(self) -> Iterator[tuple[str, str, int]]:
        """(sign, name, size) of each change noted during the recount."""
        try:
            text = self.journal_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return
        for line in text.splitlines():
            sign, _, rest = line.partition(" ")
            size, _, name = rest.partition(" ")
            if sign in "+-" and size.isdigit() and name:
                yield sign, name, int(size)

    def _clear_journal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.truncate(self.journal_path, 0)

    # -- recounting -------------------------------------------------------------------------
    def current(self, recount_after: float, counted: Callable[[str], bool]) -> State:
        """The count, recounted first when the last recount is `recount_after` seconds old or
        there is none; from a census of our own when it cannot be kept."""
        state = self.read()
        if state is not None and not state.due(recount_after, time.time()):
            return state
        census = self.recount(recount_after, counted)
        fresh = self.read()
        if fresh is not None and not fresh.due(recount_after, time.time()):
            return fresh  # the recount's (this process's or another's), with what changed since
        if census is None:
            # Another process recounts right now: its figure comes at the next look.
            return fresh if fresh is not None else State.of(self.take_census(counted).messages, time.time())
        return State.of(census.messages, time.time())  # recounted here, but the count cannot be kept

    def recount(self, due_after: float, counted: Callable[[str], bool]) -> Census | None:
        """Recounts from the folders' listings when no other process does and the last recount is
        `due_after` seconds old; returns the census, or None when it did not recount."""
        try:
            lock_fd = os.open(self.recount_lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as error:
            _warn_once(f"open {self.recount_lock_path}", error)
            return self.take_census(counted)  # counted for this caller, not kept
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # another process recounts
            return self._recount_holding_lock(due_after, counted)
        finally:
            os.close(lock_fd)

    def _recount_holding_lock(self, due_after: float, counted: Callable[[str], bool]) -> Census | None:
        # First the names alone (one listing, no stat): when they make the messages and events
        # the count has, the count is right, its bytes included. Only when they do not (a file
        # the count did not see) is each file's size read, for a count from scratch.
        for sized in (False, True):
            begun = self._begin(due_after)
            if begun is not True:
                return None if begun is False else self.take_census(counted, sized=True)  # cannot be kept
            census = self.take_census(counted, sized=sized)
            if self._finish(census, counted, replace=sized):
                return census
        return None

    def _begin(self, due_after: float) -> bool | None:
        """Starts journaling the changes; False when the last recount is not `due_after` old
        (another process has just recounted), None when the count cannot be kept."""
        fd = self._open(fcntl.LOCK_EX)
        if fd is None:
            return None
        try:
            state = self._read(fd) or State()
            if not state.due(due_after, time.time()):
                return False
            state.recounting = True  # from now on, every change is journaled
            self._clear_journal()  # what a recounter killed mid-way left, or a first pass's
            self._write(fd, state)
            return True
        finally:
            os.close(fd)

    def _finish(self, census: Census, counted: Callable[[str], bool], replace: bool) -> bool:
        """Ends a recount: what waits is what the census saw, plus what was published while it
        listed, less what was removed meanwhile. `replace`: that becomes the count; else the
        count is kept when it agrees (messages and events), and False is returned when not."""
        fd = self._open(fcntl.LOCK_EX)
        if fd is None:
            return True
        try:
            state = self._read(fd) or State()
            found = dict(census.messages)
            removed: set[str] = set()
            journaled = 0
            for sign, name, size in self._journal_entries():
                journaled += 1
                if sign == "+":
                    if not name.startswith(".") and census.kind(name, counted) == 2:
                        found.setdefault(name, size)  # published after the listing passed its place
                else:
                    removed.add(name)  # gone, whether the listing saw it or not
            if journaled > JOURNAL_LIMIT:
                log.info("embedded queue: backlog recount given up (%d changes while it listed)", journaled)
                state.recounting = False
                self._write(fd, state)
                return True
            for name in removed:
                found.pop(name, None)
            recounted = State.of(found, time.time())
            if not replace:
                if not _agree(recounted, state, counted):
                    return False  # the journal goes on: the sized pass starts it afresh
                state.recounting, state.recounted_at = False, recounted.recounted_at
                recounted = state
            self._write(fd, recounted)
            self._clear_journal()
            return True
        finally:
            os.close(fd)

    def take_census(self, counted: Callable[[str], bool], sized: bool = True) -> Census:
        """Every counted message file in the queue folder and the unacked folders, with its size
        (`sized`; else 0: no stat)."""
        census = Census()
        self._list_unacked(census, counted, sized)  # first and last: a message a worker takes or puts
        self._list_folder(self.queue_folder, census, counted, sized, of_queue_folder=True)  # back meanwhile
        self._list_unacked(census, counted, sized)  # is seen in one of the three listings
        return census

    def _list_unacked(self, census: Census, counted: Callable[[str], bool], sized: bool) -> None:
        try:
            owners = os.listdir(self.unacked_root)
        except OSError:
            return
        for owner in owners:
            if not owner.endswith(".lock"):
                self._list_folder(self.unacked_root / owner, census, counted, sized)

    @staticmethod
    def _list_folder(folder: Path, census: Census, counted: Callable[[str], bool], sized: bool,
                     of_queue_folder: bool = False) -> None:
        try:
            names = os.listdir(folder)
        except OSError:
            return  # gone (its worker acked its last message and ended), or not a folder
        for name in names:
            if name in census.messages:
                continue
            if name.startswith("."):
                if of_queue_folder:
                    census.hidden.append(name)
                continue
            kind = census.kind(name, counted)
            if kind == 1 and of_queue_folder:
                census.uncounted.append(name)
            if kind != 2:
                continue
            try:
                census.messages[name] = os.stat(os.path.join(folder, name)).st_size if sized else 0
            except FileNotFoundError:
                continue  # taken or settled since the listing: another listing or the journal has it


def _agree(recounted: State, state: State, counted: Callable[[str], bool]) -> bool:
    """Whether the names found make the messages and events the running count has, queue by queue."""
    def figures(of: State) -> dict[str, tuple[int, int, int]]:
        return {queue: (tally.messages, tally.named_events, tally.unnamed) for queue, tally in of.queues.items()
                if counted(queue) and (tally.messages, tally.named_events, tally.unnamed) != (0, 0, 0)}
    return figures(recounted) == figures(state)
