"""The example server with segment-analytics-python's client where our hooks are: what
the alternative costs a server, measured the same way.

    python -m bench.segment_server PORT SINK_URL

The three endpoints send the same events with the same properties through `Client.track()`
(its consumer thread posting to the sink, in the server process, as Rubrix 0.18 did).
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn

from bench.payload import ANONYMOUS_ID, segment_client
from rubrix_hooks import example_app
from rubrix_hooks.contract import LOG_RECORDS_REQUESTED, SERVER_ERROR_FOUND, USER_INFO_REQUESTED


def install(sink_url: str) -> None:
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


def main(argv: list[str]) -> int:
    port, sink_url = int(argv[0]), argv[1]
    install(sink_url)
    uvicorn.run(example_app.app, host="127.0.0.1", port=port, access_log=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
