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

from tests.support import REPO_ROOT, child_environment, children_fixture, hook_client_argv, unique_messages

pytestmark = pytest.mark.slow


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


def assert_each_publish_gives_up_within_the_timeout(broker_url: str, publish_timeout: float) -> None:
    """The server's sender, on a blocked broker: each publish raises within its bound, the
    next one too (a fresh connection, not the blocked one)."""
    from dataclasses import replace

    from rubrix_hooks import message
    from rubrix_hooks.publisher import CeleryBatchSender, PublishUnconfirmed
    from rubrix_hooks.settings import load_settings

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
    # Any duplicate is the very same message (a publish confirmed too late is sent again).
    for message in accepted:
        assert unique[message["messageId"]] == message or unique[message["messageId"]]["properties"] == message["properties"]
    client_log = (tmp_path / "client.err").read_text()
    print(f"alarm: fired {events}, published while blocked {during_alarm[-1]['published']}, "
          f"confirmed {report['stats']['published']} "
          f"({report['at'] - cleared_at:.1f}s after the alarm cleared), "
          f"delivered {len(unique)} unique / {len(accepted)} accepted, all delivered {delivered_after:.1f}s "
          f"after the alarm cleared; client log: {client_log.strip().splitlines()[:3]}")
