"""Hooks -> Redis -> Celery worker -> HTTP backend: what the analytics backend receives."""

from __future__ import annotations

import asyncio
import gzip
import base64
import uuid
from datetime import datetime, timezone

import pytest

from rubrix_hooks import flush, track_bulk, track_error, track_login
from telemetry_core.platform_info import PLATFORM_KEYS, platform_info

CANARY = "CANARY-7f3a"


class FakeRequest:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


class RubrixLikeError(Exception):
    """Shaped like Rubrix's errors: a class-derived code, and arguments that must never leave."""

    code = "rubrix.api.errors::EntityNotFoundError"

    def __init__(self) -> None:
        super().__init__(f"dataset {CANARY}-dataset not found")
        self.name = f"{CANARY}-dataset"
        self.params = {"metadata": CANARY}


def fire(*hooks) -> None:
    async def run() -> None:
        for hook in hooks:
            await hook

    asyncio.run(run())
    assert flush(5), "the hooks' events did not reach the broker"


def received(backend, count: int, timeout: float = 15) -> list[dict]:
    assert backend.wait_for(lambda b: len(b.accepted_messages()) >= count, timeout), (
        f"expected {count} messages, the backend has {len(backend.accepted_messages())}")
    return backend.accepted_messages()


def test_each_hook_sends_exactly_its_allowed_properties(pipeline):
    request = FakeRequest({"user-agent": "rubrix-client/0.18", "accept-language": "es-ES",
                           "cookie": CANARY, "x-rubrix-api-key": CANARY})
    fire(
        track_login(request, username="rubrix"),
        track_login(request, username=f"{CANARY}-someone"),
        track_bulk("TextClassification", 42),
        track_error(RubrixLikeError(), request),
    )
    messages = {(m["event"], str(m["properties"].get("is_default_user"))): m for m in received(pipeline, 4)}

    assert messages[("UserInfoRequested", "True")]["properties"] == {
        "is_default_user": True, "user-agent": "rubrix-client/0.18", "accept-language": "es-ES"}
    assert messages[("UserInfoRequested", "False")]["properties"]["is_default_user"] is False
    assert messages[("LogRecordsRequested", "None")]["properties"] == {"task": "TextClassification", "records": 42}
    assert messages[("ServerErrorFound", "None")]["properties"] == {
        "code": "rubrix.api.errors::EntityNotFoundError", "user-agent": "rubrix-client/0.18",
        "accept-language": "es-ES"}
    assert CANARY not in str(pipeline.requests)


def test_every_message_carries_platform_context_ids_and_time(pipeline):
    before = datetime.now(timezone.utc)
    fire(track_bulk("TokenClassification", 1), track_bulk("Text2Text", 0))
    messages = received(pipeline, 2)
    for message in messages:
        assert set(message) == {"type", "event", "anonymousId", "messageId", "timestamp", "properties", "context"}
        assert message["type"] == "track"
        assert set(message["context"]) == set(PLATFORM_KEYS)
        assert message["context"] == platform_info()
        assert uuid.UUID(message["messageId"]).version == 4
        sent = datetime.fromisoformat(message["timestamp"])
        assert sent.tzinfo is not None and before <= sent <= datetime.now(timezone.utc)
    assert len({m["messageId"] for m in messages}) == 2


def test_anonymous_id_is_stable_and_reveals_no_mac_address(pipeline):
    fire(track_bulk("TextClassification", 3), track_bulk("TextClassification", 4))
    ids = {m["anonymousId"] for m in received(pipeline, 2)}
    assert len(ids) == 1
    anonymous_id = ids.pop()
    mac = uuid.getnode()
    assert anonymous_id != str(uuid.UUID(int=mac))
    assert f"{mac:012x}" not in anonymous_id.replace("-", "")
    assert uuid.UUID(anonymous_id).version == 4


def test_batch_request_uses_segment_wire_format(pipeline):
    fire(track_bulk("TextClassification", 5))
    received(pipeline, 1)
    request = [r for r in pipeline.requests if r.status == 200][0]
    assert request.path == "/v1/batch"
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"test-write-key:").decode()
    assert request.headers["Content-Type"] == "application/json"
    assert set(request.body) == {"batch", "sentAt"}
    assert datetime.fromisoformat(request.body["sentAt"]).tzinfo is not None


@pytest.mark.parametrize("task, records", [("NotATask", 3), ("TextClassification", -1),
                                            ("TextClassification", True), ("TextClassification", "12")])
def test_event_outside_the_contract_is_dropped_by_the_hook(pipeline, task, records):
    from rubrix_hooks.telemetry import stats

    dropped_before = sum(stats()["dropped"].values())
    fire(track_bulk(task, records), track_bulk("TextClassification", 7))
    messages = received(pipeline, 1)
    assert [m["properties"] for m in messages] == [{"task": "TextClassification", "records": 7}]
    assert sum(stats()["dropped"].values()) == dropped_before + 1


def test_str_enum_task_is_sent_as_its_value(pipeline):
    import enum

    class TaskType(str, enum.Enum):
        text_classification = "TextClassification"

    fire(track_bulk(TaskType.text_classification, 9))
    assert received(pipeline, 1)[0]["properties"]["task"] == "TextClassification"


def test_delivery_bodies_are_gzip_compressed_and_decode_to_the_messages(pipeline):
    fire(track_bulk("Text2Text", 5), track_login(FakeRequest({"user-agent": "gzip-test/1"}), username="rubrix"))
    received(pipeline, 2)
    for request in pipeline.requests:
        assert request.headers.get("Content-Encoding") == "gzip"
        assert request.status == 200 and request.messages  # decoded, parsed, accepted


@pytest.mark.parametrize("encoding, body, status", [
    (None, b'{"batch": []}', 200),
    ("gzip", gzip.compress(b'{"batch": []}'), 200),
    ("gzip", gzip.compress(b'{"batch": []}')[:-9], 400),        # truncated
    ("gzip", b"not gzip at all", 400),
    ("gzip", gzip.compress(b" " * (20 << 20)), 400),           # 20 MB once decompressed
    ("br", b'{"batch": []}', 400),
])
def test_the_collector_undoes_gzip_and_refuses_what_it_cannot_decode(backend, encoding, body, status):
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Content-Encoding": encoding} if encoding else {})}
    request = urllib.request.Request(backend.url + "/v1/batch", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answered = response.status
    except urllib.error.HTTPError as error:
        answered = error.code
    assert answered == status
