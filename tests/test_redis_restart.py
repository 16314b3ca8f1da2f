"""A worker started with the documented command survives its redis-server restarting while it
has deliveries under way: Celery reconnects, and every event reaches the backend afterwards.

It used to die when Redis went away while the worker held messages not yet acknowledged and
waited for more ("Unrecoverable error: AttributeError("'NoneType' object has no attribute
'hostname'")"); telemetry_core/brokers/redis_take.py, `_read_reply_in_flight`, says why.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
from kombu import Connection, Consumer, Queue
from kombu.common import ignore_errors
from kombu.pidbox import Mailbox

from telemetry_core.brokers import redis_take
from tests.support import RedisServer, children_fixture, free_port, publish_events, wait_until

RESTARTS = 3
ROUND = 200  # messages published before each restart


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of the test's own (append-only, as the session's), to stop and restart."""
    redis = RedisServer(port=free_port(), folder=tmp_path / "redis")
    redis.start()
    yield redis
    redis.stop()


@pytest.mark.parametrize("path", ["take", "kombu's BRPOP"])
def test_a_connection_lost_with_a_wait_in_flight_is_closed_without_error(own_redis, path):
    """Celery's own reconnection steps, on the worker's channels as Celery has them when Redis goes
    away: the task channel with unacknowledged messages and a wait for messages in flight (our
    BLMOVE, or kombu's BRPOP where the take is not used), and the remote control (pidbox) channel
    opened after it. Before the fix, the last step raised AttributeError."""
    queue = f"restart-{uuid.uuid4().hex[:8]}"
    publish_events(20, queue, broker_url=own_redis.url, events_per_task=1)
    connection = Connection(own_redis.url, transport=redis_take.Transport)
    channel = connection.default_channel
    received: list = []
    consumer = Consumer(channel, [Queue(queue)], callbacks=[lambda body, message: received.append(message)],
                        accept=["json"])
    consumer.consume()
    while len(received) < 20:
        connection.drain_events(timeout=5)
    # `celery control` listens on a fanout queue of its own channel (celery.worker.pidbox).
    node = Mailbox("restart-test", type="fanout").Node("test@restart", channel=connection.channel())
    node.listen()
    node.channel.client  # noqa: B018 (cached as a worker's is once it polled)
    # The queue is empty: the event loop's next round trip waits for a message (BLMOVE), and its
    # reply never comes.
    assert channel._in_poll is None and own_redis.client().llen(queue) == 0
    channel._messages_waiting = False
    channel._take_refused = path != "take"
    channel._brpop_start()
    assert channel._in_poll

    own_redis.stop()
    # What Celery's consumer does with the connection after a connection error
    # (Consumer.on_connection_error_after_connected): collect it, then close it.
    try:
        connection.collect(socket_timeout=5.0)
    except Exception:  # noqa: BLE001 (as Celery does)
        pass
    ignore_errors(connection, connection.close)

    assert channel.closed
    # The 20 messages were taken and never acknowledged: after the restart they are in `unacked`
    # (Redis hands them out again after the visibility timeout), or back in the queue.
    own_redis.start()
    client = own_redis.client()
    assert client.hlen("unacked") + client.llen(queue) == 20


@pytest.mark.slow
def test_a_worker_with_deliveries_under_way_survives_redis_restarts(children, collectors, own_redis):
    """The documented worker, Redis restarted 3 times while it holds messages it took (the backend
    holds their POST) and waits for more: the moment of a drain when the queue is empty. It must
    reconnect each time, and every event reach the backend."""
    queue = f"restart-{uuid.uuid4().hex[:8]}"
    gate = threading.Event()

    def respond(path: str, body: Any) -> tuple[int, dict[str, str]]:
        gate.wait(30)
        return 200, {}

    collector = collectors(responder=respond)
    # The documented command: `celery -A tasks worker -Q telemetry -E`, the app's own pool.
    # The backend's hold is no failure (the HTTP timeout is longer); the messages a restart left
    # unacknowledged do not come back during the test (the visibility timeout is longer): each
    # round's messages are the only ones the worker takes, and each delivery under way when Redis
    # restarts still ends with its POST.
    worker = children.worker(queue, collector.url, broker_url=own_redis.url, pool_args=(), extra_args=("-E",),
                             http_timeout="30", visibility_timeout="120")
    client = own_redis.client
    sent: list[dict[str, Any]] = []
    for restart in range(RESTARTS):
        gate.clear()
        # Fewer than the prefetch limit (2 x 128): the worker takes them all, then waits (BLMOVE).
        sent += publish_events(ROUND, queue, broker_url=own_redis.url, events_per_task=1)
        assert wait_until(lambda: client().llen(queue) == 0 and client().hlen("unacked") >= ROUND
                          or worker.process.poll() is not None, timeout=20), (client().llen(queue),
                                                                             client().hlen("unacked"))
        assert worker.process.poll() is None, worker.log()[-5000:]
        own_redis.restart()
        gate.set()
        assert wait_until(lambda: worker.log().count("Connected to redis") >= restart + 2
                          or worker.process.poll() is not None, timeout=20), worker.log()[-5000:]
        assert worker.process.poll() is None, worker.log()[-5000:]

    def delivered() -> set[str]:
        return {m["messageId"] for m in collector.accepted_messages()}

    expected = {event["messageId"] for event in sent}
    assert wait_until(lambda: delivered() >= expected or worker.process.poll() is not None, timeout=30), (
        f"{len(delivered() & expected)} of {len(expected)} delivered\n{worker.log()[-5000:]}")
    assert worker.process.poll() is None, worker.log()[-5000:]
    assert "Unrecoverable error" not in worker.log(), worker.log()[-5000:]
    accepted = collector.accepted_messages()
    print(f"redis restarted {RESTARTS} times under deliveries: {len(expected)} sent, {len(accepted)} accepted, "
          f"{len(delivered())} unique")
