"""The example server with another hand-off where our hooks are: what the alternatives cost
a server, measured the same way as ours.

    python -m bench.peer_server segment PORT SINK_URL     # segment-analytics-python's client
    python -m bench.peer_server floor PORT REDIS_URL      # the floor of bench/floor.py

The three endpoints send the same events with the same properties. `segment`: through
`Client.track()`, its consumer thread posting to the sink in the server process, as Rubrix
0.18 did. `floor`: a tuple of the raw values appended to a deque, which a thread
JSON-encodes and LPUSHes to Redis every 0.2 s (no checking, no ids, no Celery): the least a
server could pay to hand events to a broker.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import uvicorn

from bench.payload import ANONYMOUS_ID, segment_client
from rubrix_hooks import example_app
from telemetry_core.contract import LOG_RECORDS_REQUESTED, SERVER_ERROR_FOUND, USER_INFO_REQUESTED

FLOOR_QUEUE = "bench-floor-server"


def install_segment(sink_url: str) -> None:
    client = segment_client(sink_url)

    def headers(request: Any) -> dict[str, Any]:
        return {"user-agent": request.headers.get("user-agent"),
                "accept-language": request.headers.get("accept-language")}

    async def track_login(request: Any, username: str) -> None:
        client.track(anonymous_id=ANONYMOUS_ID, event=USER_INFO_REQUESTED,
                     properties={"is_default_user": username == "rubrix", **headers(request)})

    async def track_bulk(task: Any, records: int) -> None:
        client.track(anonymous_id=ANONYMOUS_ID, event=LOG_RECORDS_REQUESTED,
                     properties={"task": task, "records": records})

    async def track_error(error: Any, request: Any) -> None:
        client.track(anonymous_id=ANONYMOUS_ID, event=SERVER_ERROR_FOUND,
                     properties={"code": error.code, **headers(request)})

    # The handlers look these names up in the module at each call.
    example_app.track_login, example_app.track_bulk, example_app.track_error = track_login, track_bulk, track_error


def install_floor(redis_url: str) -> None:
    from bench.floor import FloorPublisher

    floor = FloorPublisher(redis_url, FLOOR_QUEUE)

    async def track_login(request: Any, username: str) -> None:
        headers = request.headers
        floor.append((USER_INFO_REQUESTED, time.time_ns() // 1000, username == "rubrix",
                      headers.get("user-agent"), headers.get("accept-language")))

    async def track_bulk(task: Any, records: int) -> None:
        floor.append((LOG_RECORDS_REQUESTED, time.time_ns() // 1000, task, records))

    async def track_error(error: Any, request: Any) -> None:
        headers = request.headers
        floor.append((SERVER_ERROR_FOUND, time.time_ns() // 1000, error.code,
                      headers.get("user-agent"), headers.get("accept-language")))

    example_app.track_login, example_app.track_bulk, example_app.track_error = track_login, track_bulk, track_error


PEERS = {"segment": install_segment, "floor": install_floor}


def main(argv: list[str]) -> int:
    peer, port, url = argv[0], int(argv[1]), argv[2]
    PEERS[peer](url)
    uvicorn.run(example_app.app, host="127.0.0.1", port=port, access_log=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
