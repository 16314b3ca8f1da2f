"""Segment's size limits, as the backend sees them: 32 KB per message, 500 KB per batch."""

from __future__ import annotations

import uuid

from telemetry_core.settings import load_settings
from tasks.segment import MAX_BATCH_BYTES, MAX_MESSAGE_BYTES, deliver_messages


def message(padding: int) -> dict:
    return {"type": "track", "event": "LogRecordsRequested", "anonymousId": str(uuid.uuid4()),
            "messageId": str(uuid.uuid4()), "timestamp": "2026-11-27T00:00:00+00:00",
            "properties": {"task": "Text2Text", "records": 1, "pad": "x" * padding}, "context": {}}


def test_large_volume_is_split_into_batches_under_500_kb_and_oversized_message_dropped(backend):
    messages = [message(1000) for _ in range(1200)] + [message(MAX_MESSAGE_BYTES)]
    outcome = deliver_messages(messages, load_settings())

    assert len(outcome.delivered) == 1200
    assert outcome.dropped == {"message over 32 KB": 1}
    requests = backend.requests
    assert len(requests) >= 3
    assert all(int(r.headers["Content-Length"]) <= 500 * 1024 for r in requests)
    assert all(int(r.headers["Content-Length"]) <= MAX_BATCH_BYTES + 100 for r in requests)
    received = [m["messageId"] for m in backend.accepted_messages()]
    assert received == [m["messageId"] for m in messages[:1200]]
