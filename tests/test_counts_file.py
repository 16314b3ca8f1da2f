"""`counts.json`, the delivery counts of the embedded queue (and of each worker on RabbitMQ):
a crash mid-write never leaves it broken for good, and no reader ever sees it half written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, children_fixture, publish_events, status_json, wait_until

pytestmark = pytest.mark.slow

# What `truncate, then write` leaves when the worker dies between the two writes' parts.
TRUNCATED_COUNTS = '{"delivered": 5, "dropped:HTTP 400": 2, "ret'


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


def embedded(data_dir: Path, queue: str) -> dict[str, str | None]:
    return {"RUBRIX_TELEMETRY_BROKER_URL": None, "RUBRIX_TELEMETRY_DATA_DIR": str(data_dir),
            "RUBRIX_TELEMETRY_QUEUE": queue}


def test_a_broken_counts_file_is_set_aside_and_the_next_deliveries_are_counted(children, backend, tmp_path):
    data_dir, queue = tmp_path / "data", "counts-broken"
    data_dir.mkdir()
    (data_dir / "counts.json").write_text(TRUNCATED_COUNTS)
    worker = children.worker(queue, backend.url, embedded_data_dir=data_dir)
    publish_events(3, queue, embedded_data_dir=data_dir, events_per_task=1)
    assert backend.wait_for(lambda b: len(b.accepted_messages()) >= 3, timeout=30), worker.log()

    def counts() -> dict | None:
        return status_json(**embedded(data_dir, queue))[1]["counts"]

    # The two counts the broken file still held whole are kept; the new deliveries are added.
    expected = {"delivered": 5 + 3, "retried": 0, "dropped": {"HTTP 400": 2}}
    assert wait_until(lambda: counts() == expected, timeout=20, interval=0.5), (counts(), worker.log())
    code, document, stderr = status_json(**embedded(data_dir, queue))
    assert code == 0 and document["counts_error"] is None, stderr
    # The broken file is kept aside, as it was, under a name that says so; one warning says where.
    [aside] = data_dir.glob("counts.json.broken-*")
    assert aside.read_text() == TRUNCATED_COUNTS
    assert worker.log().count("counts.json is broken") == 1, worker.log()
    assert json.loads((data_dir / "counts.json").read_text())["delivered"] == 8


# Reads counts.json as fast as it can, without any lock, until told to stop on stdin closing;
# prints how many reads it made and every text that was not a JSON object.
READER = r"""
import json, os, sys, threading
path, stop, reads, broken = sys.argv[1], threading.Event(), 0, []
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
while not stop.is_set():
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        continue
    reads += 1
    try:
        if not isinstance(json.loads(text), dict):
            raise ValueError
    except ValueError:
        broken.append(text)
print(json.dumps({"reads": reads, "broken": broken[:5], "broken_count": len(broken)}))
"""


def test_a_reader_never_sees_counts_json_half_written_while_a_worker_counts(children, backend, tmp_path):
    data_dir, queue = tmp_path / "data", "counts-atomic"
    events = 150
    publish_events(events, queue, embedded_data_dir=data_dir, events_per_task=1)  # one write per task
    (data_dir / "counts.json").write_text("{}")
    reader = subprocess.Popen([sys.executable, "-c", READER, str(data_dir / "counts.json")], cwd=REPO_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        worker = children.worker(queue, backend.url, embedded_data_dir=data_dir)
        assert backend.wait_for(lambda b: len(b.accepted_messages()) >= events, timeout=60), worker.log()
        assert wait_until(lambda: json.loads((data_dir / "counts.json").read_text()).get("delivered") == events,
                          timeout=20)
    finally:
        seen = json.loads(reader.communicate("", timeout=30)[0])
    assert seen["reads"] > events, seen
    assert seen["broken_count"] == 0, seen
    print(f"counts.json read {seen['reads']} times during {events} counted deliveries: 0 broken")


def test_status_on_rabbitmq_without_workers_says_where_no_counts_are_kept(rabbitmq_vhost):
    code, document, _ = status_json(RUBRIX_TELEMETRY_BROKER_URL=rabbitmq_vhost.url)
    assert document["broker"]["answers"] is True and document["workers"] == []
    assert document["counts"] is None and document["counts_error"] == "no counts kept on amqp:// brokers"
