"""Task events in batches (tasks/event_flush.py): a worker started with the documented command
drains a backlog and publishes its task events a few dozen to a broker message, where Celery
published one `task.multi` message per task; Flower, or anyone reading with Celery's own event
receiver, still gets every task's received, started and succeeded events."""

from __future__ import annotations

import signal
import threading
import uuid
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
from celery.events.receiver import EventReceiver
from kombu import Connection

from tasks import app
from telemetry_core.settings import broker_transport_options, load_settings
from tests.support import RedisServer, children_fixture, free_port, publish_events, wait_until

pytestmark = pytest.mark.slow

# The documented command: `celery -A tasks worker -Q telemetry -E`, no pool flags.
DOCUMENTED_POOL: tuple[str, ...] = ()
TASK_EVENTS = {"task-received", "task-started", "task-succeeded"}


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


def connection_to(broker_url: str | None = None, embedded_data_dir: Path | None = None) -> Connection:
    """A kombu connection to the broker, configured as the workers' is."""
    settings = load_settings()
    settings = replace(settings, broker_url=None if embedded_data_dir else broker_url or settings.broker_url,
                       data_dir=embedded_data_dir or settings.data_dir)
    return Connection(settings.broker_url_or_default, transport_options=broker_transport_options(settings))


class EventCapture(EventReceiver):
    """Celery's event receiver (what Flower and `celery events` use), recording every event of
    the workers named `<prefix>@...` and how many broker messages carried their task events."""

    def __init__(self, connection: Connection, prefix: str) -> None:
        super().__init__(connection, handlers={"*": self._record}, app=app)
        self.prefix = f"{prefix}@"
        self.events: list[dict[str, Any]] = []
        self.task_messages = 0  # broker messages carrying task events: a `task.multi` list or one event
        self._probes_sent: set[str] = set()
        self._probes: set[str] = set()  # of those, the ones heard

    def _ours(self, event: dict[str, Any]) -> bool:
        return str(event.get("hostname", "")).startswith(self.prefix)

    def _receive(self, body: Any, message: Any, **_: Any) -> None:
        first = body[0] if isinstance(body, list) and body else body
        if isinstance(first, dict) and self._ours(first) and str(first.get("type", "")).startswith("task-"):
            self.task_messages += 1
        super()._receive(body, message)

    def _record(self, event: dict[str, Any]) -> None:
        if self._ours(event):
            self.events.append(event)
        elif event.get("hostname") in self._probes_sent:
            self._probes.add(event["hostname"])

    def wait_listening(self, connection: Connection, timeout: float = 20) -> None:
        """Until an event sent now reaches this receiver: on Redis, events are PUBLISHed to
        subscribers, and one sent before the subscription exists is lost."""
        probe = f"probe-{uuid.uuid4().hex[:8]}@test"
        self._probes_sent = {probe}
        with connection.clone() as probe_connection, \
                app.events.Dispatcher(probe_connection, hostname=probe) as dispatcher:
            def heard() -> bool:
                dispatcher.send("worker-heartbeat")
                return probe in self._probes

            assert wait_until(heard, timeout, interval=0.2), "the event receiver heard nothing"

    def run_in_thread(self) -> None:
        self._thread = threading.Thread(target=self.run, kwargs={"wakeup": False}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Before its broker stops: else it waits for it, reconnecting."""
        self.should_stop = True
        self._thread.join(timeout=10)

    def by_task(self) -> dict[str, set[str]]:
        """Each task's uuid: the types of the events received for it."""
        seen: dict[str, set[str]] = defaultdict(set)
        for event in list(self.events):
            if "uuid" in event:
                seen[event["uuid"]].add(event["type"])
        return seen


@pytest.fixture
def capture() -> Iterator[Any]:
    """capture(connection, worker prefix): an EventCapture running in a thread, listening."""
    started: list[EventCapture] = []

    def start(connection: Connection, prefix: str) -> EventCapture:
        receiver = EventCapture(connection, prefix)
        receiver.run_in_thread()
        started.append(receiver)
        receiver.wait_listening(connection)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


def drain_and_check(children, collectors, capture, count: int, queue: str, broker_url: str | None = None,
                    embedded_data_dir: Path | None = None) -> EventCapture:
    """`count` one-event task messages wait; a documented worker drains them: every task shows
    received, started and succeeded to the event receiver, and every event reached the sink."""
    sent = publish_events(count, queue, broker_url=broker_url, embedded_data_dir=embedded_data_dir,
                          events_per_task=1)
    collector = collectors()
    name = f"eventflush-{uuid.uuid4().hex[:8]}"
    receiver = capture(connection_to(broker_url, embedded_data_dir), name)
    children.worker(queue, collector.url, broker_url=broker_url, embedded_data_dir=embedded_data_dir,
                    pool_args=DOCUMENTED_POOL, extra_args=("-E", "-n", f"{name}@%h"))

    def all_shown() -> bool:
        tasks = receiver.by_task()
        return len(tasks) == count and all(types >= TASK_EVENTS for types in tasks.values())

    assert wait_until(all_shown, timeout=30), (
        f"{sum(1 for t in receiver.by_task().values() if t >= TASK_EVENTS)} of {count} tasks showed all three events")
    assert wait_until(lambda: len(collector.accepted_messages()) >= count, timeout=10)
    assert {m["messageId"] for m in collector.accepted_messages()} == {event["messageId"] for event in sent}
    return receiver


def test_a_drain_publishes_its_task_events_a_few_dozen_per_message(children, collectors, capture, redis_server):
    count = 300
    receiver = drain_and_check(children, collectors, capture, count, f"ef-{uuid.uuid4().hex[:8]}",
                               broker_url=redis_server.url)
    # 900 task events; Celery alone published them in about one `task.multi` message per task.
    assert receiver.task_messages <= count / 5, f"{receiver.task_messages} event messages for {count} tasks"


def test_on_rabbitmq_every_task_still_shows_its_events_in_few_messages(children, collectors, capture,
                                                                         rabbitmq_vhost):
    count = 200
    receiver = drain_and_check(children, collectors, capture, count, "telemetry", broker_url=rabbitmq_vhost.url)
    # Fewer than on Redis without batching (about one per four tasks measured: the loop takes several
    # messages per iteration from RabbitMQ's socket), a handful with it.
    assert receiver.task_messages <= count / 8, f"{receiver.task_messages} event messages for {count} tasks"


def test_on_the_embedded_queue_every_task_shows_its_events_in_few_messages(children, collectors, capture, tmp_path):
    # No event loop there (kombu's filesystem transport polls): Celery alone published each event
    # as a message of its own (150 for 50 tasks); the consumer's timer thread flushes them here.
    count = 50
    receiver = drain_and_check(children, collectors, capture, count, "telemetry", embedded_data_dir=tmp_path / "data")
    assert receiver.task_messages <= count / 2, f"{receiver.task_messages} event messages for {count} tasks"


def test_a_worker_stopped_mid_drain_still_publishes_the_events_of_every_task_it_ran(children, collectors, capture,
                                                                                    redis_server):
    queue = f"ef-{uuid.uuid4().hex[:8]}"
    publish_events(1500, queue, broker_url=redis_server.url, events_per_task=1)
    collector = collectors()
    name = f"eventflush-{uuid.uuid4().hex[:8]}"
    receiver = capture(connection_to(redis_server.url), name)
    worker = children.worker(queue, collector.url, broker_url=redis_server.url, pool_args=DOCUMENTED_POOL,
                             extra_args=("-E", "-n", f"{name}@%h"))
    assert wait_until(lambda: len(collector.accepted_messages()) >= 200, timeout=30)
    worker.stop(signal.SIGTERM)  # a warm shutdown: the tasks running finish, the rest stay in Redis
    assert worker.process.returncode == 0, worker.log()[-3000:]
    assert redis_server.client().llen(queue) > 0, "the worker finished before it was stopped"

    delivered = len(collector.accepted_messages())
    # Each task that delivered its event got its task-succeeded to the receiver, the last ones
    # too (buffered when the worker stopped).
    assert wait_until(lambda: sum("task-succeeded" in t for t in receiver.by_task().values()) >= delivered,
                      timeout=10), (sum("task-succeeded" in t for t in receiver.by_task().values()), delivered)
    started = {task for task, types in receiver.by_task().items() if "task-started" in types}
    unfinished = {task for task in started if "task-succeeded" not in receiver.by_task()[task]}
    assert not unfinished, f"{len(unfinished)} tasks started and never showed an end"


def test_after_the_broker_comes_back_the_events_still_go_out_in_batches(children, collectors, capture, tmp_path):
    # A redis-server of this test's own: the worker reconnects, and Celery makes a new event
    # dispatcher, which the step must set up again. Restarted while the worker is idle (a restart
    # with deliveries under way: tests/test_redis_restart.py).
    redis = RedisServer(port=free_port(), folder=tmp_path / "redis")
    redis.start()
    receiver: EventCapture | None = None
    try:
        queue = f"ef-{uuid.uuid4().hex[:8]}"
        collector = collectors()
        name = f"eventflush-{uuid.uuid4().hex[:8]}"
        connection = connection_to(redis.url)
        receiver = capture(connection, name)
        worker = children.worker(queue, collector.url, broker_url=redis.url, pool_args=DOCUMENTED_POOL,
                                 extra_args=("-E", "-n", f"{name}@%h"))
        publish_events(50, queue, broker_url=redis.url, events_per_task=1)
        assert wait_until(lambda: len(collector.accepted_messages()) >= 50, timeout=30)

        redis.restart()
        assert wait_until(lambda: worker.log().count("Connected to redis") >= 2, timeout=30), worker.log()[-3000:]
        receiver.wait_listening(connection)  # it reconnected too
        seen_before, messages_before = len(receiver.events), receiver.task_messages
        count = 300
        publish_events(count, queue, broker_url=redis.url, events_per_task=1)

        def after_restart() -> dict[str, set[str]]:
            seen: dict[str, set[str]] = defaultdict(set)
            for event in receiver.events[seen_before:]:
                if "uuid" in event:
                    seen[event["uuid"]].add(event["type"])
            return seen

        assert wait_until(lambda: len(after_restart()) == count and all(
            types >= TASK_EVENTS for types in after_restart().values()), timeout=30), worker.log()[-3000:]
        messages = receiver.task_messages - messages_before
        assert messages <= count / 5, f"{messages} event messages for {count} tasks"
    finally:
        if receiver is not None:
            receiver.stop()
        redis.stop()
