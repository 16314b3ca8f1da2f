"""How the worker treats the backend's answers: retry with backoff, honour Retry-After, drop on 4xx."""

from __future__ import annotations

import asyncio

from rubrix_hooks import flush, track_bulk
from tests.support import message_ids, scripted


def send(count: int) -> None:
    async def run() -> None:
        for records in range(count):
            await track_bulk("TextClassification", records)

    asyncio.run(run())
    assert flush(5)


def attempts(backend) -> list:
    return [r for r in backend.requests if r.path == "/v1/batch"]


def test_503_twice_then_200_delivers_every_event_once_with_spaced_attempts(pipeline):
    pipeline.responder = scripted([503, 503])
    send(5)
    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 5, timeout=30)

    ids = message_ids(pipeline.accepted_messages())
    assert len(ids) == 5 and set(ids.values()) == {1}
    tries = attempts(pipeline)
    assert [t.status for t in tries] == [503, 503, 200]
    # The same events, with the same messageIds, on every attempt.
    assert all(message_ids(t.messages) == ids for t in tries)
    # Backoff base 0.4 s doubling, with equal jitter: at least 0.2 s, then at least 0.4 s.
    gaps = [later.received_at - earlier.received_at for earlier, later in zip(tries, tries[1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps


def test_429_waits_at_least_retry_after(pipeline):
    pipeline.responder = scripted([(429, {"Retry-After": "2"})])
    send(3)
    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 3, timeout=30)
    tries = attempts(pipeline)
    assert [t.status for t in tries] == [429, 200]
    assert tries[1].received_at - tries[0].received_at >= 2.0
    assert set(message_ids(pipeline.accepted_messages()).values()) == {1}


def test_400_is_not_retried(pipeline):
    pipeline.responder = scripted([400])
    send(2)
    assert pipeline.wait_for(lambda b: len(attempts(b)) >= 1, timeout=15)
    # Longer than two backoff periods: a retry would have arrived by now.
    assert not pipeline.wait_for(lambda b: len(attempts(b)) >= 2, timeout=2.5)
    assert pipeline.accepted_messages() == []


def test_events_split_across_answers_only_failed_batch_is_retried(pipeline):
    # Two tasks' worth of events: the first request fails, the others succeed at once.
    pipeline.responder = scripted([500])
    send(45)
    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 45, timeout=30)
    ids = message_ids(pipeline.accepted_messages())
    assert len(ids) == 45 and set(ids.values()) == {1}
