"""With no broker URL, an on-disk queue carries events from a server to a worker: no Redis needed.

The queue is kombu's filesystem transport made at-least-once (telemetry_core/brokers/embedded.py):
these tests kill real `celery -A tasks worker` processes on it. Figures in docs/reliability.md.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from telemetry_ops.collector import Collector
from tests.support import (REPO_ROOT, WorkerProcess, child_environment, children_fixture, message_ids, publish_events,
                           run_hook_client, status_json, unique_messages, wait_until)
from tests.support import assert_each_delivered_once_after_dedup


@pytest.mark.slow
def test_embedded_default_broker_carries_events_between_processes(tmp_path):
    sink = Collector().start()
    env = child_environment(RUBRIX_TELEMETRY_BROKER_URL=None, RUBRIX_TELEMETRY_DATA_DIR=str(tmp_path / "data"),
                            RUBRIX_TELEMETRY_ENDPOINT=sink.url)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        assert "embedded://" in worker.log()
        report, _ = run_hook_client(env, count=12)
        assert report["flushed"] and report["stats"]["published"] == 12
        assert sink.wait_for(lambda s: len(s.accepted_messages()) >= 12, timeout=30), worker.log()
        events = sorted(m["event"] for m in sink.accepted_messages())
        assert events == ["LogRecordsRequested"] * 4 + ["ServerErrorFound"] * 4 + ["UserInfoRequested"] * 4
        assert (tmp_path / "data" / "broker" / "queue").is_dir()
    finally:
        worker.stop()
        sink.stop()


# -- at-least-once and throughput (issue 10) ---------------------------------------------------

def _held_first_delivery(collectors):
    """A collector that holds the first POST until released (then answers 503 to a worker that is
    gone); every later one gets 200. Returns (collector, in_flight, release, held messageIds)."""
    in_flight, release = threading.Event(), threading.Event()
    lock = threading.Lock()
    held: list[str] = []

    def respond(path, body):
        with lock:
            first = not held
            if first:
                held.extend(message["messageId"] for message in body["batch"])
        if first:
            in_flight.set()
            release.wait(60)
            return 503, {}
        return 200, {}

    return collectors(0, respond), in_flight, release, held


def _left_in(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def _left_in_system_tmp(env: dict[str, str]) -> list[str]:
    """What the workers put in their TMPDIR, but for the prefork pool's own working folder
    (billiard's `pymp-*`, removed at a clean exit: a SIGKILLed worker leaves it)."""
    return [name for name in _left_in(Path(env["TMPDIR"])) if not name.startswith("pymp-")]


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


@pytest.fixture
def watched_tmp(tmp_path) -> dict[str, str]:
    """TMPDIR for the workers, in a folder the test looks into afterwards."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    return {"TMPDIR": str(folder)}


@pytest.mark.slow
def test_worker_killed_mid_delivery_the_next_worker_delivers_its_batch(children, collectors, watched_tmp, tmp_path):
    data = tmp_path / "data"
    backend, in_flight, release, held = _held_first_delivery(collectors)
    first = children.worker("telemetry", backend.url, embedded_data_dir=data, env=watched_tmp, http_timeout="60")
    # Two task messages, 20 events then 10. The filesystem transport takes files in name order,
    # `<milliseconds>_<uuid>`: two published in the same millisecond are taken in random order,
    # so the second waits for the next millisecond and the worker takes the 20 first.
    events = publish_events(20, "telemetry", embedded_data_dir=data)
    time.sleep(0.01)
    events += publish_events(10, "telemetry", embedded_data_dir=data)

    assert in_flight.wait(30), first.log()
    # `status` counts the batch the worker holds apart from what still waits (the second
    # message, unless the worker has already taken it too).
    _, document, _ = status_json(RUBRIX_TELEMETRY_BROKER_URL=None, RUBRIX_TELEMETRY_DATA_DIR=str(data))
    queue = document["queue"]
    assert queue["unacked"] >= 1 and queue["depth"] + queue["unacked"] == 2, queue
    first.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    release.set()

    second = children.worker("telemetry", backend.url, embedded_data_dir=data, env=watched_tmp)
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= 30, timeout=30), second.log()
    recovered_after = time.monotonic() - killed_at
    figures = assert_each_delivered_once_after_dedup(events, backend)
    # The killed delivery was never acknowledged: it came back from the queue's folder.
    assert len(held) == 20 and set(held) <= set(message_ids(backend.accepted_messages()))
    assert "back in the queue" in second.log()
    broker = data / "broker"
    # Nothing of ours is left. (`status`'s question to the first worker, which was busy and
    # then killed, waits in that worker's mailbox for its 300 s TTL: see the last test.)
    assert [name for name in _left_in(broker / "queue") if not name.endswith(".celery.pidbox.msg")] == []
    # Only the live worker's own (empty) claim is left once its last ack is in.
    assert wait_until(lambda: not [n for n in _left_in(broker / "unacked") if n.endswith(".msg")], timeout=5), (
        _left_in(broker / "unacked"))
    assert _left_in_system_tmp(watched_tmp) == []
    print("embedded sigkill:", figures, f"recovered {recovered_after:.1f}s after the kill (worker start included)")


@pytest.mark.slow
def test_a_live_workers_batch_is_left_alone_and_taken_back_once_it_is_killed(children, collectors, watched_tmp,
                                                                            tmp_path):
    from telemetry_core.brokers.embedded import ORPHAN_SWEEP_INTERVAL

    data = tmp_path / "data"
    backend, in_flight, release, held = _held_first_delivery(collectors)
    # A prefork worker: its pool children fork from the process holding the claim, and must not
    # keep it alive once that process is dead.
    first = children.worker("telemetry", backend.url, embedded_data_dir=data, env=watched_tmp, http_timeout="60",
                            extra_args=["--pool", "processes", "-c", "2"])
    events = publish_events(50, "telemetry", embedded_data_dir=data)  # 20 + 20 + 10
    assert in_flight.wait(30), first.log()
    # Which batch is held depends on which pool process posts first (and the three messages,
    # written in the same millisecond, are taken in any order): the rest is delivered.
    others = 50 - len(held)
    assert backend.wait_for(lambda b: len(b.accepted_messages()) >= others, timeout=30), first.log()

    # Another worker starts and sweeps while the first is alive, holding its batch: it must not take it.
    second = children.worker("telemetry", backend.url, embedded_data_dir=data, env=watched_tmp)
    time.sleep(ORPHAN_SWEEP_INTERVAL + 1)
    assert len(backend.accepted_messages()) == others
    assert not set(held) & set(message_ids(backend.accepted_messages()))

    first.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    release.set()
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= 50, timeout=30), second.log()
    recovered_after = time.monotonic() - killed_at
    figures = assert_each_delivered_once_after_dedup(events, backend)
    assert set(held) <= set(message_ids(backend.accepted_messages()))
    assert _left_in_system_tmp(watched_tmp) == []
    print("embedded sigkill, other worker running:", figures, f"recovered {recovered_after:.1f}s after the kill")


@pytest.mark.slow
def test_prefork_worker_drains_300_one_event_tasks_quickly(children, collectors, watched_tmp, tmp_path):
    data = tmp_path / "data"
    backend = collectors()
    events = publish_events(300, "telemetry", embedded_data_dir=data, events_per_task=1)
    assert len(list((data / "broker" / "queue").iterdir())) == 300
    worker = children.worker("telemetry", backend.url, embedded_data_dir=data, env=watched_tmp,
                             extra_args=["--pool", "processes", "-c", "2"])
    started = time.monotonic()
    # Generous for a loaded 2-core machine; kombu's own transport took 150 s (2 tasks/s).
    assert backend.wait_for(lambda b: len(b.accepted_messages()) >= 300, timeout=30), worker.log()
    took = time.monotonic() - started
    figures = assert_each_delivered_once_after_dedup(events, backend)
    assert figures["duplicates"] == 0
    assert _left_in(data / "broker" / "queue") == [] and _left_in_system_tmp(watched_tmp) == []
    print(f"embedded drain: 300 one-event tasks in {took:.2f}s = {300 / took:.0f} tasks/s (prefork -c 2)")


# -- broadcasts to consumers that are gone ------------------------------------------------------

def _bound_queues(broker: Path, exchange: str) -> list[str]:
    table = broker / "control" / f"{exchange}.exchange"
    return [queue for _, _, queue in json.loads(table.read_text())] if table.exists() else []


def _messages_of(broker: Path, queue: str) -> list[str]:
    """A broadcast queue's messages: in `broadcast/`, apart from the task messages."""
    return [name for name in _left_in(broker / "broadcast") if name.endswith(f".{queue}.msg")]


@pytest.mark.slow
@pytest.mark.load  # broadcast expiry waits out TTLs: on one Python only
def test_broadcasts_to_a_killed_worker_and_a_killed_event_reader_expire_and_their_queues_are_unbound(
        children, collectors, tmp_path):
    # Celery's own TTLs are 300 s (remote control) and 5 s (events): shortened here.
    data = tmp_path / "data"
    broker = data / "broker"
    env = {"RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS": json.dumps({"control_message_ttl": 2,
                                                                    "event_message_ttl": 1})}
    backend = collectors()
    gone = children.worker("telemetry", backend.url, embedded_data_dir=data, env=env, extra_args=["-n", "gone@%h"])
    gone_queue, = _bound_queues(broker, "celery.pidbox")
    gone.stop(signal.SIGKILL)
    status_env = {"RUBRIX_TELEMETRY_BROKER_URL": None, "RUBRIX_TELEMETRY_DATA_DIR": str(data), **env}
    reader = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks", "events", "--dump"], cwd=REPO_ROOT,
                              env=child_environment(**status_env), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    assert wait_until(lambda: _bound_queues(broker, "celeryev"), timeout=30)
    dead_reader_queue, = _bound_queues(broker, "celeryev")
    reader.kill()
    reader.wait()
    live = children.worker("telemetry", backend.url, embedded_data_dir=data, env=env,
                           extra_args=["-E", "-n", "live@%h"])
    for _ in range(3):
        status_json(**status_env)

    # The killed worker's mailbox and the killed reader's event queue stop filling up: what was
    # written to them expires, and nothing more is (heartbeats, every 2 s, would go on for ever).
    def swept() -> bool:
        return (gone_queue not in _bound_queues(broker, "celery.pidbox") and not _messages_of(broker, gone_queue)
                and not _bound_queues(broker, "celeryev") and not _messages_of(broker, dead_reader_queue))
    assert wait_until(swept, timeout=20, interval=0.5), (_left_in(broker), live.log()[-2000:])
    code, document, _ = status_json(**status_env)
    assert [worker["name"] for worker in document["workers"]] == [next(
        queue.removesuffix(".celery.pidbox") for queue in _bound_queues(broker, "celery.pidbox"))], document
    assert document["workers"][0]["name"].startswith("live@") and not _messages_of(broker, gone_queue)

    # A live worker whose binding went (it stalled past the TTL) binds its mailbox again.
    pidbox_table = broker / "control" / "celery.pidbox.exchange"
    pidbox_table.write_text("[]")
    assert wait_until(lambda: _bound_queues(broker, "celery.pidbox"), timeout=15, interval=0.5)
    code, document, _ = status_json(**status_env)
    assert code == 0 and document["workers"][0]["name"].startswith("live@"), document
