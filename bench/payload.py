"""The one event every measurement sends: a bulk of 100 TextClassification records.

Ours is `track_bulk(TASK, RECORDS)`; Segment's client gets the same event name and
properties, the way Rubrix 0.18 called it, so both sides build and ship the same thing.
"""

from __future__ import annotations

from typing import Any

from telemetry_core.contract import LOG_RECORDS_REQUESTED

TASK = "TextClassification"
RECORDS = 100
PROPERTIES = {"task": TASK, "records": RECORDS}
ANONYMOUS_ID = "3c4f2a61-0d5e-4b1a-9f57-2e8d6c1b7a90"
WRITE_KEY = "bench-write-key"


def segment_client(sink_url: str | None, **options: Any):
    """segment-analytics-python's client with its defaults; `sink_url=None`: send=False."""
    from segment.analytics import Client

    if sink_url is None:
        return Client(write_key=WRITE_KEY, send=False, **options)
    return Client(write_key=WRITE_KEY, host=sink_url, **options)


def segment_track(client: Any) -> tuple[bool, Any]:
    return client.track(anonymous_id=ANONYMOUS_ID, event=LOG_RECORDS_REQUESTED, properties=dict(PROPERTIES))
