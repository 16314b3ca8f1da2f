"""`TelemetryMiddleware`: the three Rubrix events from HTTP traffic alone, for any ASGI app.

For servers whose code cannot be changed. It never reads a request body; it passes every
response message on at once, unchanged, and keeps a copy of the body only for the few
small responses it must read (a successful `GET /api/me`, a successful bulk request, an
error response), up to MAX_CAPTURED_BODY bytes.

Rubrix 0.18 itself already calls the hooks: use `patch_rubrix()` there, not this
middleware, or every event would be counted twice.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from typing import Any, Awaitable, Callable, MutableMapping

from telemetry_core.contract import (DEFAULT_USERNAME, LOG_RECORDS_REQUESTED, SERVER_ERROR_FOUND, USER_INFO_REQUESTED,
                                   raw_text)
from rubrix_hooks.telemetry import record, settings, shutdown_async, startup

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The responses we read are a few hundred bytes; anything larger is not one of them.
MAX_CAPTURED_BODY = 64 << 10


def _decode(body: bytes, encoding: str) -> bytes | None:
    """The body without its content-encoding, or None when we cannot undo it."""
    try:
        if encoding in ("", "identity"):
            return body
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
        if encoding == "br":
            import brotli  # Rubrix's own middleware compresses with it, so it is there when needed

            return brotli.decompress(body)
    except Exception:
        return None
    return None


class TelemetryMiddleware:
    def __init__(self, app: ASGIApp, api_prefix: str = "/api") -> None:
        self.app = app
        prefix = re.escape(api_prefix.rstrip("/"))
        self._me_path = re.compile(rf"{prefix}/me/?")
        self._bulk_path = re.compile(rf"{prefix}/datasets/[^/]+/(?P<task>[^/:]+):bulk/?")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and settings.enabled:
            await self.app(scope, receive, _flush_before_shutdown_completes(send))
            return
        if scope["type"] != "http" or not settings.enabled:
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", ""), scope.get("path", "")
        if method == "GET" and self._me_path.fullmatch(path):
            route: tuple[str, str | None] | None = ("me", None)
        elif method == "POST" and (bulk := self._bulk_path.fullmatch(path)):
            route = ("bulk", bulk.group("task"))
        else:
            route = None
        watcher = _ResponseWatcher(scope, route)
        await self.app(scope, receive, watcher.wrap(send))


def _flush_before_shutdown_completes(send: Send) -> Send:
    """The buffer goes to the broker before the server is told it may exit (see telemetry.shutdown);
    at start, `telemetry.startup` (the worker alongside, on the embedded queue)."""

    async def lifespan_send(message: Message) -> None:
        if message.get("type") in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            await shutdown_async()
        elif message.get("type") == "lifespan.startup.complete":
            startup()
        await send(message)

    return lifespan_send


class _ResponseWatcher:
    """Tees the body of a response it needs, and records its event when the response ends."""

    def __init__(self, scope: Scope, route: tuple[str, str | None] | None) -> None:
        self._scope = scope
        self._route = route
        self._status = 0
        self._encoding = ""
        self._capturing = False
        self._body = bytearray()

    def wrap(self, send: Send) -> Send:
        async def watched_send(message: Message) -> None:
            await send(message)  # first: the client is never kept waiting on telemetry
            try:
                self._observe(message)
            except Exception:  # telemetry must never break a response
                self._capturing = False

        return watched_send

    def _observe(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "http.response.start":
            self._status = int(message.get("status", 0))
            headers = {k.lower(): v for k, v in message.get("headers", [])}
            self._encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip().lower()
            is_json = b"json" in headers.get(b"content-type", b"")
            is_error = self._status >= 400
            is_success = 200 <= self._status < 300 and self._route is not None
            self._capturing = is_json and (is_error or is_success)
        elif kind == "http.response.body" and self._capturing:
            self._body += message.get("body", b"")
            if len(self._body) > MAX_CAPTURED_BODY:
                self._capturing = False
                self._body = bytearray()
            elif not message.get("more_body", False):
                self._capturing = False
                self._record(bytes(self._body))

    def _record(self, body: bytes) -> None:
        plain = _decode(body, self._encoding)
        if plain is None:
            return
        try:
            document = json.loads(plain)
        except ValueError:
            return
        if not isinstance(document, dict):
            return
        if self._status >= 400:
            detail = document.get("detail")
            if isinstance(detail, dict) and "code" in detail:
                record(SERVER_ERROR_FOUND, lambda: (raw_text(detail["code"]), *self._headers()))
        elif self._route is not None and self._route[0] == "me":
            username = document.get("username")
            record(USER_INFO_REQUESTED, lambda: (username == DEFAULT_USERNAME, *self._headers()))
        elif self._route is not None:
            processed, failed = document.get("processed"), document.get("failed", 0)
            if isinstance(processed, int) and isinstance(failed, int):
                record(LOG_RECORDS_REQUESTED, lambda: (self._route[1], processed + failed))

    def _headers(self) -> tuple[object, object]:
        """The user-agent and accept-language values, as the hooks keep them."""
        found: dict[str, object] = {"user-agent": None, "accept-language": None}
        for name, value in self._scope.get("headers", []):
            key = name.decode("latin-1").lower()
            if key in found:
                found[key] = value
        return raw_text(found["user-agent"]), raw_text(found["accept-language"])
