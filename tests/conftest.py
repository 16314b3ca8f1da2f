"""Real parts for every test: a private redis-server, an in-process Celery worker and an
HTTP backend (the project's collector) that records every request.

The environment is set here, before `rubrix_hooks` or `tasks` is imported, because both
read their settings once at import, exactly as a server and a worker do.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.support import RedisServer, free_port

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="rubrix-telemetry-tests-"))
REDIS_PORT = free_port()
BACKEND_PORT = free_port()

TEST_ENVIRONMENT = {
    "RUBRIX_ENABLE_TELEMETRY": "1",
    "RUBRIX_TELEMETRY_BROKER_URL": f"redis://127.0.0.1:{REDIS_PORT}/0",
    "RUBRIX_TELEMETRY_ENDPOINT": f"http://127.0.0.1:{BACKEND_PORT}",
    "RUBRIX_TELEMETRY_KEY": "test-write-key",
    "RUBRIX_TELEMETRY_DATA_DIR": str(_SESSION_DIR / "data"),
    "RUBRIX_TELEMETRY_FLUSH_INTERVAL": "0.05",
    # Small tasks, so that the tests see events spread over several task messages.
    "RUBRIX_TELEMETRY_EVENTS_PER_TASK": "20",
    "RUBRIX_TELEMETRY_PUBLISH_TIMEOUT": "0.5",
    "RUBRIX_TELEMETRY_SHUTDOWN_TIMEOUT": "2",
    "RUBRIX_TELEMETRY_BACKOFF_BASE": "0.4",
    "RUBRIX_TELEMETRY_BACKOFF_MAX": "3",
    "RUBRIX_TELEMETRY_VISIBILITY_TIMEOUT": "10",
    "RUBRIX_TELEMETRY_HTTP_TIMEOUT": "2",
    "RUBRIX_TELEMETRY_MAX_EVENT_AGE": "60",
    # Tests start the workers they need: none alongside a server on the embedded queue.
    "RUBRIX_TELEMETRY_EMBEDDED_WORKER": "0",
}
os.environ.pop("DO_NOT_TRACK", None)
os.environ.update(TEST_ENVIRONMENT)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def redis_server(session_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(port=REDIS_PORT, folder=session_dir / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, nothing kept on disk: its memory, command counts and
    keys are that test's alone."""
    server = RedisServer(port=free_port(), folder=tmp_path / "redis", appendonly=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def backend_server():
    from telemetry_ops.collector import Collector

    collector = Collector(port=BACKEND_PORT).start()
    yield collector
    collector.stop()


@pytest.fixture
def backend(backend_server):
    """The HTTP backend, emptied, answering 200 unless a test scripts otherwise."""
    backend_server.requests.clear()
    backend_server.responder = None
    yield backend_server
    backend_server.responder = None


@pytest.fixture(scope="session")
def celery_worker_in_process(redis_server: RedisServer):
    """The project's real Celery app, consuming the telemetry queue in this process."""
    from celery.contrib.testing.worker import start_worker

    from tasks import app

    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False,
                      queues=[app.conf.task_default_queue], loglevel="WARNING", shutdown_timeout=10) as worker:
        yield worker


@pytest.fixture
def collectors():
    """Starts collectors of a test's own (`collectors(port, responder)`); stopped after it."""
    from telemetry_ops.collector import Collector

    started: list[Collector] = []

    def start(port: int = 0, responder=None) -> Collector:
        collector = Collector(port=port, responder=responder).start()
        started.append(collector)
        return collector

    yield start
    for collector in started:
        collector.stop()


@pytest.fixture
def rabbitmq_vhost():
    """A vhost of the test's own on the machine's RabbitMQ (127.0.0.1:5672), deleted after it."""
    from tests.rabbitmq import MachineVhost

    vhost = MachineVhost()
    yield vhost
    vhost.delete()


@pytest.fixture
def rabbitmq_node(tmp_path):
    """A RabbitMQ node of the test's own, for alarms and restarts; stopped after it."""
    from tests.rabbitmq import RabbitNode

    node = RabbitNode(tmp_path / "rabbitmq")
    node.start()
    yield node
    node.stop()


@pytest.fixture
def pipeline(redis_server, celery_worker_in_process, backend):
    """Hooks -> Redis -> worker -> backend, all running; yields the backend."""
    yield backend
