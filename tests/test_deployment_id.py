"""One anonymousId per deployment: every worker sends the same one, whatever its data folder.

Against a redis-server of the test's own (append-only, so that a restart keeps what it had)
and real `celery -A tasks worker` children, each with a data folder of its own, as on two
hosts or in two containers without a shared volume.
"""

from __future__ import annotations

import uuid

import pytest

from tasks.installation_id import FILE_NAME, REDIS_KEY
from telemetry_ops.collector import Collector
from tests.support import RedisServer, children_fixture, free_port, publish_events, unique_messages

pytestmark = pytest.mark.slow


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


@pytest.fixture
def broker(tmp_path):
    server = RedisServer(port=free_port(), folder=tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def collector():
    backend = Collector().start()
    yield backend
    backend.stop()


def deliver(children, collector, broker, queue: str, data_dirs: list, count: int) -> set[str]:
    """`count` events through one worker per data folder; the anonymousIds the backend saw."""
    for data_dir in data_dirs:
        children.worker(queue, collector.url, broker_url=broker.url, data_dir=str(data_dir))
    events = publish_events(count, queue, broker_url=broker.url)
    assert collector.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= count, timeout=30)
    delivered = unique_messages(collector.accepted_messages())
    assert set(delivered) == {event["messageId"] for event in events}
    return {message["anonymousId"] for message in delivered.values()}


def test_workers_with_separate_data_folders_send_one_id_and_it_survives_a_broker_restart(
        children, collector, broker, tmp_path):
    folders = [tmp_path / "host-a", tmp_path / "host-b"]
    ids = deliver(children, collector, broker, "deployment-two-hosts", folders, count=200)
    assert len(ids) == 1
    (deployment,) = ids
    assert str(uuid.UUID(deployment)) == deployment
    assert broker.client().get(REDIS_KEY).decode() == deployment
    # Each worker also kept an id of its own folder; only the first one offered became the deployment's.
    local_ids = {(folder / FILE_NAME).read_text().strip() for folder in folders}
    assert deployment in local_ids

    broker.restart()  # append-only: the id is on disk
    assert broker.client().get(REDIS_KEY).decode() == deployment


def test_an_existing_installation_keeps_its_id(children, collector, broker, tmp_path):
    existing = "0b7a5c1e-2b6c-4f59-9d5b-6c1f1d7c3a10"
    old_host = tmp_path / "old-host"
    old_host.mkdir()
    (old_host / FILE_NAME).write_text(existing + "\n")
    assert deliver(children, collector, broker, "deployment-upgrade", [old_host], count=20) == {existing}
    # A worker added later, with a fresh data folder, joins the same deployment.
    collector.requests.clear()
    assert deliver(children, collector, broker, "deployment-upgrade-2", [tmp_path / "new-host"], count=20) == {existing}
