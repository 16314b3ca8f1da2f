"""Group commit (tasks/group_commit.py): a worker started with the documented command, no pool
flags, sends the events of many waiting task messages in one POST; each message still ends on
its own outcome. Each test has a queue of its own on the session's Redis and a collector of its
own, which answers after a short wait: a POST then takes longer than the worker needs to start
the next tasks, as a real backend does, and they gather for the next POST.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any, Callable

import pytest

from telemetry_core.settings import load_settings
from tasks import counters
try:
    from tasks.segment import MAX_BATCH_EVENTS, deliver_groups, encode_group
except ImportError: pass
from tests.support import children_fixture, publish_events, wait_until

# The documented command: `celery -A tasks worker -Q telemetry -E -l INFO`, no pool flags.
DOCUMENTED = dict(pool_args=(), extra_args=("-E",))
ANSWER_AFTER = 0.05  # seconds the collector takes per POST


@pytest.fixture
def children(redis_server, tmp_path):
    yield from children_fixture(tmp_path)


def slow_collector(collectors, answer: Callable[[list[dict[str, Any]]], int] = lambda batch: 200):
    def respond(path: str, body: Any) -> tuple[int, dict[str, str]]:
        time.sleep(ANSWER_AFTER)
        return answer(body.get("batch", []) if isinstance(body, dict) else []), {}

    return collectors(responder=respond)


def accepted_ids(collector) -> set[str]:
    return {message["messageId"] for message in collector.accepted_messages()}


def counts_now() -> dict[str, Any]:
    return counters.read_counts(load_settings())


def test_many_waiting_messages_go_out_many_events_per_post(children, collectors, redis_server):
    queue = f"gc-{uuid.uuid4().hex[:8]}"
    sent = publish_events(400, queue, broker_url=redis_server.url, events_per_task=1)
    collector = slow_collector(collectors)
    worker = children.worker(queue, collector.url, broker_url=redis_server.url, **DOCUMENTED)

    assert wait_until(lambda: len(accepted_ids(collector)) >= 400, timeout=60), len(accepted_ids(collector))
    assert accepted_ids(collector) == {event["messageId"] for event in sent}
    posts = [request for request in collector.requests if request.messages]
    # One POST per message before group commit: 400 POSTs of one event.
    assert 400 / len(posts) >= 2, f"{len(posts)} POSTs for 400 one-event messages"
    assert "concurrency: 128 (thread)" in worker.log()


def test_a_refused_combined_batch_drops_only_the_refusing_messages_events(children, collectors, redis_server):
    queue = f"gc-{uuid.uuid4().hex[:8]}"
    sent = publish_events(300, queue, broker_url=redis_server.url, events_per_task=1)
    marked = next(event["messageId"] for event in sent if event["properties"]["records"] == 137)
    collector = slow_collector(collectors, lambda batch: 400 if any(m.get("messageId") == marked for m in batch)
                               else 200)
    dropped_before = counts_now()["dropped"].get("HTTP 400", 0)
    children.worker(queue, collector.url, broker_url=redis_server.url, **DOCUMENTED)

    others = {event["messageId"] for event in sent} - {marked}
    assert wait_until(lambda: len(accepted_ids(collector)) >= 299, timeout=60)
    assert accepted_ids(collector) == others
    refused = [request.messages for request in collector.requests if request.status == 400]
    assert any(len(messages) > 1 for messages in refused), "no combined batch was refused"
    assert [message["messageId"] for message in refused[-1]] == [marked]
    assert wait_until(lambda: counts_now()["dropped"].get("HTTP 400", 0) - dropped_before == 1, timeout=10)


def test_narrowing_a_refused_batch_down_by_halves_keeps_each_groups_outcome(backend):
    def message(n: int) -> dict[str, Any]:
        return {"type": "track", "event": "LogRecordsRequested", "anonymousId": "a", "messageId": f"m-{n}",
                "timestamp": "2026-11-27T00:00:00+00:00", "properties": {"records": n}, "context": {}}

    bad = "m-11"  # in the second group (m-10, m-11)
    backend.responder = lambda path, body: (400 if any(m["messageId"] == bad for m in body["batch"]) else 200, {})
    groups = [encode_group([message(10 * g + i) for i in range(1 + g % 3)]) for g in range(8)]
    deliver_groups(groups, load_settings())

    assert groups[1].outcome.dropped == {"HTTP 400": 2} and not groups[1].outcome.delivered
    for group in groups[:1] + groups[2:]:
        assert len(group.outcome.delivered) == len(group.encoded) and not group.outcome.dropped
    assert len(backend.requests[0].messages) == sum(len(group.encoded) for group in groups)  # one POST first
    assert all(bad not in {m["messageId"] for m in r.messages} for r in backend.requests if r.status == 200)


def test_a_quiet_worker_sends_a_task_at_once_and_gathers_only_what_streams_in(backend, monkeypatch):
    from tasks import group_commit

    # Waits long enough that any gathering shows: a quiet worker must not wait at all.
    monkeypatch.setattr(group_commit, "GATHER_GAP", 3.0)
    monkeypatch.setattr(group_commit, "GATHER_MAX", 3.0)
    sender = group_commit.GroupSender(load_settings())
    took: list[float] = []

    def task(n: int) -> None:  # on a pool thread, as in the worker's thread pool
        started = time.monotonic()
        outcome = sender.deliver([{"type": "track", "event": "e", "anonymousId": "a", "messageId": f"q-{n}",
                                   "timestamp": "t", "properties": {}, "context": {}}], "test@host")
        assert len(outcome.delivered) == 1
        took.append(time.monotonic() - started)

    first = threading.Thread(target=task, args=(0,))
    first.start()
    first.join()
    assert took[0] < 1.5, f"a quiet worker's task waited {took[0]:.2f}s"

    # Tasks coming less than GATHER_GAP apart (a backlog draining): gathered into one POST.
    backend.requests.clear()
    threads = [threading.Thread(target=task, args=(n,)) for n in range(1, 4)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    assert [len(request.messages) for request in backend.requests] == [3]


def test_a_batch_never_carries_more_than_2500_events(backend):
    tiny = [{"type": "track", "event": "e", "anonymousId": "a", "messageId": str(n), "timestamp": "t",
             "properties": {}, "context": {}} for n in range(3000)]
    groups = [encode_group(tiny[n:n + 100]) for n in range(0, 3000, 100)]
    deliver_groups(groups, load_settings())

    assert [len(request.messages) for request in backend.requests] == [MAX_BATCH_EVENTS, 500]
    assert all(len(group.outcome.delivered) == 100 for group in groups)


def test_a_failed_combined_batch_is_retried_by_each_message_with_its_own_message_ids(children, collectors,
                                                                                       redis_server):
    queue = f"gc-{uuid.uuid4().hex[:8]}"
    sent = publish_events(200, queue, broker_url=redis_server.url, events_per_task=1)
    answered: list[int] = []

    def answer(batch: list[dict[str, Any]]) -> int:
        answered.append(503 if len(answered) < 2 else 200)
        return answered[-1]

    collector = slow_collector(collectors, answer)
    retried_before = counts_now()["retried"]
    children.worker(queue, collector.url, broker_url=redis_server.url, **DOCUMENTED)

    assert wait_until(lambda: len(accepted_ids(collector)) >= 200, timeout=60), len(accepted_ids(collector))
    assert accepted_ids(collector) == {event["messageId"] for event in sent}
    failed = [request.messages for request in collector.requests if request.status == 503]
    failed_ids = {message["messageId"] for messages in failed for message in messages}
    assert sum(len(messages) for messages in failed) > 2, "the failed POSTs were not combined"
    assert failed_ids <= accepted_ids(collector)  # the same messageIds, delivered later
    assert wait_until(lambda: counts_now()["retried"] - retried_before >= len(failed_ids), timeout=10)


def test_the_broker_hears_of_each_settled_message_and_each_retry_it_took(pipeline, monkeypatch):
    from rubrix_hooks import flush, track_bulk
    from tasks.celery import broker

    settled: list[int] = []
    published: list[int] = []
    monkeypatch.setattr(broker, "message_settled", settled.append)
    monkeypatch.setattr(broker, "message_published", published.append)
    answers = iter([503])
    pipeline.responder = lambda path, body: (next(answers, 200), {})

    async def fire() -> None:
        for records in range(5):
            await track_bulk("TextClassification", records)

    asyncio.run(fire())
    assert flush(5)
    assert pipeline.wait_for(lambda b: len(accepted_ids(b)) >= 5, timeout=30)
    # The message of the failed POST was settled by its retry (which the broker took), then the
    # retry by its delivery: every event settled once more than it was retried.
    assert wait_until(lambda: sum(settled) == 5 + sum(published), timeout=10), (settled, published)
    assert sum(published) >= 1
