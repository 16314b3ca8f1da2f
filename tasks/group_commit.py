"""Group commit: the tasks running at once in a worker process share one sender, which sends
the events of every task waiting on it in one POST.

On a quiet server each event is a task message of its own; a backlog of them, one POST each,
cost 20,000 POSTs for 20,000 events. Here each task hands its encoded events to the process's
sender and waits for its own outcome. The sender's thread takes everything waiting at that
moment (within Segment's limits: 500 KB and 2,500 events per batch) and POSTs it: the first
task on an idle worker goes out at once, with no added wait, and while a POST is in flight the
next tasks' events gather for the next one. The worker's thread pool (tasks/celery.py) is what
lets many tasks wait at once. Each task then ends, and is acknowledged, on its own outcome:
`tasks.segment.deliver_groups` keeps the answers apart per task, and narrows a refused batch
down before dropping anything.
"""

from __future__ import annotations

import collections
import os
import threading
import time

from celery.worker import state as worker_state

from telemetry_core.settings import Settings
from tasks.remote_status import record_last_delivery
from tasks.segment import MAX_BATCH_BYTES, MAX_BATCH_EVENTS, DeliveryOutcome, Group, Message, deliver_groups, \
    encode_group, merged


# How long the sender waits for the next task of a backlog, and for all of them at most.
GATHER_GAP = 0.01
GATHER_MAX = 0.2
# Enough tasks for one POST: half the worker's threads (tasks/celery.py), so that the other
# half keeps taking messages while this POST is sent.
GATHER_TASKS = 64


def _tasks_held() -> int:
    """The task messages this process's worker holds (taken from the broker, not yet finished);
    0 in a pool child of a prefork worker, whose consumer is the parent."""
    return len(worker_state.reserved_requests)


class _Waiting:
    """A task's group, and what tells the task that its outcome is there."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.done = threading.Event()
        self.error: Exception | None = None  # an unexpected error of the sender (a bug)


class GroupSender:
    """The one sender of a worker process (see the module's docstring); its thread starts with
    the first delivery, in each process that delivers (a forked pool child starts its own)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._hostname = ""
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        # Whether the last task came within GATHER_GAP of the one before it: tasks stream in
        # (a backlog the broker hands over one by one) even when the worker holds few at a time.
        self._streaming = False
        self._last_arrival = 0.0
        self._concurrent = False
        self._draining = False  # the last POST carried several tasks
        self._pid = 0

    def deliver(self, messages: list[Message], hostname: str) -> DeliveryOutcome:
        """Sends a task's messages with whatever else waits; returns what became of its own."""
        waiting = _Waiting(encode_group(messages))
        with self._changed:
            self._start_thread()
            self._hostname = hostname
            now = time.monotonic()
            self._streaming, self._last_arrival = now - self._last_arrival < GATHER_GAP, now
            # A solo worker, or a prefork pool's child, runs its tasks in its main thread, one at
            # a time: no other task can come while this one waits, so nothing is gathered.
            self._concurrent = threading.current_thread() is not threading.main_thread()
            self._waiting.append(waiting)
            self._changed.notify()
        waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        return waiting.group.outcome

    def _start_thread(self) -> None:
        # Called with the condition held.
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        self._pid = os.getpid()
        # A daemon: a stopping worker waits for its running tasks, and they for this thread.
        self._thread = threading.Thread(target=self._run, name="telemetry-group-sender", daemon=True)
        self._thread.start()

    def _take(self) -> list[_Waiting]:
        """Everything waiting that fits one batch, in order (at least one task's messages:
        one over a batch goes alone, in as many POSTs as it needs)."""
        with self._changed:
            while not self._waiting:
                self._changed.wait()
            self._gather()
            taken = [self._waiting.popleft()]
            self._draining = False
            events, size = len(taken[0].group.encoded), taken[0].group.size
            while self._waiting:
                group = self._waiting[0].group
                if events + len(group.encoded) > MAX_BATCH_EVENTS or size + group.size > MAX_BATCH_BYTES:
                    break
                taken.append(self._waiting.popleft())
                events, size = events + len(group.encoded), size + group.size
            # A POST of several tasks: a backlog drains, the next POST gathers (`_gather`).
            self._draining = len(taken) > 1
            return taken

    def _gather(self) -> None:
        """While a backlog is being drained (the worker holds tasks that have not reached the
        sender yet, or tasks keep coming less than GATHER_GAP apart), waits for the next ones as
        long as they keep coming, GATHER_MAX at most: a POST to a nearby backend takes less than
        the worker needs to take and start a task, so without it the tasks of a backlog would go
        out nearly one by one, each paying a POST and a count. A quiet worker (every task it
        holds waits here already, the last came long ago) sends at once. Called with the
        condition held."""
        deadline = time.monotonic() + GATHER_MAX
        while self._concurrent and len(self._waiting) < GATHER_TASKS:
            more_coming = self._draining or _tasks_held() > len(self._waiting)
            if not (more_coming or self._streaming):
                return
            before, left = len(self._waiting), deadline - time.monotonic()
            if left <= 0:
                return
            self._changed.wait(min(GATHER_GAP, left))
            # While a backlog drains (the last POST carried several tasks, or the worker holds
            # tasks that have not come yet) a gap is the worker being slow to start the next
            # task, not the end: only a stream with nothing more in sight ends at its first gap.
            if len(self._waiting) == before and not more_coming:
                return

    def _run(self) -> None:
        while True:
            taken = self._take()
            groups = [waiting.group for waiting in taken]
            try:
                deliver_groups(groups, self.settings)
                # Once per POST, not per task: what `status` shows as this worker's last delivery.
                record_last_delivery(self.settings, self._hostname, merged([group.outcome for group in groups]))
            except Exception as error:  # noqa: BLE001 (each task counts its events as dropped)
                for waiting in taken:
                    waiting.error = error
            for waiting in taken:
                waiting.done.set()
