"""TelemetryMiddleware on a plain Starlette app: events from traffic alone, responses untouched."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from rubrix_hooks import TelemetryMiddleware, flush
from tests.support import free_port

CANARY = "canary-m1dd"
BIG_CHUNK = b"x" * 65536


async def me(request: Request) -> JSONResponse:
    return JSONResponse({"username": request.query_params.get("as", "rubrix")})


async def bulk(request: Request) -> JSONResponse:
    await request.body()
    if request.path_params["name"].startswith("Bad"):
        return JSONResponse({"detail": {"code": "rubrix.api.errors::ValidationError",
                                        "params": {"name": request.path_params["name"]}}}, status_code=422)
    return JSONResponse({"dataset": request.path_params["name"], "processed": 5, "failed": 2})


async def export(request: Request) -> StreamingResponse:
    async def chunks():
        for _ in range(32):
            yield BIG_CHUNK

    return StreamingResponse(chunks(), media_type="application/json")


async def crash(request: Request) -> JSONResponse:
    return JSONResponse({"detail": {"code": "rubrix.api.errors::GenericServerError",
                                    "params": {"message": f"{CANARY} secret stack trace"}}},
                        status_code=500)


def server_app() -> Starlette:
    return Starlette(
        routes=[Route("/api/me", me), Route("/api/datasets/{name}/{task}:bulk", bulk, methods=["POST"]),
                Route("/api/export", export), Route("/api/crash", crash)],
        # Outermost first: the middleware sees what the client sees, gzip included.
        middleware=[Middleware(TelemetryMiddleware), Middleware(GZipMiddleware, minimum_size=10)],
    )


@pytest.fixture(scope="module")
def server_url():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(server_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def fetch(url: str, method: str = "GET", body: bytes | None = None, gzip: bool = False) -> tuple[int, bytes]:
    headers = {"User-Agent": "middleware-test/1", "Accept-Language": "de"}
    if gzip:
        headers["Accept-Encoding"] = "gzip"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_me_bulk_and_errors_become_events(server_url, pipeline):
    assert fetch(server_url + "/api/me")[0] == 200
    assert fetch(server_url + f"/api/me?as={CANARY}", gzip=True)[0] == 200
    payload = json.dumps({"records": [{"text": CANARY}]}).encode()
    assert fetch(f"{server_url}/api/datasets/{CANARY}/TokenClassification:bulk", "POST", payload)[0] == 200
    assert fetch(f"{server_url}/api/datasets/Bad{CANARY}/Text2Text:bulk", "POST", payload, gzip=True)[0] == 422
    assert fetch(server_url + "/api/crash")[0] == 500
    assert flush(5)

    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 5, timeout=20)
    got = sorted(json.dumps([m["event"], m["properties"]], sort_keys=True) for m in pipeline.accepted_messages())
    headers = {"user-agent": "middleware-test/1", "accept-language": "de"}
    assert got == sorted(json.dumps(e, sort_keys=True) for e in [
        ["UserInfoRequested", {"is_default_user": True, **headers}],
        ["UserInfoRequested", {"is_default_user": False, **headers}],
        ["LogRecordsRequested", {"task": "TokenClassification", "records": 7}],
        ["ServerErrorFound", {"code": "rubrix.api.errors::ValidationError", **headers}],
        ["ServerErrorFound", {"code": "rubrix.api.errors::GenericServerError", **headers}],
    ])
    assert CANARY not in json.dumps([r.body for r in pipeline.requests])


def test_large_streaming_response_passes_untouched_and_records_nothing(server_url, pipeline):
    status, body = fetch(server_url + "/api/export")
    assert status == 200 and body == BIG_CHUNK * 32
    assert flush(5)
    assert not pipeline.wait_for(lambda b: b.requests, timeout=1.5)
