"""The worker's Redis channel (telemetry_core/brokers/redis_take.py): many messages per round
trip, each recorded as unacknowledged in the same atomic step as it leaves the queue, and the
acknowledgements of a turn of the event loop written together. What a user sees: the commands
Redis counted (INFO commandstats), what sits in the queue and in `unacked`, what reached the sink.
"""

from __future__ import annotations

import signal
import time
import uuid
from typing import Any

import pytest

from tests.support import RedisServer, children_fixture, free_port, publish_events, wait_until

DOCUMENTED = dict(pool_args=(), extra_args=("-E",))  # the README's command: no pool flags


@pytest.fixture
def children(redis_server, tmp_path):
    yield from children_fixture(tmp_path)


def accepted_ids(collector) -> set[str]:
    return {message["messageId"] for message in collector.accepted_messages()}


def slow_collector(collectors, seconds: float = 0.05):
    """A backend that takes a moment per POST, as a real one does."""
    def respond(path: str, body: Any) -> tuple[int, dict[str, str]]:
        time.sleep(seconds)
        return 200, {}

    return collectors(responder=respond)


def calls(client: Any, *commands: str) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{command}", {}).get("calls", 0)) for command in commands)


def test_a_drain_takes_many_messages_per_round_trip_and_acknowledges_them_together(children, collectors, own_redis):
    redis_server = own_redis  # its command counts are this test's alone
    queue, count = f"take-{uuid.uuid4().hex[:8]}", 2000
    sent = publish_events(count, queue, broker_url=redis_server.url, events_per_task=1)
    client = redis_server.client()
    takes_before = calls(client, "brpop", "eval", "blmove")
    records_before, acks_before = calls(client, "zadd"), calls(client, "zrem")
    collector = slow_collector(collectors)
    children.worker(queue, collector.url, broker_url=redis_server.url, **DOCUMENTED)

    assert wait_until(lambda: len(accepted_ids(collector)) >= count, timeout=120), len(accepted_ids(collector))
    assert accepted_ids(collector) == {event["messageId"] for event in sent}
    assert wait_until(lambda: client.llen(queue) == 0 and client.hlen("unacked") == 0, timeout=10), \
        (client.llen(queue), client.hlen("unacked"))
    takes = calls(client, "brpop", "eval", "blmove") - takes_before
    records, acks = calls(client, "zadd") - records_before, calls(client, "zrem") - acks_before
    # kombu's transport: a BRPOP and a record (ZADD, HSET) per message, and a ZREM per ack.
    assert calls(client, "brpop") == 0
    assert takes <= count / 10, f"{takes} round trips took {count} messages"
    assert records >= count, f"{records} messages recorded as unacknowledged, of {count}"
    assert acks <= count / 4, f"{acks} acknowledgement writes for {count} messages"


@pytest.mark.load  # four SIGKILLs mid-drain and a visibility timeout: on one Python only
def test_workers_killed_mid_drain_lose_no_message(children, collectors, redis_server):
    """kombu's BRPOP takes a message out of the queue before it records it as unacknowledged: a
    SIGKILL between the two lost it (about 1 kill in 5 mid-drain). The take does both at once."""
    queue, count = f"take-{uuid.uuid4().hex[:8]}", 1500
    sent = publish_events(count, queue, broker_url=redis_server.url, events_per_task=1)
    expected = {event["messageId"] for event in sent}
    collector = slow_collector(collectors)
    for killed_after in (100, 300, 500, 700):
        worker = children.worker(queue, collector.url, broker_url=redis_server.url, **DOCUMENTED)
        assert wait_until(lambda: len(accepted_ids(collector)) >= killed_after, timeout=60)
        worker.stop(signal.SIGKILL)
    assert len(accepted_ids(collector)) < count, "the workers finished before they were killed"

    # The killed workers' messages come back after the visibility timeout (10 s in the tests).
    children.worker(queue, collector.url, broker_url=redis_server.url, **DOCUMENTED)
    client = redis_server.client()
    wait_until(lambda: not expected - accepted_ids(collector) and not client.hlen("unacked")
               and not client.llen(queue), timeout=90)
    missing = expected - accepted_ids(collector)
    assert not missing, (f"{len(missing)} missing; {client.llen(queue)} still queued, "
                         f"{client.hlen('unacked')} unacknowledged in Redis")


@pytest.mark.parametrize("refused", ["BLMOVE", "EVAL"])
def test_a_redis_that_refuses_the_take_gets_kombus_brpop_and_one_line(children, collectors, tmp_path, refused):
    """A Redis before 6.2 has no BLMOVE; an operator may rename EVAL away: the worker says so
    once and takes one message per BRPOP, as kombu does."""
    server = RedisServer(port=free_port(), folder=tmp_path / "redis", extra_args=["--rename-command", refused, ""])
    server.start()
    try:
        queue = f"take-{uuid.uuid4().hex[:8]}"
        sent = publish_events(30, queue, broker_url=server.url, events_per_task=1)
        collector = collectors()
        worker = children.worker(queue, collector.url, broker_url=server.url, **DOCUMENTED)
        assert wait_until(lambda: len(accepted_ids(collector)) >= 30, timeout=60)
        assert accepted_ids(collector) == {event["messageId"] for event in sent}
        more = publish_events(5, queue, broker_url=server.url, events_per_task=1)  # taken by BRPOP, once idle
        assert wait_until(lambda: accepted_ids(collector) >= {event["messageId"] for event in more}, timeout=30)
        log = worker.log()
        assert log.count("Redis refused the worker's batched take") == 1, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    finally:
        server.stop()


def test_a_worker_on_two_queues_takes_from_both_as_kombu_does(children, collectors, redis_server):
    first, second = f"take-{uuid.uuid4().hex[:8]}", f"take-{uuid.uuid4().hex[:8]}"
    sent = publish_events(20, first, broker_url=redis_server.url, events_per_task=1)
    sent += publish_events(20, second, broker_url=redis_server.url, events_per_task=1)
    collector = collectors()
    children.worker(first, collector.url, broker_url=redis_server.url, pool_args=(),
                    extra_args=("-Q", f"{first},{second}"))  # the last -Q wins
    assert wait_until(lambda: len(accepted_ids(collector)) >= 40, timeout=60), len(accepted_ids(collector))
    assert accepted_ids(collector) == {event["messageId"] for event in sent}


def test_a_take_in_flight_when_its_consumer_is_cancelled_puts_the_messages_back(redis_server):
    """The breaker cancels the worker's queue while a take may be in flight (with an event loop
    kombu cancels at once): the messages taken are handed to kombu for that queue, which puts
    them back, as it does with a BRPOP's. Before, they went to no queue: KeyError in the loop."""
    from kombu import Connection, Exchange, Queue

    from telemetry_core.brokers import redis_take
    name, client = f"take-{uuid.uuid4().hex[:8]}", redis_server.client()
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(redis_server.url, transport=redis_take.Transport) as connection:
        producer = connection.Producer()
        for n in range(10):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, declare=[queue])
        channel = connection.default_channel
        assert isinstance(channel, redis_take.Channel)
        received: list[Any] = []
        consumer = connection.Consumer(queue, callbacks=[lambda body, message: received.append(body)],
                                       accept=["json"])
        consumer.consume()
        send_take = channel._brpop_start

        def take_then_cancel(timeout: float | None = None) -> None:
            send_take(timeout)
            for tag in list(channel._tag_to_queue):
                channel._basic_cancel(tag)  # as with an event loop: at once

        channel._brpop_start = take_then_cancel
        connection.drain_events(timeout=2)
    assert received == []
    assert client.llen(name) == 10, "the taken messages are back in the queue"
    assert not any(name.encode() in value for value in client.hvals("unacked")), "none is left unacknowledged"
