"""RabbitMQ as a broker: publisher confirms under an alarm, the queue's type, its depth.

Delivery, retries and a killed worker on RabbitMQ are in test_faults.py, with Redis's. Each
test here uses a vhost of its own on the machine's RabbitMQ, or (for an alarm) a node of
its own: tests/rabbitmq.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest

from telemetry_core.brokers import rabbitmq
from telemetry_core.settings import load_settings
from tests.support import (REPO_ROOT, SilentBroker, assert_each_delivered_once_after_dedup, child_environment,
                           children_fixture, hook_client_argv, publish_events, retries_logged, run_hook_client,
                           scripted, status_json, unique_messages)

pytestmark = pytest.mark.slow


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


def assert_each_publish_gives_up_within_the_timeout(broker_url: str, publish_timeout: float) -> None:
    """The server's sender, on a blocked broker: each publish raises within its bound, the
    next one too (a fresh connection, not the blocked one)."""
    from dataclasses import replace

    from telemetry_core import message
    from rubrix_hooks.publisher import CeleryBatchSender, PublishUnconfirmed
    from telemetry_core.settings import load_settings

    settings = replace(load_settings(), broker_url=broker_url, queue="alarm-direct", publish_timeout=publish_timeout)
    sender = CeleryBatchSender(settings)
    kwargs = message.encode({}, "0" * 24, [])
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(PublishUnconfirmed):
                sender(kwargs)
            # The write, and the wait for the confirm, each bounded by the publish timeout.
            assert time.monotonic() - started < 2 * publish_timeout + 0.5
    finally:
        sender.close()


def test_memory_alarm_events_count_as_published_only_once_confirmed_and_none_is_lost(
        rabbitmq_node, children, collectors, tmp_path):
    events, publish_timeout, alarm_seconds = 3000, 0.5, 5.0
    queue = "alarm"
    backend = collectors()
    worker = children.worker(queue, backend.url, broker_url=rabbitmq_node.url)
    rabbitmq_node.alarm_on()
    assert_each_publish_gives_up_within_the_timeout(rabbitmq_node.url, publish_timeout)

    env = child_environment(RUBRIX_TELEMETRY_BROKER_URL=rabbitmq_node.url, RUBRIX_TELEMETRY_QUEUE=queue,
                            RUBRIX_TELEMETRY_PUBLISH_TIMEOUT=str(publish_timeout))
    client = subprocess.Popen(hook_client_argv(events, flush_timeout=90, watch=True), cwd=REPO_ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=(tmp_path / "client.err").open("wb"), text=True)
    assert client.stdout is not None
    fired_at = time.monotonic()
    during_alarm = []
    for line in client.stdout:
        progress = json.loads(line)
        during_alarm.append(progress["stats"])
        if time.monotonic() - fired_at >= alarm_seconds:
            break
    rabbitmq_node.alarm_off()
    cleared_at = time.monotonic()
    lines = [json.loads(line) for line in client.stdout]
    client.wait(30)
    report = lines[-1]

    # Blocked, nothing was confirmed: nothing counted as published, nothing dropped, all held.
    assert during_alarm and all(s["published"] == 0 and s["dropped"] == {} for s in during_alarm), during_alarm
    assert during_alarm[-1]["pending"] == events
    # The alarm cleared: every event confirmed, then delivered.
    assert report["flushed"] and report["stats"] == {"published": events, "pending": 0, "dropped": {}}, report
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= events, timeout=60), worker.log()
    delivered_after = time.monotonic() - cleared_at
    accepted = backend.accepted_messages()
    unique = unique_messages(accepted)
    assert len(unique) == events
    # Each event once after de-dup, as fired: a third each of the three kinds, every bulk's records.
    kinds = Counter(message["event"] for message in unique.values())
    assert kinds == {"UserInfoRequested": 1000, "LogRecordsRequested": 1000, "ServerErrorFound": 1000}
    records = sorted(m["properties"]["records"] for m in unique.values() if m["event"] == "LogRecordsRequested")
    assert records == list(range(1, events, 3))
    # Any duplicate is the very same event (a publish confirmed too late was published again).
    for message in accepted:
        first = unique[message["messageId"]]
        assert [message[k] for k in ("event", "timestamp", "properties")] == [first[k] for k in ("event", "timestamp", "properties")]
    client_log = (tmp_path / "client.err").read_text()
    print(f"alarm: fired {events}, published while blocked {during_alarm[-1]['published']}, "
          f"confirmed {report['stats']['published']} "
          f"({report['at'] - cleared_at:.1f}s after the alarm cleared), "
          f"delivered {len(unique)} unique / {len(accepted)} accepted, all delivered {delivered_after:.1f}s "
          f"after the alarm cleared; client log: {client_log.strip().splitlines()[:3]}")


def test_quorum_queue_delivers_and_retries(rabbitmq_vhost, children, collectors):
    queue = "quorum-delivery"
    backend = collectors(0, scripted([503, (429, {"Retry-After": "2"})]))
    worker = children.worker(queue, backend.url, broker_url=rabbitmq_vhost.url, queue_type="quorum")
    events = publish_events(45, queue, broker_url=rabbitmq_vhost.url, queue_type="quorum")
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= 45, timeout=60), worker.log()
    figures = assert_each_delivered_once_after_dedup(events, backend)
    assert {reason for _, reason in retries_logged(worker)} == {"HTTP 503", "HTTP 429"}, worker.log()
    print("quorum:", figures)


@pytest.mark.parametrize("existing, configured", [("quorum", "classic"), ("classic", "quorum")])
def test_queue_of_another_type_stops_the_worker_and_fails_status_with_one_line_naming_the_variable(
        rabbitmq_vhost, existing, configured):
    url = rabbitmq_vhost.url
    rabbitmq.ensure_queue(load_settings({"RUBRIX_TELEMETRY_BROKER_URL": url, "RUBRIX_TELEMETRY_QUEUE_TYPE": existing}),
                          timeout=5)
    expected = (f"the queue 'telemetry' exists on the broker as a {existing} queue, but RUBRIX_TELEMETRY_QUEUE_TYPE "
                f"is {configured}: set RUBRIX_TELEMETRY_QUEUE_TYPE={existing}, or delete the queue (once empty) "
                f"to re-create it")
    env = child_environment(RUBRIX_TELEMETRY_BROKER_URL=url, RUBRIX_TELEMETRY_QUEUE_TYPE=configured)
    started = time.monotonic()
    worker = subprocess.run([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "telemetry",
                             "--pool", "solo", "--without-mingle", "--without-gossip"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert worker.returncode == 1, worker.stderr
    ours = [line for line in worker.stderr.splitlines() if "RUBRIX_TELEMETRY_QUEUE_TYPE" in line]
    assert ours == [f"rubrix-telemetry: {expected}"], worker.stderr
    assert "Traceback" not in worker.stderr + worker.stdout
    # status says the same: unhealthy, exit code 1, the one line.
    code, document, stderr = status_json(RUBRIX_TELEMETRY_BROKER_URL=url, RUBRIX_TELEMETRY_QUEUE_TYPE=configured)
    # One line for the mismatch; the worker it stopped is missing too, and status says so.
    assert code == 1 and stderr.splitlines()[0] == f"rubrix-telemetry: unhealthy: {expected}", stderr
    assert document["broker"]["answers"] and document["queue"]["error"] == expected
    print(f"queue type mismatch: the worker exited with 1 after {took:.1f}s")


def test_queue_of_another_type_holds_the_servers_events_with_one_log_line(rabbitmq_vhost):
    url = rabbitmq_vhost.url
    rabbitmq.ensure_queue(load_settings({"RUBRIX_TELEMETRY_BROKER_URL": url, "RUBRIX_TELEMETRY_QUEUE_TYPE": "quorum"}),
                          timeout=5)
    env = child_environment(RUBRIX_TELEMETRY_BROKER_URL=url, RUBRIX_TELEMETRY_FLUSH_INTERVAL="0.05")
    done = subprocess.run(hook_client_argv(40, flush_timeout=3), cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    report = json.loads(done.stdout.splitlines()[-1])
    # Held, never counted as published (dropped only by the exit's bounded wait, and counted).
    assert report["flushed"] is False and report["stats"]["published"] == 0 and report["stats"]["pending"] == 40
    named = [line for line in done.stderr.splitlines() if "RUBRIX_TELEMETRY_QUEUE_TYPE" in line]
    assert len(named) == 1 and "exists on the broker as a quorum queue" in named[0], done.stderr
    assert "Traceback" not in done.stderr


def test_queue_depth_counts_waiting_messages_and_status_shows_it(rabbitmq_vhost):
    url = rabbitmq_vhost.url
    settings = load_settings({"RUBRIX_TELEMETRY_BROKER_URL": url, "RUBRIX_TELEMETRY_QUEUE": "depth"})
    assert rabbitmq.queue_depth(settings, timeout=3) == 0  # not declared yet
    env = child_environment(RUBRIX_TELEMETRY_BROKER_URL=url, RUBRIX_TELEMETRY_QUEUE="depth",
                            RUBRIX_TELEMETRY_EVENTS_PER_TASK="1")
    report, _ = run_hook_client(env, count=3)  # no worker consumes the queue
    assert report["flushed"] and report["stats"]["published"] == 3
    assert rabbitmq.queue_depth(settings, timeout=3) == 3
    code, document, stderr = status_json(RUBRIX_TELEMETRY_BROKER_URL=url, RUBRIX_TELEMETRY_QUEUE="depth")
    assert document["queue"] == {"name": "depth", "depth": 3, "unacked": None, "error": None}
    # Unhealthy, and rightly so: nothing consumes the queue the three messages wait in.
    assert code == 1 and "no worker consumes the queue 'depth'" in stderr, stderr


def test_queue_depth_gives_up_within_its_timeout_on_a_broker_that_never_answers():
    silent = SilentBroker()
    try:
        settings = load_settings({"RUBRIX_TELEMETRY_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{silent.port}//"})
        started = time.monotonic()
        with pytest.raises(Exception):
            rabbitmq.queue_depth(settings, timeout=1.0)
        assert time.monotonic() - started < 2.5
    finally:
        silent.close()


def test_status_on_rabbitmq_shows_the_workers_and_what_they_delivered(rabbitmq_vhost, children, collectors,
                                                                      tmp_path):
    """RabbitMQ stores no counts: each worker keeps its own and answers status with them."""
    backend = collectors(0)
    worker = children.worker("telemetry", backend.url, broker_url=rabbitmq_vhost.url,
                             data_dir=str(tmp_path / "worker-data"))
    events = publish_events(30, "telemetry", broker_url=rabbitmq_vhost.url)
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= 30, timeout=30), worker.log()
    code, document, stderr = status_json(RUBRIX_TELEMETRY_BROKER_URL=rabbitmq_vhost.url)
    assert code == 0, stderr
    assert document["queue"]["depth"] == 0 and document["counts_error"] is None
    assert document["counts"]["delivered"] == len(events)
    assert [w["name"] for w in document["workers"]] and all(w["deliveries"] for w in document["workers"])
