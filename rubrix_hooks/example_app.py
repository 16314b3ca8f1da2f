"""A small stand-in for a Rubrix server: its three telemetry endpoints and its error format.

Used by `rubrix-telemetry demo` when Rubrix itself is not installed, by the benchmark and
by the fault tests. It calls the hooks where Rubrix 0.18 calls its own:
`GET /api/me` -> track_login, `POST /api/datasets/{name}/{task}:bulk` -> track_bulk, and
the error handler -> track_error. Errors answer Rubrix's shape
`{"detail": {"code": ..., "params": {...}}}`, whose params echo user input (never sent).

    uvicorn rubrix_hooks.example_app:app
"""

from __future__ import annotations

import contextlib
import re
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rubrix_hooks.telemetry import shutdown_async, startup, track_bulk, track_error, track_login

API_KEY = "rubrix.apikey"
DEFAULT_USER = "rubrix"
TASKS = ("TextClassification", "TokenClassification", "Text2Text")
DATASET_NAME = re.compile(r"^(?!-|_)[a-z0-9-_]+$")


class RubrixError(Exception):
    """Mirrors rubrix.server.errors: a class-derived code plus parameters for the client."""

    http_status = 500

    def __init__(self, **params: object) -> None:
        super().__init__(params)
        self.params = params

    @property
    def code(self) -> str:
        return f"rubrix.api.errors::{type(self).__name__}"


class UnauthorizedError(RubrixError):
    http_status = 401


class EntityNotFoundError(RubrixError):
    http_status = 404


class ValidationError(RubrixError):
    http_status = 422


def _authenticate(request: Request) -> str:
    if request.headers.get("x-rubrix-api-key") != API_KEY:
        raise UnauthorizedError()
    return DEFAULT_USER


async def me(request: Request) -> JSONResponse:
    username = _authenticate(request)
    await track_login(request, username=username)
    return JSONResponse({"username": username, "email": None, "full_name": None, "disabled": False,
                         "workspaces": [], "superuser": True})


async def bulk(request: Request) -> JSONResponse:
    _authenticate(request)
    name, task = request.path_params["name"], request.path_params["task"]
    if not DATASET_NAME.match(name):
        raise ValidationError(name=name, message=f"dataset name {name!r} does not match {DATASET_NAME.pattern}")
    if task not in TASKS:
        raise EntityNotFoundError(name=task, type="Task")
    try:
        payload = await request.json()
        records = payload["records"]
        if not isinstance(records, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ValidationError(name=name, message="body must be {'records': [...]}") from None
    await track_bulk(task, len(records))
    return JSONResponse({"dataset": name, "processed": len(records), "failed": 0})


async def dataset(request: Request) -> JSONResponse:
    _authenticate(request)
    # No storage behind this stand-in: every dataset is unknown, as on an empty server.
    raise EntityNotFoundError(name=request.path_params["name"], type="Dataset")


async def rubrix_error_handler(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RubrixError)
    await track_error(error, request=request)
    return JSONResponse({"detail": {"code": error.code, "params": error.params}}, status_code=error.http_status)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    startup()  # the worker alongside, on the embedded queue: queued events go out before any request
    yield
    await shutdown_async()  # see rubrix_hooks.telemetry.shutdown: atexit is not reached on SIGTERM


app = Starlette(
    lifespan=lifespan,
    routes=[
        Route("/api/me", me, methods=["GET"]),
        Route("/api/datasets/{name}/{task}:bulk", bulk, methods=["POST"]),
        Route("/api/datasets/{name}", dataset, methods=["GET"]),
    ],
    exception_handlers={RubrixError: rubrix_error_handler},
)
