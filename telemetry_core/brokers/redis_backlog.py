"""The Redis backlog in events: a running count, kept true by a recount in slices.

What waits is the queue's list and the messages workers hold in the hash `unacked`. Reading
every message's event-count header at each check held Redis 1 s at 100,000 messages, and
Redis answers nobody while a script runs. So:

- The count is the field `<queue>` of the hash COUNT_KEY: a publish adds the events of the
  message the broker took (`add_published`: a server's task message, or a worker's retry),
  a worker subtracts those of a message it settled for good (`subtract_settled`). A check
  reads it: one HGET, whatever waits. Both writers never raise: what they miss, the recount finds.
- The count misses what it did not see written: a message of an earlier release (no header,
  no count), a process killed between the push and its count, a retry published by an older
  worker. `Recount` rebuilds it from the messages themselves, at most every
  RECOUNT_INTERVAL, in slices (each a short script: MAX_SLICE_BYTES of the list, or a page
  of HSCAN over `unacked`) so that no command holds Redis for long, by one process at a
  time (a lock, SET NX PX, renewed by each slice), in a daemon thread of the process whose
  check found it due: no caller waits for it.
- Messages move while the recount reads them. It counts what waited when it began: the
  count and the messages pushed so far (the field `<queue>:messages`) are read then, and
  each slice skips the messages pushed since (LPUSH puts them at the head, where the slices
  start). At the end, in one script, count := recount + (count now - count at the start):
  what was published and settled meanwhile is kept.

Residual error, until the next recount: a message a worker takes from the list's tail after
its slice was read and still holds when HSCAN reaches it is counted twice; one taken
before its slice and settled before HSCAN reaches it is not counted (both bounded by what
workers take in the recount's second or so); a publish or a settle whose count lands during
the recount, for a message pushed or removed before it began, is counted twice; HSCAN may
return a field twice while the hash grows. All settle at the next recount, RECOUNT_INTERVAL
later. A count below zero (a settle counted before its publish) reads as 0.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from typing import Any

from telemetry_core.message import EVENTS_HEADER

log = logging.getLogger("telemetry_core.brokers.redis_backlog")

COUNT_KEY = "rubrix-telemetry:backlog"
# Exists (with a TTL of RECOUNT_INTERVAL) while the last recount is recent enough.
RECOUNTED_KEY = "rubrix-telemetry:backlog-recounted:{queue}"
RECOUNT_LOCK_KEY = "rubrix-telemetry:backlog-recount-lock:{queue}"
# Seconds between two recounts: a message the count did not see is counted within about
# twice this (it may arrive just after a recount read past it).
RECOUNT_INTERVAL = 30
# The lock's life: renewed by every slice, so a recounter that died frees it this soon.
RECOUNT_LOCK_MS = 10_000
# Each slice reads at most this many bytes of messages, or MAX_SLICE_MESSAGES messages: about
# 0.2 ms of Redis for one-event messages (1.7 KB), as little for 500-event ones (51 KB each).
# Small, because a script is what a loaded machine's scheduler stretches: at a load of 6 on
# 2 cores the longest of 1,000 slices of 128 KB took 19 ms, of 4,000 slices of 32 KB 7.5 ms.
MAX_SLICE_BYTES = 32 * 1024
MAX_SLICE_MESSAGES = 400
HSCAN_PAGE = 50
# A recount that takes longer than this (a Redis far too slow) is given up, the lock freed.
RECOUNT_DEADLINE = 60.0

# Shared by the slice scripts: the events of one raw message (kombu's JSON). The header's
# name is plain ASCII and cannot occur in the base64 body; kombu writes the headers after the
# body, so the last 4 KB are searched first (a plain find: memchr, not a pattern tried at each
# byte, which took 20 µs a message), the whole message only when it is not there (an older
# release's message, which counts `default` events).
_EVENTS_OF = """
local needle = '"%s"'
local function events_of(raw, default)
  local at = string.find(raw, needle, math.max(1, #raw - 4096), true) or string.find(raw, needle, 1, true)
  local n = at and string.match(raw, '^%%s*:%%s*(%%d+)', at + #needle)
  return n and tonumber(n) or default
end
local function ours(lock, token, ms)
  if redis.call('GET', lock) ~= token then return false end
  redis.call('PEXPIRE', lock, ms)
  return true
end
""" % EVENTS_HEADER

# KEYS: queue list, count hash, lock. ARGV: messages field, messages pushed at the start,
# position, default events, token, lock ms, byte budget, most messages.
# Returns {events, messages read, 1 when the list ended}, or false once the lock is not ours.
LIST_SLICE_SCRIPT = _EVENTS_OF + """
if not ours(KEYS[3], ARGV[5], ARGV[6]) then return false end
local pushed = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') - tonumber(ARGV[2])
local at = tonumber(ARGV[3]) + math.max(0, pushed)
local default, budget, most = tonumber(ARGV[4]), tonumber(ARGV[7]), tonumber(ARGV[8])
local events, read, bytes, ended = 0, 0, 0, 0
while read < most and bytes < budget do
  local chunk = redis.call('LRANGE', KEYS[1], at + read, at + read + 24)
  for _, raw in ipairs(chunk) do
    events = events + events_of(raw, default)
    bytes = bytes + #raw
  end
  read = read + #chunk
  if #chunk < 25 then ended = 1; break end
end
return {events, read, ended}
"""

# KEYS: unacked hash, lock. ARGV: cursor, default events, token, lock ms, page, suffix of the
# queue's messages (kombu keeps [message, exchange, routing key]: '"<queue>"]').
# Returns {next cursor, events}, or false once the lock is not ours.
HASH_SLICE_SCRIPT = _EVENTS_OF + """
if not ours(KEYS[2], ARGV[3], ARGV[4]) then return false end
local page = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', tonumber(ARGV[5]))
local default, suffix, events = tonumber(ARGV[2]), ARGV[6], 0
for i = 2, #page[2], 2 do
  local raw = page[2][i]
  if string.sub(raw, -#suffix) == suffix then events = events + events_of(raw, default) end
end
return {page[1], events}
"""

# KEYS: count hash, lock, recounted marker. ARGV: count field, recount, count at the start,
# token, interval s. Applies the recount, correcting for what moved meanwhile.
FINISH_SCRIPT = """
if redis.call('GET', KEYS[2]) ~= ARGV[4] then return false end
local now = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local count = tonumber(ARGV[2]) + now - tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], count)
redis.call('SET', KEYS[3], '1', 'EX', tonumber(ARGV[5]))
redis.call('DEL', KEYS[2])
return count
"""

# KEYS: lock. ARGV: token. Frees the lock if it is still ours.
RELEASE_SCRIPT = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def messages_field(queue: str) -> str:
    return f"{queue}:messages"


def add_published(client: Any, queue: str, events: int) -> None:
    """One message of `events` events was pushed: the count and the messages pushed grow."""
    pipe = client.pipeline(transaction=True)
    pipe.hincrby(COUNT_KEY, queue, events)
    pipe.hincrby(COUNT_KEY, messages_field(queue), 1)
    pipe.execute()


# Events of settled messages not yet taken off the count, by queue; whether a thread is writing.
_settled_lock = threading.Lock()
_settled_pending: collections.Counter[str] = collections.Counter()
_settled_writing = False


def _forget_after_fork() -> None:
    # A prefork pool child starts with its parent's state: a write under way there is not its own.
    global _settled_lock, _settled_writing
    _settled_lock, _settled_writing = threading.Lock(), False
    _settled_pending.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def subtract_settled(client: Any, queue: str, events: int) -> None:
    """A message of `events` events was settled for good: the count shrinks.

    A draining worker's threads settle hundreds of messages a second: one thread writes, and each
    of its round trips carries every settle that came while the last was in flight (a HINCRBY a
    message was a GIL hand-off and a round trip each). A thread that finds a write under way
    returns at once; a process killed meanwhile leaves those to the recount, as before.
    """
    global _settled_writing
    with _settled_lock:
        _settled_pending[queue] += events
        if _settled_writing:
            return
        _settled_writing = True
    try:
        while True:
            with _settled_lock:
                taken = {name: count for name, count in _settled_pending.items() if count}
                _settled_pending.clear()
                if not taken:
                    _settled_writing = False
                    return
            pipe = client.pipeline(transaction=False)
            for name, count in taken.items():
                pipe.hincrby(COUNT_KEY, name, -count)
            pipe.execute()
    except BaseException:
        with _settled_lock:
            _settled_writing = False
        raise


def read_count(client: Any, queue: str) -> tuple[int, bool]:
    """(events counted, whether a recount is due: none recent, and none running): one round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.hget(COUNT_KEY, queue)
    pipe.exists(RECOUNTED_KEY.format(queue=queue), RECOUNT_LOCK_KEY.format(queue=queue))
    count, recent_or_running = pipe.execute()
    return max(0, int(count or 0)), not recent_or_running


class Recount:
    """One recount of a queue's backlog, by whoever holds the lock (see the module's docstring)."""

    def __init__(self, client: Any, queue: str, unacked_key: str, default_events: int) -> None:
        self.client = client
        self.queue = queue
        self.unacked_key = unacked_key
        self.default_events = default_events
        self.lock = RECOUNT_LOCK_KEY.format(queue=queue)
        self.token = uuid.uuid4().hex
        self.list_slice = client.register_script(LIST_SLICE_SCRIPT)
        self.hash_slice = client.register_script(HASH_SLICE_SCRIPT)
        self.finish = client.register_script(FINISH_SCRIPT)
        self.release = client.register_script(RELEASE_SCRIPT)

    def run(self) -> int | None:
        """The new count, or None when another process recounts, or the lock was lost."""
        client = self.client
        if not client.set(self.lock, self.token, nx=True, px=RECOUNT_LOCK_MS):
            return None
        try:
            # The count and the messages pushed, read together: the moment the recount counts.
            pipe = client.pipeline(transaction=True)
            pipe.hget(COUNT_KEY, self.queue)
            pipe.hget(COUNT_KEY, messages_field(self.queue))
            count_at_start, pushed_at_start = (int(value or 0) for value in pipe.execute())
            deadline = time.monotonic() + RECOUNT_DEADLINE
            events = self._list_events(pushed_at_start, deadline)
            held = None if events is None else self._held_events(deadline)
            if events is None or held is None:
                return None
            done = self.finish(keys=[COUNT_KEY, self.lock, RECOUNTED_KEY.format(queue=self.queue)],
                               args=[self.queue, events + held, count_at_start, self.token, RECOUNT_INTERVAL])
            return None if done is None else int(done)
        finally:
            self.release(keys=[self.lock], args=[self.token])  # nothing left to free once it finished

    def _list_events(self, pushed_at_start: int, deadline: float) -> int | None:
        total, position = 0, 0
        while time.monotonic() < deadline:
            answer = self.list_slice(keys=[self.queue, COUNT_KEY, self.lock], args=[
                messages_field(self.queue), pushed_at_start, position, self.default_events, self.token,
                RECOUNT_LOCK_MS, MAX_SLICE_BYTES, MAX_SLICE_MESSAGES])
            if answer is None:
                return None
            total += int(answer[0])
            position += int(answer[1])
            if answer[2]:
                return total
        return None

    def _held_events(self, deadline: float) -> int | None:
        total, cursor = 0, "0"
        suffix = f'"{self.queue}"]'
        while time.monotonic() < deadline:
            answer = self.hash_slice(keys=[self.unacked_key, self.lock], args=[
                cursor, self.default_events, self.token, RECOUNT_LOCK_MS, HSCAN_PAGE, suffix])
            if answer is None:
                return None
            cursor = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
            total += int(answer[1])
            if cursor == "0":
                return total
        return None


# The recount running in this process, per queue: one at a time (never inherited by a fork).
_running: dict[tuple[int, int, str], threading.Thread] = {}
_running_lock = threading.Lock()


def recount_in_background(client: Any, queue: str, unacked_key: str, default_events: int) -> None:
    """Starts a recount in a daemon thread, unless this process runs one for the queue already."""
    key = (os.getpid(), id(client), queue)
    with _running_lock:
        running = _running.get(key)
        if running is not None and running.is_alive():
            return

        def recount() -> None:
            try:
                Recount(client, queue, unacked_key, default_events).run()
            except Exception as error:  # noqa: BLE001 (the next check's recount tries again)
                log.debug("telemetry: the backlog recount failed: %r", error)

        thread = threading.Thread(target=recount, name="rubrix-telemetry-backlog-recount", daemon=True)
        _running[key] = thread
        thread.start()
