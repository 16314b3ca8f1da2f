"""Events a delivery could lose without a trace: a retry the broker cannot take, a message that
cannot be encoded. Real workers, real brokers, a real full disk; every event is either at the
backend or counted dropped with its reason."""

from __future__ import annotations

import errno
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.support import children_fixture, publish_events, scripted, status_json, unique_messages, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Path]:
    """A real 2 MB tmpfs (needs root), unmounted after the test."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> Path:
    """Writes a file into `folder` until its file system has no space left; returns it."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    return filler


def messages_on_disk(data: Path) -> list[str]:
    """The task messages of the telemetry queue in the embedded queue: waiting or taken."""
    return [path.name for path in (data / "broker").rglob("*.faults-disk-full.msg")]


def test_retry_that_cannot_be_published_on_a_full_disk_keeps_its_events(children, collectors, small_tmpfs):
    queue = "faults-disk-full"
    data = small_tmpfs
    events = publish_events(200, queue, embedded_data_dir=data, events_per_task=200)
    assert len(messages_on_disk(data)) == 1

    answers = scripted([503, 503, 503])
    filler: list[Path] = []

    def respond(path, body):
        if not filler:  # the disk fills while the backend fails: the retry cannot be written
            filler.append(fill(data))
        return answers(path, body)

    backend = collectors(0, respond)
    worker = children.worker(queue, backend.url, embedded_data_dir=data, backoff_base="0.4", backoff_max="2")
    # Either the message is gone (the bug), or the worker tried again with the disk still full.
    assert wait_until(lambda: len(backend.requests) >= 2 or (backend.requests and not messages_on_disk(data)),
                      timeout=30), worker.log()
    filler[0].unlink()  # the operator frees the space

    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= 200, timeout=30), (
        f"{len(unique_messages(backend.accepted_messages()))} of 200 events delivered, "
        f"{len(messages_on_disk(data))} message files left, statuses {[r.status for r in backend.requests]}\n"
        f"{worker.log()[-3000:]}")
    assert set(unique_messages(backend.accepted_messages())) == {event["messageId"] for event in events}
    assert "No space left on device" in worker.log()
    assert wait_until(lambda: not messages_on_disk(data), timeout=10), messages_on_disk(data)

    # What status shows: every event delivered, none dropped, and retries counted only once
    # the broker had them.
    def counts() -> dict:
        return status_json(RUBRIX_TELEMETRY_BROKER_URL=None, RUBRIX_TELEMETRY_DATA_DIR=str(data),
                           RUBRIX_TELEMETRY_QUEUE=queue)[1]["counts"]

    final = wait_until(lambda: (c := counts())["delivered"] == 200 and c, timeout=30) or counts()
    assert final["delivered"] == 200 and final["dropped"] == {}, final
    print("disk full during a retry:", [r.status for r in backend.requests], final)


def test_lone_surrogate_in_a_platform_value_is_counted_dropped_and_the_worker_goes_on(children, collectors,
                                                                                       redis_server):
    from telemetry_core import message
    from telemetry_core.contract import LOG_RECORDS_REQUESTED, new_message_id_prefix, timestamp_us
    from telemetry_core.platform_info import platform_info
    from tests.test_hostile_queue import envelope, task_body, worker_counts

    queue = "hostile-surrogate"
    backend = collectors()
    worker = children.worker(queue, backend.url, broker_url=redis_server.url)
    before = worker_counts(redis_server)["dropped"]

    # JSON carries "\ud800" as an escape; decoded, it is a str that UTF-8 cannot encode.
    poisoned = {**platform_info(), "machine": "x86_64\ud800"}
    events = [[LOG_RECORDS_REQUESTED, timestamp_us(), n, "TextClassification", n] for n in range(5)]
    kwargs = message.encode(poisoned, new_message_id_prefix(), events)
    redis_server.client().lpush(queue, envelope(task_body(**kwargs)))
    after = publish_events(1, queue, broker_url=redis_server.url)

    assert backend.wait_for(lambda b: b.accepted_messages(), timeout=30), worker.log()[-3000:]
    assert worker.process.poll() is None, worker.log()[-3000:]
    assert [m["messageId"] for m in backend.accepted_messages()] == [after[0]["messageId"]]

    def dropped_since() -> dict:
        counts = worker_counts(redis_server)["dropped"]
        return {reason: n - before.get(reason, 0) for reason, n in counts.items() if n != before.get(reason, 0)}

    assert wait_until(lambda: dropped_since(), timeout=10) == {"invalid: platform data outside the contract": 5}, (
        dropped_since(), worker.log()[-3000:])


@pytest.mark.load  # a RabbitMQ node of its own, alarmed: on one Python only
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_retry_published_during_a_rabbitmq_alarm_survives_a_worker_restart(rabbitmq_node, children, collectors,
                                                                           stop):
    queue = "alarm-retry"
    events = publish_events(20, queue, broker_url=rabbitmq_node.url)
    alarmed: list[float] = []
    answers = scripted([503])

    def respond(path, body):
        if not alarmed:  # the alarm starts while the backend fails: the retry is published into it
            rabbitmq_node.alarm_on()
            alarmed.append(time.monotonic())
        return answers(path, body)

    backend = collectors(0, respond)
    # An HTTP timeout longer than rabbitmqctl takes: the 503 comes once the alarm is on.
    first = children.worker(queue, backend.url, broker_url=rabbitmq_node.url, backoff_base="0.4",
                            backoff_max="2", http_timeout="30")
    assert wait_until(lambda: alarmed, timeout=30), first.log()
    # The worker's retry meets the alarm (and, fixed, gives up on its confirm); then it restarts.
    time.sleep(3)
    first.stop(stop, timeout=10)
    rabbitmq_node.alarm_off()
    cleared_at = time.monotonic()
    second = children.worker(queue, backend.url, broker_url=rabbitmq_node.url)

    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= 20, timeout=60), (
        f"{len(unique_messages(backend.accepted_messages()))} of 20 events delivered after the restart, "
        f"statuses {[r.status for r in backend.requests]}\n{first.log()[-3000:]}\n{second.log()[-2000:]}")
    assert set(unique_messages(backend.accepted_messages())) == {event["messageId"] for event in events}
    print(f"alarm during a retry, worker stopped by {stop.name}: all 20 delivered "
          f"{time.monotonic() - cleared_at:.1f}s after the alarm cleared; statuses {[r.status for r in backend.requests]}")
