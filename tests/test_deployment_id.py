"""One anonymousId per deployment: every worker sends the same one, whatever its data folder.

Against a broker of the test's own (a redis-server, append-only so that a restart keeps what
it had; or a RabbitMQ node) and real `celery -A tasks worker` children, each with a data
folder of its own, as on two hosts or in two containers without a shared volume.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest

from tasks.installation_id import FILE_NAME
from telemetry_core.brokers.rabbitmq import DEPLOYMENT_ID_STREAM, STREAM_START_WAIT
from telemetry_core.brokers.redis import DEPLOYMENT_ID_KEY as REDIS_KEY
from telemetry_ops.collector import Collector
from tests.support import RedisServer, children_fixture, free_port, publish_events, unique_messages

pytestmark = pytest.mark.slow


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


class RedisBroker:
    def __init__(self, folder: Path) -> None:
        self.server = RedisServer(port=free_port(), folder=folder)
        self.url = self.server.url

    def stored_id(self) -> str:
        return self.server.client().get(REDIS_KEY).decode()

    def restart(self) -> None:
        self.server.restart()


class RabbitBroker:
    def __init__(self, folder: Path) -> None:
        from tests.rabbitmq import RabbitNode

        self.server = RabbitNode(folder)
        self.url = self.server.url

    def stored_id(self) -> str:
        from telemetry_core.brokers.rabbitmq import shared_deployment_id
        from telemetry_core.settings import load_settings

        # What a worker offering a new id would read: the stream's first, if it has one.
        return shared_deployment_id(load_settings({"RUBRIX_TELEMETRY_BROKER_URL": self.url}),
                                    offered=str(uuid.uuid4()), timeout=20)

    def restart(self) -> None:
        self.server.stop()
        self.server.start()  # same folder: the durable stream is on disk


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request, tmp_path):
    server = (RedisBroker if request.param == "redis" else RabbitBroker)(tmp_path / request.param)
    server.server.start()
    yield server
    server.server.stop()


@pytest.fixture
def collector():
    backend = Collector().start()
    yield backend
    backend.stop()


def deliver(children, collector, broker, queue: str, data_dirs: list, count: int) -> set[str]:
    """`count` events through one worker per data folder; the anonymousIds the backend saw."""
    for data_dir in data_dirs:
        children.worker(queue, collector.url, broker_url=broker.url, data_dir=str(data_dir))
    return publish_and_collect(collector, broker.url, queue, count)[0]


def publish_and_collect(collector, broker_url: str, queue: str, count: int,
                        timeout: float = 30) -> tuple[set[str], float]:
    """Publishes `count` events to the running workers: (the anonymousIds these events
    reached the backend with, seconds from publishing to the backend having them all).

    Only these events: after a broker restart the backend may also get earlier events a
    second time (their ack was lost with the connection; delivery is at least once, under
    the same messageIds), and those must not stand in for events that never arrived.
    """
    started = time.monotonic()
    published = {event["messageId"] for event in publish_events(count, queue, broker_url=broker_url)}
    assert collector.wait_for(lambda b: published <= set(unique_messages(b.accepted_messages())), timeout=timeout), (
        f"{len(published - set(unique_messages(collector.accepted_messages())))} of {count} events did not arrive")
    took = time.monotonic() - started
    delivered = unique_messages(collector.accepted_messages())
    return {delivered[message_id]["anonymousId"] for message_id in published}, took


def test_workers_with_separate_data_folders_send_one_id_and_it_survives_a_broker_restart(
        children, collector, broker, tmp_path):
    folders = [tmp_path / "host-a", tmp_path / "host-b"]
    ids = deliver(children, collector, broker, "deployment-two-hosts", folders, count=200)
    assert len(ids) == 1
    (deployment,) = ids
    assert str(uuid.UUID(deployment)) == deployment
    assert broker.stored_id() == deployment
    # Each worker also kept an id of its own folder; only the first one offered became the deployment's.
    local_ids = {(folder / FILE_NAME).read_text().strip() for folder in folders}
    assert deployment in local_ids

    broker.restart()
    assert broker.stored_id() == deployment
    # A worker started after the restart, on a third host, joins the deployment.
    collector.requests.clear()
    assert deliver(children, collector, broker, "deployment-after-restart", [tmp_path / "host-c"], count=20) == {
        deployment}


def test_an_existing_installation_keeps_its_id(children, collector, broker, tmp_path):
    existing = "0b7a5c1e-2b6c-4f59-9d5b-6c1f1d7c3a10"
    old_host = tmp_path / "old-host"
    old_host.mkdir()
    (old_host / FILE_NAME).write_text(existing + "\n")
    assert deliver(children, collector, broker, "deployment-upgrade", [old_host], count=20) == {existing}
    # A worker added later, with a fresh data folder, joins the same deployment.
    collector.requests.clear()
    assert deliver(children, collector, broker, "deployment-upgrade-2", [tmp_path / "new-host"], count=20) == {existing}


def test_a_broker_that_cannot_keep_the_id_leaves_each_worker_on_its_own_with_one_warning(
        children, collector, rabbitmq_vhost, tmp_path):
    # A classic queue already holds the stream's name (as good as a RabbitMQ without streams:
    # the declare is refused). Delivery goes on, under the data folder's id.
    from kombu import Connection

    with Connection(rabbitmq_vhost.url) as connection:
        connection.channel().queue_declare(DEPLOYMENT_ID_STREAM, durable=True, auto_delete=False)
    host = tmp_path / "host-a"
    ids = deliver(children, collector, rabbitmq_vhost, "deployment-no-stream", [host], count=60)
    assert ids == {(host / FILE_NAME).read_text().strip()}
    worker_log = children.started[0].log()
    assert worker_log.count("cannot read the deployment id from the broker (PreconditionFailed)") == 1, worker_log
    assert "Traceback" not in worker_log


def test_a_user_refused_the_stream_gets_every_delivery_through_promptly_and_asks_the_broker_once_a_period(
        children, collector, rabbitmq_vhost, tmp_path):
    # A user who may use the telemetry queue but not read the stream: the declare passes, the
    # read is refused (403). Before, that counted as "still starting": each task waited 10 s.
    not_the_stream = f"^(?!{re.escape(DEPLOYMENT_ID_STREAM)}$).*"
    refused_url = rabbitmq_vhost.user_url(configure=".*", write=".*", read=not_the_stream)
    tasks = 4
    count = tasks * 20  # RUBRIX_TELEMETRY_EVENTS_PER_TASK=20: one task message per 20 events

    # The baseline, measured here: a worker allowed everything creates the stream (its first
    # task asks the broker) and delivers as many tasks.
    children.worker("deployment-allowed", collector.url, broker_url=rabbitmq_vhost.url,
                    data_dir=str(tmp_path / "host-allowed"))
    (deployment,), baseline = publish_and_collect(collector, rabbitmq_vhost.url, "deployment-allowed", count)

    collector.requests.clear()
    refused_host = tmp_path / "host-refused"
    worker = children.worker("deployment-refused", collector.url, broker_url=refused_url, data_dir=str(refused_host))
    ids, took = publish_and_collect(collector, rabbitmq_vhost.url, "deployment-refused", count, timeout=120)
    local = (refused_host / FILE_NAME).read_text().strip()
    assert ids == {local} and local != deployment
    worker_log = worker.log()
    # Every ask that fails logs this line: one ask for the four tasks, not one per task.
    assert worker_log.count("cannot read the deployment id from the broker (AccessRefused)") == 1, worker_log
    assert "Traceback" not in worker_log
    # Each failed ask may cost at most one wait for a starting stream; a refusal costs none.
    assert took < baseline + STREAM_START_WAIT, (
        f"{tasks} tasks took {took:.1f}s as the refused user, {baseline:.1f}s as a user allowed everything")
