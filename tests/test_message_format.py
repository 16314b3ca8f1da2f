"""The task message between server and worker (telemetry_core/message.py): formats, upgrades,
and messageIds that stay fixed whatever happens to a message on its way.

Against the session's redis-server, its in-process worker (on the `telemetry` queue) and
the collector as the analytics backend.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from datetime import datetime, timezone
from typing import Any, Iterator

import pytest
from celery import Celery

from telemetry_core import message
from telemetry_core.contract import DELIVER_TASK_NAME, new_message_id_prefix, timestamp_us
from telemetry_core.platform_info import PLATFORM_KEYS, platform_info
from telemetry_core.settings import load_settings
from tasks import counters
from tests.support import RedisServer, unique_messages, wait_until

CANARY = "CANARY-0c4e"
SERVER_PLATFORM = {"version": "0.18.0", "python_version": "3.13.0", "system": "Linux",
                   "sys_version": "#1 SMP Debian 6.1.115-1", "machine": "aarch64",
                   "platform": "Linux-6.1.0-aarch64-with-glibc2.36"}


@pytest.fixture
def producer(redis_server) -> Iterator[Celery]:
    """A bare Celery client on the test broker: writes task messages as any release would."""
    app = Celery("producer", broker=redis_server.url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)
    yield app
    app.close()


def release_0_1_0_event(records: int) -> dict[str, Any]:
    """An event exactly as release 0.1.0's hooks built it (format 1)."""
    return {"event": "LogRecordsRequested", "messageId": str(uuid.uuid4()),
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "properties": {"task": "TextClassification", "records": records}}


def format_2(events: list[list[Any]], platform: Any = SERVER_PLATFORM, prefix: str | None = None) -> dict[str, Any]:
    return message.encode(platform, prefix or new_message_id_prefix(), events)


def bulk(sequence: int, records: int) -> list[Any]:
    return ["LogRecordsRequested", timestamp_us(), sequence, "TextClassification", records]


def worker_counts() -> dict[str, Any]:
    return counters.read_counts(load_settings())


def test_worker_delivers_messages_queued_by_release_0_1_0_and_retries_them_unchanged(pipeline, producer):
    """An upgrade: release 0.1.0's servers queued format 1 messages (no platform data); the
    new worker delivers them with its own platform data, and retries keep their messageIds."""
    attempts: list[str] = []

    def first_attempt_fails(path: str, body: Any) -> tuple[int, dict[str, str]]:
        attempts.append(path)
        return (503, {}) if len(attempts) == 1 else (200, {})

    pipeline.responder = first_attempt_fails
    events = [release_0_1_0_event(n) for n in range(3)]
    # Release 0.1.0's publisher: `send_task(DELIVER_TASK_NAME, args=[events], queue=...)`.
    producer.send_task(DELIVER_TASK_NAME, args=[events], queue="telemetry")

    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 3, timeout=20)
    statuses = [request.status for request in pipeline.requests]
    assert statuses[0] == 503 and statuses[-1] == 200
    sent = {message["messageId"]: message for message in pipeline.accepted_messages()}
    assert set(sent) == {event["messageId"] for event in events}
    for event in events:
        delivered = sent[event["messageId"]]
        assert delivered["properties"] == event["properties"]
        assert delivered["timestamp"] == event["timestamp"]
        # The message carried none: the worker's own platform data stands in.
        assert delivered["context"] == platform_info()


def test_format_2_carries_the_servers_platform_data_into_every_event(pipeline, producer):
    prefix = new_message_id_prefix()
    producer.send_task(DELIVER_TASK_NAME, kwargs=format_2([bulk(7, 1), bulk(8, 2)], prefix=prefix),
                       queue="telemetry")
    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 2, timeout=20)
    delivered = sorted(pipeline.accepted_messages(), key=lambda m: m["properties"]["records"])
    assert [m["messageId"] for m in delivered] == [message.message_id(prefix, 7), message.message_id(prefix, 8)]
    assert all(m["context"] == SERVER_PLATFORM for m in delivered)
    assert SERVER_PLATFORM != platform_info()


def test_format_2_without_platform_data_is_delivered_with_the_workers(pipeline, producer):
    producer.send_task(DELIVER_TASK_NAME, kwargs=format_2([bulk(0, 5)], platform=None), queue="telemetry")
    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 1, timeout=20)
    assert pipeline.accepted_messages()[0]["context"] == platform_info()


@pytest.mark.parametrize("platform", [
    {**SERVER_PLATFORM, "hostname": CANARY},                       # a key outside the contract
    {**SERVER_PLATFORM, "version": CANARY + "\n" + "x" * 300},     # too long, not printable
    {key: SERVER_PLATFORM[key] for key in PLATFORM_KEYS[:-1]},     # a key missing
    {**SERVER_PLATFORM, "machine": [CANARY]},                      # not a string
    CANARY,
])
def test_platform_data_outside_the_contract_drops_the_message_and_counts_it(pipeline, producer, platform):
    before = worker_counts()["dropped"].get("invalid: platform data outside the contract", 0)
    producer.send_task(DELIVER_TASK_NAME, kwargs=format_2([bulk(0, 1), bulk(1, 2)], platform=platform),
                       queue="telemetry")
    # A valid message after it: once it has arrived, the hostile one was handled too.
    producer.send_task(DELIVER_TASK_NAME, kwargs=format_2([bulk(0, 99)]), queue="telemetry")
    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 1, timeout=20)
    assert wait_until(lambda: worker_counts()["dropped"].get("invalid: platform data outside the contract", 0)
                      == before + 2, timeout=10)
    assert [m["properties"]["records"] for m in pipeline.accepted_messages()] == [99]
    assert all(CANARY not in json.dumps(request.body) for request in pipeline.requests)


def test_a_message_in_a_format_from_the_future_is_counted_not_fatal(pipeline, producer):
    producer.send_task(DELIVER_TASK_NAME, kwargs={"format": 3, "events": [[CANARY]] * 4}, queue="telemetry")
    producer.send_task(DELIVER_TASK_NAME, kwargs=format_2([bulk(0, 42)]), queue="telemetry")
    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 1, timeout=20)
    assert wait_until(lambda: worker_counts()["dropped"].get("unknown message format 3", 0) >= 4, timeout=10)
    assert [m["properties"]["records"] for m in pipeline.accepted_messages()] == [42]


class ReplyLosingProxy:
    """A TCP proxy to Redis that forwards everything, except that on the first LPUSH (a task
    message being published) it cuts the connection before Redis's reply gets back: the
    publish happened, but the publisher sees it fail. The textbook ambiguous failure."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            cut_here = threading.Event()
            threading.Thread(target=self._pump, args=(client, upstream, cut_here, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, cut_here, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, cut_here: threading.Event,
              from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and b"LPUSH" in data and not self.cut.is_set():
                    self.cut.set()
                    cut_here.set()  # before forwarding: the reply must never be relayed
                if not from_client and cut_here.is_set():
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def close(self) -> None:
        self.listener.close()


def test_republish_after_an_ambiguous_publish_failure_keeps_every_message_id(pipeline, redis_server, tmp_path):
    """The broker got the message but the publisher saw an error: it publishes the same
    message again, so the backend receives duplicates that carry the same messageIds."""
    import subprocess
    import sys

    from tests.support import REPO_ROOT, child_environment

    proxy = ReplyLosingProxy(redis_server.port)
    try:
        env = child_environment(RUBRIX_TELEMETRY_BROKER_URL=f"redis://127.0.0.1:{proxy.port}/0",
                                RUBRIX_TELEMETRY_EVENTS_PER_TASK="500", RUBRIX_TELEMETRY_FLUSH_INTERVAL="0.05")
        script = ("import asyncio, json\n"
                  "from rubrix_hooks import flush, stats, track_bulk\n"
                  "async def main():\n"
                  "    for n in range(25):\n"
                  "        await track_bulk('Text2Text', n)\n"
                  "asyncio.run(main())\n"
                  "print(json.dumps({'flushed': flush(20), 'stats': stats()}))\n")
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert proxy.cut.is_set(), "the proxy never saw a publish"
        assert "cannot reach the broker" in done.stderr  # the publisher saw the publish fail ...
    finally:
        proxy.close()
    # ... and the broker had it anyway: the same 25 events arrive twice, with the same ids.
    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 50, timeout=30), len(pipeline.accepted_messages())
    accepted = pipeline.accepted_messages()
    unique = unique_messages(accepted)
    assert len(accepted) == 50 and len(unique) == 25
    assert sorted(m["properties"]["records"] for m in unique.values()) == list(range(25))


def test_format_2_events_outside_the_contract_never_reach_the_backend(pipeline, producer):
    now = timestamp_us()
    hostile = [
        ["LogRecordsRequested", now, 1, "TextClassification", 3, CANARY],        # a value more
        ["LogRecordsRequested", now, 2, CANARY, 3],                             # not a task
        [CANARY, now, 3, "TextClassification", 3],                              # not an event
        ["UserInfoRequested", now, 4, CANARY, "ua", "en"],                      # not a bool
        ["ServerErrorFound", now, 5, f"{CANARY} not found", "ua", "en"],        # a message, not a code
        ["LogRecordsRequested", now / 10**6, 6, "TextClassification", 3],       # seconds, as a float
        ["LogRecordsRequested", -1, 7, "TextClassification", 3],                # not a time
        ["LogRecordsRequested", now, -8, "TextClassification", 3],              # not a counter
        ["LogRecordsRequested", now, CANARY, "TextClassification", 3],
        {"event": "LogRecordsRequested", "properties": {"dataset": CANARY}},
        CANARY, None, [],
    ]
    valid = ["UserInfoRequested", now, 9, True, "ua/1.0 " + "x" * 400, "de"]
    before = sum(worker_counts()["dropped"].values())
    producer.send_task(DELIVER_TASK_NAME, kwargs=format_2([*hostile, valid]), queue="telemetry")
    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 1, timeout=20)
    assert wait_until(lambda: sum(worker_counts()["dropped"].values()) - before == len(hostile), timeout=10)
    (delivered,) = pipeline.accepted_messages()
    assert delivered["properties"] == {"is_default_user": True, "user-agent": ("ua/1.0 " + "x" * 400)[:256],
                                       "accept-language": "de"}
    assert all(CANARY not in json.dumps(request.body) for request in pipeline.requests)
