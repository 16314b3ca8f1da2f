"""RUBRIX_TELEMETRY_MAX_BACKLOG on every broker, with no worker running: a server stops
publishing at the bound, counts the rest as dropped under `backlog_full`, and publishes
again once a worker has made room; what waited is delivered exactly once.

Each broker is a real one of the test's own: the embedded queue in a data folder, a
redis-server on a free port, a vhost on the machine's RabbitMQ. The messages that wait are
counted in the broker itself, by reading them.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.conftest import TEST_ENVIRONMENT
from tests.support import (
    RedisServer,
    child_environment,
    children_fixture,
    free_port,
    publish_events,
    run_hook_client,
    status_json,
    unique_messages,
    wait_until,
)

FIRED = 30_000
MAX_BACKLOG = 5_000
EVENTS_PER_TASK = int(TEST_ENVIRONMENT["RUBRIX_TELEMETRY_EVENTS_PER_TASK"])


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


@dataclass
class BrokerUnderTest:
    """A broker of the test's own: the variables that point a process at it, and a reader of
    the task messages waiting there (each as the messageIds it carries)."""

    env: dict[str, str | None]
    read_waiting: Callable[[], list[list[str]]]
    keeps_counts: bool


def _message_ids(kwargs: dict) -> list[str]:
    from telemetry_core import message

    return [event["messageId"] for event in message.read([], kwargs).events]


def _from_kombu_payload(raw: bytes | str) -> list[str]:
    """The messageIds of one task message as kombu's virtual transports store it (JSON, its
    body base64)."""
    payload = json.loads(raw)
    _, kwargs, _ = json.loads(base64.b64decode(payload["body"]))
    return _message_ids(kwargs)


def _embedded(tmp_path: Path, queue: str) -> BrokerUnderTest:
    data = tmp_path / "data"

    def read() -> list[list[str]]:
        files = [path for folder in ("queue", "unacked") for path in (data / "broker" / folder).rglob(f"*.{queue}.msg")]
        messages = []
        for path in files:  # a worker may take or acknowledge a file between the listing and the read
            try:
                messages.append(_from_kombu_payload(path.read_bytes()))
            except FileNotFoundError:
                continue
        return messages

    return BrokerUnderTest({"RUBRIX_TELEMETRY_BROKER_URL": None, "RUBRIX_TELEMETRY_DATA_DIR": str(data)}, read, True)


def _redis(server: RedisServer, tmp_path: Path, queue: str) -> BrokerUnderTest:
    def read() -> list[list[str]]:
        client = server.client()
        held = [json.dumps(json.loads(raw)[0]) for raw in client.hvals("unacked")]
        return [_from_kombu_payload(raw) for raw in [*client.lrange(queue, 0, -1), *held]]

    env = {"RUBRIX_TELEMETRY_BROKER_URL": server.url, "RUBRIX_TELEMETRY_DATA_DIR": str(tmp_path / "data")}
    return BrokerUnderTest(env, read, True)


def _rabbitmq(url: str, tmp_path: Path, queue: str) -> BrokerUnderTest:
    def read() -> list[list[str]]:
        from kombu import Connection

        # Taken without an ack: closing the connection puts every one of them back.
        bodies = []
        with Connection(url) as connection:
            channel = connection.channel()
            while (taken := channel.basic_get(queue, no_ack=False)) is not None:
                bodies.append(taken.body)
        return [_message_ids(json.loads(body)[1]) for body in bodies]

    env = {"RUBRIX_TELEMETRY_BROKER_URL": url, "RUBRIX_TELEMETRY_DATA_DIR": str(tmp_path / "data")}
    return BrokerUnderTest(env, read, False)


@pytest.fixture(params=["embedded", "redis", "rabbitmq"])
def broker(request, tmp_path) -> Iterator[tuple[BrokerUnderTest, str]]:
    queue = f"backlog-{uuid.uuid4().hex[:8]}"
    if request.param == "embedded":
        yield _embedded(tmp_path, queue), queue
    elif request.param == "redis":
        server = RedisServer(port=free_port(), folder=tmp_path / "redis")
        server.start()
        try:
            yield _redis(server, tmp_path, queue), queue
        finally:
            server.stop()
    else:
        vhost = request.getfixturevalue("rabbitmq_vhost")
        yield _rabbitmq(vhost.url, tmp_path, queue), queue


@pytest.mark.slow
@pytest.mark.load  # 30,000 events per broker: on one Python only
def test_with_no_worker_the_backlog_stops_at_its_bound_and_a_worker_delivers_exactly_what_waited(
        broker, children, collectors):
    place, queue = broker
    backend = collectors()
    settings = {**place.env, "RUBRIX_TELEMETRY_QUEUE": queue, "RUBRIX_TELEMETRY_ENDPOINT": backend.url,
                "RUBRIX_TELEMETRY_MAX_BACKLOG": str(MAX_BACKLOG),
                # Room for every event fired: only the backlog may drop any.
                "RUBRIX_TELEMETRY_BUFFER_SIZE": str(FIRED)}
    env = child_environment(**settings)

    report, _ = run_hook_client(env, FIRED, flush_timeout=60, timeout=240)

    waiting = place.read_waiting()
    waiting_ids = [message_id for message in waiting for message_id in message]
    assert len(set(waiting_ids)) == len(waiting_ids)
    # The bound, overshot by one task message at most (one server process); and reached.
    assert MAX_BACKLOG - EVENTS_PER_TASK < len(waiting_ids) <= MAX_BACKLOG + EVENTS_PER_TASK, len(waiting_ids)
    stats = report["stats"]
    assert stats["published"] == len(waiting_ids)
    assert stats["pending"] == 0
    assert stats["dropped"] == {"backlog_full": FIRED - len(waiting_ids)}
    assert "RUBRIX_TELEMETRY_MAX_BACKLOG=5000" in report["stderr"]
    assert report["stderr"].count("telemetry: dropped") == 1  # one line a minute at most

    code, document, _ = status_json(**settings)
    assert document["backlog"]["max"] == MAX_BACKLOG and document["backlog"]["events"] >= MAX_BACKLOG
    assert code == 1 and any("the backlog is at its bound" in problem for problem in document["problems"])
    if place.keeps_counts:  # RabbitMQ keeps no values: the server's drops are in its stats() only
        assert document["counts"]["dropped"] == {"backlog_full": FIRED - len(waiting_ids)}

    worker = children.worker(queue, backend.url, env=place.env)
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= len(waiting_ids), timeout=120), (
        len(unique_messages(backend.accepted_messages())), worker.log()[-3000:])
    assert wait_until(lambda: place.read_waiting() == [], timeout=30)
    delivered = backend.accepted_messages()
    assert sorted(message["messageId"] for message in delivered) == sorted(waiting_ids)  # nothing twice

    # Room again once the broker's count says so (on Redis: the worker's settles, or the
    # recount within 60 s), as a server's check reads it.
    from telemetry_core.brokers import broker_for
    from telemetry_core.settings import load_settings

    counted = broker_for(load_settings(env))
    assert wait_until(lambda: counted.backlog(5) == 0, timeout=60, interval=0.5), counted.backlog(5)
    # A server publishes, drops nothing, and the worker delivers it.
    again, _ = run_hook_client(env, 100, flush_timeout=30, timeout=120)
    assert again["stats"] == {"published": 100, "pending": 0, "dropped": {}}
    assert backend.wait_for(lambda b: len(b.accepted_messages()) == len(waiting_ids) + 100, timeout=60)


def test_redis_recount_reads_each_messages_header_and_an_older_messages_as_events_per_task(redis_server):
    """The recount Redis makes itself (Lua scripts over slices of the list and pages of the
    unacked hash), read against messages the server's publisher wrote, one of them without the
    event-count header (an older release's message) and one held by a worker, neither counted
    when it was written."""
    from dataclasses import replace

    from telemetry_core.brokers import broker_for
    from telemetry_core.brokers.redis_backlog import RECOUNTED_KEY
    from telemetry_core.message import EVENTS_HEADER
    from telemetry_core.settings import load_settings

    queue = f"backlog-count-{uuid.uuid4().hex[:8]}"
    client = redis_server.client()
    try:
        publish_events(45, queue, broker_url=redis_server.url)  # 20 + 20 + 5 events
        broker = broker_for(replace(load_settings(), broker_url=redis_server.url, queue=queue))
        # The publisher's first check started a recount (a check starts it again if it was cut
        # short): once it is done, the next is due only 30 s later, as if that long had passed.
        assert wait_until(lambda: broker.backlog(5) is not None and client.exists(RECOUNTED_KEY.format(queue=queue)),
                          timeout=10)
        client.delete(RECOUNTED_KEY.format(queue=queue))
        older = json.loads(client.lindex(queue, 0))
        del older["headers"][EVENTS_HEADER]
        client.rpush(queue, json.dumps(older))
        held = json.loads(client.lindex(queue, 1))  # as kombu keeps a message a worker holds
        client.hset("unacked", "held-by-a-worker", json.dumps([held, "", queue]))

        expected = 45 + EVENTS_PER_TASK + held["headers"][EVENTS_HEADER]
        # This check finds the recount due and starts one; the publisher's check reads the same count.
        assert wait_until(lambda: broker.backlog(5) == expected, timeout=10), broker.backlog(5)
        assert broker.backlog(5, under=1_000) == expected
    finally:
        client.delete(queue, "unacked")
