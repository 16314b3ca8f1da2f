"""A server process that exits right after firing events still hands them to the broker."""

from __future__ import annotations

import json

from telemetry_core import message

from tests.support import child_environment, run_hook_client


def test_events_fired_just_before_exit_are_flushed_to_the_broker(redis_server):
    queue = "telemetry-exit-flush"
    redis = redis_server.client()
    redis.delete(queue)
    # A flush interval far longer than the process lives: only the exit flush can send them.
    env = child_environment(RUBRIX_TELEMETRY_QUEUE=queue, RUBRIX_TELEMETRY_FLUSH_INTERVAL="30")
    report, took = run_hook_client(env, count=30, flush_timeout=-1)
    assert report["stats"]["published"] == 0  # nothing handed over before the script ended
    assert took < 15
    messages = [json.loads(raw) for raw in redis.lrange(queue, 0, -1)]
    events = []
    for queued in messages:
        args, kwargs, _ = json.loads(_body(queued))
        events += message.read(args, kwargs).events
    assert len(events) == 30 and len({e["messageId"] for e in events}) == 30


def _body(message: dict) -> str:
    import base64

    return base64.b64decode(message["body"]).decode()
