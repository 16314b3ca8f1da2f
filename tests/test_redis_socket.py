"""Redis on a Unix socket (`redis+socket:///path/redis.sock`) is Redis: the backlog bound, the
counts in Redis and one deployment id, as on `redis://` (issue 23: it was taken for a broker
we have no module for).

A redis-server of the test's own listening on a socket only (`--port 0`), a real publisher
(the hooks in a child process), a real `celery -A tasks worker` and the project's collector.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from telemetry_core.brokers.redis import COUNTS_KEY, DEPLOYMENT_ID_KEY
from tests.support import (RedisServer, child_environment, children_fixture, free_port, run_hook_client, status_json,
                           unique_messages)

pytestmark = pytest.mark.slow

QUEUE = "telemetry-socket"
EVENTS = 30


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


@pytest.fixture
def socket_redis() -> Iterator[RedisServer]:
    # A short folder: a socket's path may not exceed 107 bytes, and pytest's tmp_path can.
    folder = Path(tempfile.mkdtemp(prefix="rt-redis-sock-"))
    path = str(folder / "redis.sock")
    server = RedisServer(free_port(), folder, appendonly=False, client_options={"unix_socket_path": path},
                         extra_args=["--port", "0", "--unixsocket", path, "--unixsocketperm", "700"])
    server.start()
    server.socket_path = path  # type: ignore[attr-defined]
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def test_redis_on_a_unix_socket_is_redis_backlog_counts_and_deployment_id(socket_redis, children, collectors,
                                                                          tmp_path):
    backend = collectors()
    broker = {"RUBRIX_TELEMETRY_BROKER_URL": f"redis+socket://{socket_redis.socket_path}",  # type: ignore[attr-defined]
              "RUBRIX_TELEMETRY_QUEUE": QUEUE, "RUBRIX_TELEMETRY_DATA_DIR": str(tmp_path / "data")}

    report, _ = run_hook_client(child_environment(**broker), EVENTS)
    assert report["stats"]["published"] == EVENTS and report["stats"]["dropped"] == {}, report
    # The backlog is counted in events, in Redis, as the publisher's bound needs it.
    code, document, stderr = status_json(**broker)
    assert document["broker"]["answers"] and document["queue"]["depth"] >= 1, (document, stderr)
    assert document["backlog"]["events"] == EVENTS, document["backlog"]
    assert "running count" in document["backlog"]["counted_by"]

    children.worker(QUEUE, backend.url, env={name: value for name, value in broker.items()
                                             if name != "RUBRIX_TELEMETRY_QUEUE"})
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= EVENTS, 60)
    client = socket_redis.client()
    # One deployment id, kept in Redis and sent as every event's anonymousId.
    shared_id = client.get(DEPLOYMENT_ID_KEY)
    assert shared_id is not None
    assert {message["anonymousId"] for message in backend.accepted_messages()} == {shared_id.decode()}
    # The deployment's counts live in Redis (not in the worker's data folder), and status reads them there.
    assert int(client.hget(COUNTS_KEY, "delivered") or 0) == EVENTS
    code, document, stderr = status_json(**broker)
    assert document["counts"]["delivered"] == EVENTS and document["backlog"]["events"] == 0, document
    assert code == 0, stderr
