"""What the embedded queue costs does not follow what waits (issue 22): the backlog is a running
count read from one small file, a consumer lists the queue's folder once per listing used up
rather than once per message, and broadcasts live apart from the task messages.

Figures in docs/reliability.md, "The embedded queue's costs as the backlog grows".
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
from kombu import Connection, Exchange, Queue

from telemetry_core.brokers import broker_for
from telemetry_core.brokers.embedded import EmbeddedBroker
from telemetry_core.message import EVENTS_HEADER
from telemetry_core.settings import Settings, broker_transport_options, load_settings
from tests.support import child_environment, children_fixture, publish_events, run_hook_client, status_json, wait_until

QUEUE = "telemetry"


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


def _settings(data: Path, **changes: Any) -> Settings:
    return replace(load_settings(), broker_url=None, data_dir=data, queue=QUEUE, **changes)


def _broker(data: Path) -> EmbeddedBroker:
    broker = broker_for(_settings(data))
    assert isinstance(broker, EmbeddedBroker)
    return broker


def _connection(data: Path) -> Connection:
    """A kombu connection to the embedded queue in `data`, configured as server and workers are."""
    settings = _settings(data)
    return Connection(settings.broker_url_or_default, transport_options=broker_transport_options(settings))


def _on_disk(data: Path, queue: str = QUEUE) -> tuple[int, int, int]:
    """(messages, events, bytes) of the queue's files, queued and held, read from the disk itself."""
    broker = data / "broker"
    files = [*(broker / "queue").glob(f"*.{queue}.msg"), *(broker / "unacked").glob(f"*/*.{queue}.msg")]
    events = 0
    for path in files:
        headers = json.loads(path.read_bytes())["headers"]
        events += headers.get(EVENTS_HEADER, load_settings().events_per_task)
    return len(files), events, sum(path.stat().st_size for path in files)


def _copies(data: Path, count: int, queue: str = QUEUE, events_in_name: bool = True) -> list[Path]:
    """`count` one-event task messages written straight into the queue's folder, as `Channel._put`
    names them, without the count seeing them (an earlier release's files when not
    `events_in_name`, a publisher killed between its rename and its count, an operator's copy):
    one message of the server's publisher (left in the folder too), copied under new names, each
    its own delivery tag: its file name."""
    folder = data / "broker" / "queue"
    before = set(folder.glob("*")) if folder.is_dir() else set()
    publish_events(1, queue, embedded_data_dir=data, events_per_task=1)
    original, = set(folder.glob(f"*.{queue}.msg")) - before
    template = json.loads(original.read_bytes())
    if not events_in_name:  # an earlier release wrote neither the header nor the count in the name
        del template["headers"][EVENTS_HEADER]
    written = []
    first = int(time.monotonic() * 1000)
    for n in range(count):
        suffix = "_1" if events_in_name else ""
        path = folder / f"{first + n}_{uuid.uuid4()}{suffix}.{queue}.msg"
        template["properties"]["delivery_tag"] = path.name
        path.write_text(json.dumps(template))
        written.append(path)
    return written


class _Listings:
    """Notes each folder listed through os.listdir or os.scandir (the test wraps them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.listed: Counter[Path] = Counter()
        for name in ("listdir", "scandir"):
            monkeypatch.setattr(os, name, self._noting(getattr(os, name)))

    def _noting(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def listing(path: Any = ".") -> Any:
            self.listed[Path(os.fsdecode(path)).resolve()] += 1
            return real(path)
        return listing

    def of(self, folder: Path) -> int:
        return self.listed[folder.resolve()]


# -- the count ---------------------------------------------------------------------------------

def test_the_count_follows_publishes_takes_requeues_and_acks_in_events_and_bytes(tmp_path):
    data = tmp_path / "data"
    publish_events(45, QUEUE, embedded_data_dir=data)  # 20 + 20 + 5 events (RUBRIX_TELEMETRY_EVENTS_PER_TASK=20)
    broker = _broker(data)
    messages, events, size = _on_disk(data)
    assert (messages, events) == (3, 45)
    assert (broker.backlog(5), broker.backlog_bytes(5)) == (45, size)

    with _connection(data) as connection:
        channel = connection.default_channel
        held = channel.basic_get(QUEUE)
        # Taken, not settled: it still waits (held by this consumer), as the count says.
        assert broker.queue_state(5).depth == 2 and broker.queue_state(5).held == 1
        assert (broker.backlog(5), broker.backlog_bytes(5)) == (45, size)
        held.reject(requeue=True)
        assert (broker.queue_state(5).depth, broker.queue_state(5).held) == (3, 0)
        assert (broker.backlog(5), broker.backlog_bytes(5)) == (45, size)

        delivered = channel.basic_get(QUEUE)
        delivered.ack()
        assert broker.backlog(5) == 45 - delivered.headers[EVENTS_HEADER]
        assert (broker.backlog(5), broker.backlog_bytes(5)) == _on_disk(data)[1:]
        assert broker.queue_state(5).depth == 2


@pytest.mark.slow
def test_a_worker_that_retries_leaves_a_count_of_zero_once_it_has_delivered(children, collectors, tmp_path):
    # A retry is published through the same Channel (counted) and replaces its original (acked:
    # subtracted): counted once, never twice.
    data = tmp_path / "data"
    refused_once: set[str] = set()

    def respond(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        first = body["batch"][0]["messageId"]
        if first not in refused_once:
            refused_once.add(first)
            return 503, {}
        return 200, {}

    backend = collectors(0, respond)
    publish_events(45, QUEUE, embedded_data_dir=data)
    broker = _broker(data)
    assert broker.backlog(5) == 45
    worker = children.worker(QUEUE, backend.url, embedded_data_dir=data)
    assert backend.wait_for(lambda b: len(b.accepted_messages()) >= 45, timeout=60), worker.log()
    assert wait_until(lambda: (broker.backlog(5), broker.backlog_bytes(5)) == (0, 0), timeout=10), (
        broker.backlog(5), broker.backlog_bytes(5), _on_disk(data))
    assert len(refused_once) == 3  # each message was retried once


def test_a_recount_counts_once_what_is_published_and_acked_while_it_lists(tmp_path, monkeypatch):
    from telemetry_core.brokers import embedded_count

    data = tmp_path / "data"
    publish_events(60, QUEUE, embedded_data_dir=data)  # 3 messages of 20 events
    _copies(data, 2)  # unseen by the count: a recount finds them
    broker = _broker(data)
    count = embedded_count.BacklogCount(data / "broker", data / "broker" / "queue", data / "broker" / "unacked")
    real_list_folder = embedded_count.BacklogCount._list_folder
    moved: list[str] = []

    def list_folder_while_messages_move(folder, census, counted, sized, of_queue_folder=False):
        real_list_folder(folder, census, counted, sized, of_queue_folder)
        if of_queue_folder:
            # Right after each listing of the queue's folder: one message it saw is delivered
            # (acked), and a new one is published that it did not see.
            with _connection(data) as connection:
                message = connection.default_channel.basic_get(QUEUE)
                message.ack()
                moved.append(message.delivery_tag)
            publish_events(7, QUEUE, embedded_data_dir=data)

    monkeypatch.setattr(embedded_count.BacklogCount, "_list_folder", staticmethod(list_folder_while_messages_move))
    assert count.recount(0, lambda queue: True) is not None
    # Two listings: the names alone disagree with the count (the two copies it did not see),
    # so it counts again, each file's size too.
    assert len(moved) == 2
    monkeypatch.undo()
    messages, events, size = _on_disk(data)
    assert (broker.backlog(5), broker.backlog_bytes(5), broker.queue_state(5).depth) == (events, size, messages)


@pytest.mark.slow
@pytest.mark.load  # waits for a recount: up to a minute
def test_files_the_count_did_not_see_written_are_counted_within_60_s(children, collectors, tmp_path):
    data = tmp_path / "data"
    publish_events(40, QUEUE, embedded_data_dir=data)
    broker = _broker(data)
    assert broker.backlog(5) == 40
    # An idle worker, on another queue of the same folder: its sweep recounts the folder.
    children.worker("elsewhere", collectors().url, embedded_data_dir=data)
    _copies(data, 3, events_in_name=False)  # an earlier release's: counted as EVENTS_PER_TASK each
    _copies(data, 4)  # a publisher killed between its rename and its count, or an operator's copies
    written_at = time.monotonic()
    messages, events, size = _on_disk(data)
    assert events == 40 + 3 * load_settings().events_per_task + 4 + 2  # with the two templates
    assert wait_until(lambda: broker.backlog(5) == events, timeout=60, interval=0.5), broker.backlog(5)
    assert time.monotonic() - written_at < 60
    assert (broker.backlog_bytes(5), broker.queue_state(5).depth) == (size, messages)


# -- taking -------------------------------------------------------------------------------------

def test_taking_many_messages_lists_the_queue_folder_once_not_once_per_message(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _copies(data, 2_000)
    listings = _Listings(monkeypatch)
    taken = []
    with _connection(data) as connection:
        channel = connection.default_channel
        for _ in range(500):
            message = channel.basic_get(QUEUE)
            assert message is not None
            taken.append(message.delivery_tag)
            message.ack()
    assert len(set(taken)) == 500
    queue_folder = data / "broker" / "queue"
    # kombu listed (and sorted) the whole folder for each message: 500 listings here. One
    # listing feeds every take until it is used up; a recount may list it once more.
    assert listings.of(queue_folder) <= 2, listings.listed
    assert _on_disk(data)[0] == 2_001 - 500


def test_a_name_another_consumer_took_is_skipped_and_the_order_is_kept(tmp_path):
    data = tmp_path / "data"
    copies = sorted(path.name for path in _copies(data, 6))  # after the template, the oldest
    with _connection(data) as first, _connection(data) as second:
        one, other = first.default_channel, second.default_channel
        taken = [one.basic_get(QUEUE)]  # `one` lists all seven and takes the oldest (the template)
        taken += [other.basic_get(QUEUE), other.basic_get(QUEUE)]  # `other` lists six, takes the next two
        taken += [one.basic_get(QUEUE) for _ in range(5)]  # `one` skips those two; then, used up, lists again
        assert taken[-1] is None
        assert [message.delivery_tag for message in taken[1:-1]] == copies
        for message in taken[:-1]:
            message.ack()
    assert list((data / "broker" / "queue").glob("*.msg")) == []


# -- broadcasts ---------------------------------------------------------------------------------

def test_broadcasts_are_taken_without_listing_the_task_messages_that_wait(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _copies(data, 20_000)
    mailbox = Queue("w1@host.celery.pidbox", Exchange("celery.pidbox", type="fanout"))
    with _connection(data) as connection:
        channel = connection.default_channel
        bound = mailbox.bind(channel)
        bound.declare()
        producer = connection.Producer(channel)
        channel.basic_get(QUEUE).ack()  # the first take: its sweep recounts the 20,000 files
        listings = _Listings(monkeypatch)
        for n in range(30):
            producer.publish({"method": "status", "n": n}, exchange=mailbox.exchange)
        answers = [bound.get(no_ack=True) for _ in range(31)]
    # Every broadcast, once (two written in the same millisecond are taken in either order).
    assert sorted(message.payload["n"] for message in answers[:30]) == list(range(30)) and answers[30] is None
    assert listings.of(data / "broker" / "queue") == 0, listings.listed
    assert not list((data / "broker" / "queue").glob("*.pidbox.msg"))


@pytest.mark.slow
@pytest.mark.load  # 20,000 files: on one Python only
def test_a_paused_worker_answers_status_while_20000_task_messages_wait(children, tmp_path):
    data = tmp_path / "data"
    _copies(data, 20_000)
    refusing = f"http://127.0.0.1:{_closed_port()}"
    worker = children.worker(QUEUE, refusing, embedded_data_dir=data)
    assert wait_until(lambda: "taking no new work" in worker.log(), timeout=30), worker.log()[-2000:]
    code, document, _ = status_json(RUBRIX_TELEMETRY_BROKER_URL=None, RUBRIX_TELEMETRY_DATA_DIR=str(data))
    assert [answer["name"] for answer in document["workers"]] == [worker_name(worker)], document
    assert len(list((data / "broker" / "queue").glob(f"*.{QUEUE}.msg"))) >= 19_990


def worker_name(worker: Any) -> str:
    return next(arg for arg in worker.process.args if "@" in arg).replace("%h", socket.gethostname())


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the byte bound -----------------------------------------------------------------------------

@pytest.mark.slow
def test_the_byte_bound_holds_the_embedded_queue_and_status_shows_what_waits(tmp_path):
    data = tmp_path / "data"
    embedded = {"RUBRIX_TELEMETRY_BROKER_URL": None, "RUBRIX_TELEMETRY_DATA_DIR": str(data)}
    bound = 30_000
    env = child_environment(**embedded, RUBRIX_TELEMETRY_EVENTS_PER_TASK="1",
                            RUBRIX_TELEMETRY_MAX_BACKLOG_BYTES=str(bound))
    report, _ = run_hook_client(env, count=200, flush_timeout=30, timeout=120)
    messages, events, size = _on_disk(data)
    # One-event messages of about 1.7 KB: the bound stops them at about 18, one over at most.
    assert size < bound + 2_000 and events == report["stats"]["published"] < 200
    assert report["stats"]["dropped"] == {"backlog_full": 200 - events}
    assert "RUBRIX_TELEMETRY_MAX_BACKLOG_BYTES=30000" in report["stderr"]
    code, document, _ = status_json(**embedded)
    assert document["backlog"]["events"] == events and document["queue"]["depth"] == messages
