"""A hostile producer writing straight onto the telemetry queue, and credentials that must
never show: against a real `celery -A tasks worker` child and a real redis-server."""

from __future__ import annotations

import base64
import io
import json
import pickle
import subprocess
import sys
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from telemetry_core import message
from telemetry_core.contract import DELIVER_TASK_NAME, EVENT_KEYS, validate_event
from rubrix_hooks.example_app import API_KEY
from telemetry_core.settings import load_settings
from tasks import counters
from telemetry_ops.collector import Collector
from tests.support import (WRAPPED_APP_MODULE, RedisServer, child_environment, children_fixture, free_port,
                           http_request, publish_events, unique_messages, wait_until)

pytestmark = pytest.mark.slow

CANARY = "CANARY-51e0"
QUEUE = "hostile-producer"


@pytest.fixture
def children(redis_server, tmp_path):
    yield from children_fixture(tmp_path)


@pytest.fixture
def collector():
    backend = Collector().start()
    yield backend
    backend.stop()


def worker_counts(redis_server) -> dict:
    """The delivery counts the workers keep in the broker (tasks/counters.py)."""
    return counters.read_counts(replace(load_settings(), broker_url=redis_server.url), timeout=2)


def envelope(body: bytes, content_type: str = "application/json", encoding: str = "utf-8",
             task: str = DELIVER_TASK_NAME) -> bytes:
    """A kombu/Celery (protocol 2) message as it sits in the Redis list, built by hand."""
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None, "group": None,
               "retries": 0, "timelimit": [None, None], "eta": None, "expires": None,
               "argsrepr": "hostile", "kwargsrepr": "{}", "origin": "hostile@producer"}
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": encoding, "content-type": content_type,
        "headers": headers,
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": QUEUE},
                       "delivery_tag": str(uuid.uuid4())},
    }).encode()


def task_body(*args: object, **kwargs: object) -> bytes:
    return json.dumps([list(args), kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()


def valid_event(**changes: object) -> dict:
    event = {"event": "LogRecordsRequested", "messageId": str(uuid.uuid4()),
             "timestamp": datetime.now().astimezone().isoformat(),
             "properties": {"task": "Text2Text", "records": 3}}
    event.update(changes)
    return event


class WritesMarker:
    """Unpickling this creates the marker file: proof that a worker unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return io.open, (self.path, "w")


def outside_the_contract(huge: str) -> list[dict]:
    event = valid_event()
    return [
        {**valid_event(), "user_hash": CANARY},
        valid_event(properties={"task": "Text2Text", "records": 3, "dataset": CANARY}),
        valid_event(event=f"{CANARY}Event"),
        valid_event(properties={"task": "Text2Text", "records": "12"}),
        valid_event(properties={"task": CANARY, "records": 1}),
        valid_event(properties=[CANARY]),
        valid_event(messageId=12345),
        valid_event(messageId=CANARY),
        valid_event(timestamp="2022-06-01T10:00:00"),  # no time zone
        valid_event(timestamp=CANARY),
        valid_event(properties={"code": "rubrix.api.errors::X", "user-agent": huge, "accept-language": None}),
        {key: event[key] for key in EVENT_KEYS if key != "timestamp"},
        CANARY, None, 7, [CANARY],
    ]


def test_hostile_producer_executes_nothing_forwards_nothing_and_worker_keeps_running(children, collector,
                                                                                   redis_server, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(WritesMarker(str(marker)))
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(WritesMarker(str(probe))))
    assert probe.exists(), "the pickle payload would run if unpickled"

    redis = redis_server.client()
    counts_before = worker_counts(redis_server)
    worker = children.worker(QUEUE, collector.url)

    huge = "x" * 300_000 + CANARY  # past the header limit: what is kept must not reach the canary
    # A time zone of its own, and recent: an event older than RUBRIX_TELEMETRY_MAX_EVENT_AGE expires.
    kept_huge = valid_event(properties={"task": "TokenClassification", "records": 1},
                            timestamp=datetime.now(timezone(timedelta(hours=2))).isoformat())
    truncated = valid_event(event="ServerErrorFound", properties={"code": "rubrix.api.errors::X",
                                                                  "user-agent": huge, "accept-language": "es"})
    smuggler = valid_event()
    hostile = {
        "pickle payload": envelope(payload, "application/x-python-serialize", "binary"),
        "unregistered task": envelope(task_body(f"touch {marker}"), task="os.system"),
        "invalid JSON": envelope(b'[[{"event": "LogRecordsRequested", ' + CANARY.encode()),
        "deep nesting": envelope(b"[" * 100_000 + b"]" * 100_000),
        "events is a string": envelope(task_body(CANARY)),
        "events is an object": envelope(task_body({"events": [CANARY]})),
        "no events": envelope(task_body()),
        "hostile kwargs": envelope(task_body([smuggler], first_attempt_at=CANARY, smuggled=CANARY)),
        "outside the contract": envelope(task_body(outside_the_contract(huge) + [kept_huge, truncated])),
    }
    for message in hostile.values():
        redis.lpush(QUEUE, message)
    # Then an ordinary event from the server's own sender: the worker must still deliver it.
    after = publish_events(1, QUEUE)

    expected = {smuggler["messageId"], kept_huge["messageId"], truncated["messageId"], after[0]["messageId"]}
    assert collector.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= len(expected), timeout=30), (
        worker.log())
    assert wait_until(lambda: redis.llen(QUEUE) == 0, timeout=10)

    assert not marker.exists(), "the worker unpickled a message"
    assert worker.process.poll() is None, worker.log()
    delivered = unique_messages(collector.accepted_messages())
    assert set(delivered) == expected
    raw = json.dumps([{"headers": r.headers, "body": r.body} for r in collector.requests])
    assert CANARY not in raw
    for message in delivered.values():
        event = {key: message[key] for key in EVENT_KEYS}
        assert validate_event(event) == event
    assert len(delivered[truncated["messageId"]]["properties"]["user-agent"]) == 256

    log = worker.log()
    assert "rejected events outside the contract" in log
    assert "untrusted content" in log.lower() or "ContentDisallowed" in log  # the pickle, refused
    assert "unregistered task" in log.lower()
    # The counts are written once a task has finished, just after the backend has its events.
    counts = wait_until(lambda: (c := worker_counts(redis_server))["delivered"] - counts_before["delivered"]
                        >= len(expected) and c, timeout=10) or worker_counts(redis_server)
    dropped = {reason: n - counts_before["dropped"].get(reason, 0) for reason, n in counts["dropped"].items()}
    dropped = {reason: n for reason, n in dropped.items() if n}
    assert dropped.get("not a list of events") == 3, dropped
    # Refused by Celery before the task ran, and counted as messages.
    assert dropped.get("rejected message (ContentDisallowed)") == 1, dropped  # the pickle
    assert dropped.get("rejected message (unregistered task)") == 1, dropped
    rejected_events = len(outside_the_contract(huge))
    assert sum(n for reason, n in dropped.items() if reason.startswith("invalid: ")) == rejected_events, dropped
    assert counts["delivered"] - counts_before["delivered"] == len(expected)
    print("hostile producer:", len(hostile), "hostile messages,", rejected_events, "events outside the contract;",
          "worker counted dropped:", dropped, "; delivered:", len(delivered))


def test_body_that_is_not_args_kwargs_embed_does_not_stop_the_worker(children, collector, redis_server):
    queue = QUEUE + "-poison"
    worker = children.worker(queue, collector.url)
    redis_server.client().lpush(queue, envelope(json.dumps({"events": CANARY}).encode()))
    after = publish_events(1, queue)
    assert wait_until(lambda: worker.process.poll() is not None or collector.accepted_messages(), timeout=20)
    assert worker.process.poll() is None, worker.log()[-2000:]
    assert [m["messageId"] for m in collector.accepted_messages()] == [after[0]["messageId"]]


BROKER_PASSWORD = "broker-pass-" + CANARY
WRITE_KEY = "write-key-" + CANARY


def test_credentials_never_appear_in_logs_status_or_task_arguments(children, collector, tmp_path):
    redis = RedisServer(port=free_port(), folder=tmp_path / "redis")
    redis.start()
    try:
        redis.client().config_set("requirepass", BROKER_PASSWORD)
        broker_url = f"redis://:{BROKER_PASSWORD}@127.0.0.1:{redis.port}/0"
        client = redis.client()
        client.connection_pool.connection_kwargs["password"] = BROKER_PASSWORD
        queue = "hostile-credentials"
        env = child_environment(RUBRIX_TELEMETRY_BROKER_URL=broker_url, RUBRIX_TELEMETRY_KEY=WRITE_KEY,
                                RUBRIX_TELEMETRY_QUEUE=queue, RUBRIX_TELEMETRY_ENDPOINT=collector.url)

        port = free_port()
        server = children.server([sys.executable, "-m", "uvicorn", f"{WRAPPED_APP_MODULE}:app", "--port", str(port),
                                  "--log-level", "debug"], port, env)
        auth = {"X-Rubrix-Api-Key": API_KEY}
        assert http_request(port, "GET", "/api/me", auth)[0] == 200
        assert http_request(port, "POST", "/api/datasets/ds/TextClassification:bulk", auth,
                            json.dumps({"records": [{}]}).encode())[0] == 200
        assert http_request(port, "GET", "/api/datasets/ds", auth)[0] == 404
        # Queued, not yet consumed: what Flower would show as the task's arguments.
        assert wait_until(lambda: client.llen(queue) >= 1, timeout=10)
        queued = [json.loads(item) for item in client.lrange(queue, 0, -1)]
        for item in queued:
            args, kwargs, _ = json.loads(base64.b64decode(item["body"]))
            assert args == [] and set(kwargs) == {"format", "platform", "id_prefix", "events"}
            assert message.read(args, kwargs).events and not message.read(args, kwargs).dropped
        stored = b"".join(client.dump(key) or b"" for key in client.keys("*"))
        assert BROKER_PASSWORD.encode() not in stored and WRITE_KEY.encode() not in stored

        worker = children.worker(queue, collector.url, broker_url=broker_url, key=WRITE_KEY)
        assert collector.wait_for(lambda b: len(b.accepted_messages()) >= 3, timeout=30), worker.log()
        # A wrong password, then the broker gone: error paths log too.
        bad_env = {**env, "RUBRIX_TELEMETRY_BROKER_URL": broker_url.replace(BROKER_PASSWORD, BROKER_PASSWORD + "x")}
        status = [subprocess.run([sys.executable, "-m", "telemetry_ops.cli", "status", *flags], env=e,
                                 capture_output=True, text=True, timeout=60)
                  for e in (env, bad_env) for flags in ([], ["--json"])]
        preview = subprocess.run([sys.executable, "-m", "telemetry_ops.cli", "preview"], env=env, capture_output=True,
                                 text=True, timeout=60)
        redis.stop()
        assert http_request(port, "GET", "/api/me", auth)[0] == 200
        wait_until(lambda: "cannot reach the broker" in server.log(), timeout=10)
        server.stop()

        outputs = {"server log": server.log(), "worker log": worker.log(), "preview": preview.stdout + preview.stderr}
        outputs.update({f"status {i}": run.stdout + run.stderr for i, run in enumerate(status)})
        for where, text in outputs.items():
            assert BROKER_PASSWORD not in text, where
            assert WRITE_KEY not in text, where
        assert status[0].returncode == 0, status[0].stdout + status[0].stderr
    finally:
        redis.stop()
