"""The embedded default with no worker started by hand: servers start the one worker their data folder needs.

Real `rubrix-telemetry server` processes on an embedded queue of the test's own, the
project's collector as the backend; the worker is whatever the servers start
(`telemetry_core/brokers/alongside.py`). The switch is on here (tests/conftest.py turns it
off for every other test).
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from rubrix_hooks.example_app import API_KEY
from tests.support import (Children, child_environment, children_fixture, free_port, http_request,
                           run_hook_client, status_json, unique_messages, wait_until)
from tests.support import celery_workers_of as worker_pids  # the worker processes serving a data folder

pytestmark = pytest.mark.slow

AUTH = {"X-Rubrix-Api-Key": API_KEY}
# A server's look-out runs every 5 s and a worker alongside looks for servers every 2 s; on
# a loaded 2-core machine a worker also takes seconds to start and to stop.
WORKER_GONE_TIMEOUT = 60


def alongside_env(data_dir: Path, endpoint: str, **overrides: str | None) -> dict[str, str]:
    return child_environment(**{"RUBRIX_TELEMETRY_BROKER_URL": None, "RUBRIX_TELEMETRY_DATA_DIR": str(data_dir),
                                "RUBRIX_TELEMETRY_ENDPOINT": endpoint, "RUBRIX_TELEMETRY_EMBEDDED_WORKER": "1",
                                **overrides})


def embedded_status(data_dir: Path) -> tuple[int, dict[str, Any], str]:
    return status_json(RUBRIX_TELEMETRY_BROKER_URL=None, RUBRIX_TELEMETRY_DATA_DIR=str(data_dir))


def worker_log(data_dir: Path) -> str:
    log = data_dir / "worker-alongside.log"
    return f"worker log:\n{log.read_text(errors='replace')}" if log.exists() else "no worker was started"


def lock_is_free(path: Path) -> bool:
    with path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def worker_gone(data_dir: Path) -> bool:
    """No worker process serves the folder, and the locks a worker holds are free.

    Both, because a process leaves /proc's cmdline and environ (its memory is released)
    before its last thread closes its files: a threaded worker on a loaded machine is for a
    moment invisible to `worker_pids` while its flocks are still held.
    """
    broker = data_dir / "broker"
    return not worker_pids(data_dir) and all(lock_is_free(broker / name)
                                              for name in ("worker-alongside.lock", "workers.lock"))


def get_me(servers: list[Any], rounds: int) -> int:
    """`rounds` GET /api/me on each server in turn (one event each); returns how many were sent."""
    for _ in range(rounds):
        for server in servers:
            status, _, _ = http_request(server.port, "GET", "/api/me", AUTH)
            assert status == 200
    return rounds * len(servers)


def start_server(children: Children, env: dict[str, str]) -> Any:
    port = free_port()
    return children.server([sys.executable, "-m", "telemetry_ops.cli", "server", "--example", "--host", "127.0.0.1",
                            "--port", str(port)], port, env)


def stop_servers(servers: list[Any]) -> None:
    for server in servers:
        server.stop()  # SIGTERM, as a supervisor stops it


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "data"
    yield folder
    for pid in worker_pids(folder):  # a failed test's leftover, started by its servers
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def children(data_dir, tmp_path):
    yield from children_fixture(tmp_path)


def test_three_servers_start_exactly_one_worker_that_delivers_everything_and_stops_with_them(
        children, collectors, data_dir):
    backend = collectors()
    env = alongside_env(data_dir, backend.url)
    servers = [start_server(children, env) for _ in range(3)]
    sent = get_me(servers, rounds=4)

    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= sent, 90), (
        f"{len(unique_messages(backend.accepted_messages()))} of {sent} events arrived; {worker_log(data_dir)}")
    assert len(backend.accepted_messages()) == sent
    assert len(worker_pids(data_dir)) == 1, "one worker process for the data folder, whatever the servers"
    code, document, stderr = embedded_status(data_dir)
    assert [worker["name"].split("@")[0] for worker in document["workers"]] == ["alongside"], (document, stderr)
    assert code == 0, stderr
    # More events, from each server, still through the one worker.
    sent += get_me(servers, rounds=2)
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= sent, 60)
    assert len(worker_pids(data_dir)) == 1

    stop_servers(servers)
    assert wait_until(lambda: worker_gone(data_dir), WORKER_GONE_TIMEOUT, interval=0.2), (
        f"the worker outlived its servers: {worker_pids(data_dir)}")
    assert "Warm shutdown" in worker_log(data_dir)


def test_gunicorn_preload_with_three_children_means_one_worker(children, collectors, data_dir):
    from tests.support import WRAPPED_APP_MODULE

    backend = collectors()
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "--preload", "-k", "uvicorn.workers.UvicornWorker", "-w", "3",
            "-b", f"127.0.0.1:{port}", "--graceful-timeout", "5", f"{WRAPPED_APP_MODULE}:app"]
    # The master fires one event at import: it holds the servers' lock, and its children inherit it.
    server = children.server(argv, port, alongside_env(data_dir, backend.url) | {"RT_FIRE_AT_IMPORT": "1"})
    served_by: set[str] = set()

    def every_child_served() -> bool:
        for _ in range(20):
            status, headers, _ = http_request(port, "GET", "/api/me", AUTH)
            assert status == 200
            served_by.add(headers["x-served-by"])
        return len(served_by) >= 3

    assert wait_until(every_child_served, timeout=60, interval=0), served_by
    assert backend.wait_for(lambda b: {m["event"] for m in b.accepted_messages()} >= {"UserInfoRequested",
                                                                                   "LogRecordsRequested"}, 90)
    assert len(worker_pids(data_dir)) == 1

    server.stop()
    assert wait_until(lambda: worker_gone(data_dir), WORKER_GONE_TIMEOUT, interval=0.2), worker_pids(data_dir)


def test_events_still_queued_when_the_servers_stop_are_delivered_at_the_next_start(children, collectors, data_dir):
    outage = {"on": True}
    backend = collectors(responder=lambda path, body: (503, {}) if outage["on"] else (200, {}))
    env = alongside_env(data_dir, backend.url)
    servers = [start_server(children, env) for _ in range(2)]
    sent = get_me(servers, rounds=3)
    # The worker has tried (and failed) by then; its retries wait in the messages it holds.
    assert backend.wait_for(lambda b: len(b.requests) >= 2, 60), "no worker tried to deliver"

    stop_servers(servers)
    assert wait_until(lambda: worker_gone(data_dir), WORKER_GONE_TIMEOUT, interval=0.2), worker_pids(data_dir)
    _, document, _ = embedded_status(data_dir)
    assert document["queue"]["depth"] >= 1 and document["queue"]["unacked"] == 0, (
        f"what the stopped worker held went back to the queue: {document['queue']}")
    assert backend.accepted_messages() == []

    outage["on"] = False
    # No request: the server's start alone starts the worker, which delivers what waited.
    server = start_server(children, env)
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= sent, 90), (
        f"{len(unique_messages(backend.accepted_messages()))} of {sent} events arrived; {worker_log(data_dir)}")
    assert len(backend.accepted_messages()) == sent, "an event was delivered twice"
    stop_servers([server])
    assert wait_until(lambda: worker_gone(data_dir), WORKER_GONE_TIMEOUT, interval=0.2), worker_pids(data_dir)


def test_switched_off_a_server_starts_no_worker_and_its_events_wait(collectors, data_dir):
    backend = collectors()
    env = alongside_env(data_dir, backend.url, RUBRIX_TELEMETRY_EMBEDDED_WORKER="0")
    report, _ = run_hook_client(env, 30)
    assert report["stats"]["published"] == 30
    # A worker would have been spawned from the publisher thread, before the events were flushed.
    assert not (data_dir / "worker-alongside.log").exists()
    assert worker_pids(data_dir) == []
    _, document, _ = embedded_status(data_dir)
    assert document["queue"]["depth"] >= 1 and document["workers"] == []
    assert backend.requests == []


def test_on_redis_a_server_never_starts_a_worker(redis_server, collectors, data_dir):
    backend = collectors()
    queue = f"alongside-redis-{os.getpid()}"
    env = alongside_env(data_dir, backend.url, RUBRIX_TELEMETRY_BROKER_URL=redis_server.url,
                        RUBRIX_TELEMETRY_QUEUE=queue)
    try:
        report, _ = run_hook_client(env, 30)
        assert report["stats"]["published"] == 30
        assert redis_server.client().llen(queue) >= 1, "the events wait in Redis"
        assert not (data_dir / "worker-alongside.log").exists()
        assert not (data_dir / "broker").exists()
        assert worker_pids(data_dir) == []
    finally:
        redis_server.client().delete(queue)


def test_a_worker_already_running_means_none_is_started(children, collectors, data_dir):
    backend = collectors()
    operators = children.worker("telemetry", backend.url, embedded_data_dir=data_dir)
    env = alongside_env(data_dir, backend.url)
    report, _ = run_hook_client(env, 30)
    assert report["stats"]["published"] == 30
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= 30, 60)
    assert not (data_dir / "worker-alongside.log").exists()
    assert worker_pids(data_dir) == [operators.process.pid]


def test_a_server_killed_by_sigkill_still_lets_its_worker_stop(children, collectors, data_dir):
    backend = collectors()
    server = start_server(children, alongside_env(data_dir, backend.url))
    sent = get_me([server], rounds=3)
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= sent, 90), worker_log(data_dir)
    assert len(worker_pids(data_dir)) == 1

    server.stop(signal.SIGKILL)  # no exit handler runs: the kernel drops the server's lock
    assert wait_until(lambda: worker_gone(data_dir), WORKER_GONE_TIMEOUT, interval=0.2), worker_pids(data_dir)


# A `tasks.py` of a project's own in the folder a server is started from (issue 23): a valid
# Celery app of its own, and one that cannot be imported.
FOREIGN_TASKS_MODULES = {
    "a-celery-app-of-its-own": ('from celery import Celery\n\napp = Celery("tasks", broker="memory://")\n\n\n'
                                '@app.task\ndef add(x, y):\n    return x + y\n'),
    "one-that-fails-to-import": 'raise ImportError("this project module needs settings of its own")\n',
}


@pytest.mark.parametrize("source", list(FOREIGN_TASKS_MODULES.values()), ids=list(FOREIGN_TASKS_MODULES))
def test_a_tasks_py_in_the_servers_working_folder_is_not_what_the_worker_alongside_runs(
        children, collectors, data_dir, tmp_path, source):
    # Children.server runs the server in <tmp_path>/app, also on its PYTHONPATH.
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "tasks.py").write_text(source)
    backend = collectors()
    server = start_server(children, alongside_env(data_dir, backend.url))
    sent = get_me([server], rounds=5)

    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= sent, 90), (
        f"{len(unique_messages(backend.accepted_messages()))} of {sent} events arrived; {worker_log(data_dir)}")
    code, document, stderr = embedded_status(data_dir)
    assert [worker["name"].split("@")[0] for worker in document["workers"]] == ["alongside"], (document, stderr)
    assert code == 0, stderr
    assert len(worker_pids(data_dir)) == 1

    stop_servers([server])
    assert wait_until(lambda: worker_gone(data_dir), WORKER_GONE_TIMEOUT, interval=0.2), (
        f"the worker outlived its server: {worker_pids(data_dir)}")


def test_the_worker_alongside_imports_our_packages_first_and_nothing_from_the_servers_folder(tmp_path, monkeypatch):
    from telemetry_core.brokers import alongside

    server_cwd = str(tmp_path / "project")
    # A checkout (or an editable install's source folder): first, whatever the server's PYTHONPATH.
    path = alongside.worker_pythonpath(server_cwd, os.pathsep.join([".", "", "lib", server_cwd, "/opt/x"]),
                                       alongside.package_root())
    assert path.split(os.pathsep) == [str(alongside.package_root()), str(tmp_path / "project" / "lib"), "/opt/x"]
    # Installed in site-packages: not put before the standard library (an old backport there,
    # such as enum34, would shadow it); the worker's Python finds it there anyway.
    site_packages = tmp_path / "site-packages"
    (site_packages / "tasks").mkdir(parents=True)
    (site_packages / "tasks" / "__init__.py").touch()
    monkeypatch.setattr(alongside, "_site_folders", lambda: {str(site_packages)})
    assert alongside.worker_pythonpath(server_cwd, ".", site_packages) == ""


def test_a_data_folder_unusable_at_the_servers_start_gets_its_worker_once_it_is_fixed(children, collectors,
                                                                                     data_dir):
    backend = collectors()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    data_dir.write_text("")  # a file where the folder should be: a volume not mounted yet, a wrong mode
    server = start_server(children, alongside_env(data_dir, backend.url))
    failure = "cannot start a worker alongside the server"
    assert wait_until(lambda: failure in server.log(), 30), server.log()
    sent = get_me([server], rounds=3)  # held in the server's buffer meanwhile
    # The publisher thread has started (it looks for a worker too) and failed to publish.
    assert wait_until(lambda: "cannot reach the broker" in server.log(), 30), server.log()

    data_dir.unlink()  # fixed: the next look (every 5 s) starts the worker
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= sent, 90), (
        f"{len(unique_messages(backend.accepted_messages()))} of {sent} events arrived; {worker_log(data_dir)}")
    assert len(worker_pids(data_dir)) == 1
    assert server.log().count(failure) == 1, f"the failure is logged once:\n{server.log()}"

    stop_servers([server])
    assert wait_until(lambda: worker_gone(data_dir), WORKER_GONE_TIMEOUT, interval=0.2), worker_pids(data_dir)


def test_a_worker_alongside_that_keeps_exiting_is_reported_once_and_started_again(tmp_path, monkeypatch, caplog):
    import logging
    import subprocess
    from dataclasses import replace

    from telemetry_core.brokers import alongside
    from telemetry_core.settings import load_settings

    started: list[subprocess.Popen[bytes]] = []

    def spawn_one_that_exits(settings, alongside_fd):  # a worker that cannot start, as a broken install's
        started.append(subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]))
        started[-1].wait()
        return started[-1]

    monkeypatch.setattr(alongside, "_spawn", spawn_one_that_exits)
    server_side = alongside._ServerSide(replace(load_settings(), data_dir=tmp_path / "data"))  # no look-out thread
    caplog.set_level(logging.DEBUG, logger="telemetry_core.brokers.alongside")
    for _ in range(4):  # the look-out's looks, every CHECK_INTERVAL
        server_side.check()

    assert len(started) == 4, "started again at each look"
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the worker alongside exited with code 3" in warnings[0], warnings
    assert str(tmp_path / "data" / "worker-alongside.log") in warnings[0]
