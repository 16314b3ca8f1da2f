"""A local Segment-compatible backend that records exactly what leaves a server.

`rubrix-telemetry collector` runs it; operators point `RUBRIX_TELEMETRY_ENDPOINT` at it
to audit the telemetry before anything goes out, and the tests use it as the backend.
It accepts `POST /v1/batch` and `POST /v1/track`, counts the requests and messages, keeps
the received requests (every one by default, as the tests read them; the last `keep_last`
when given: the command keeps none, so that it stays flat in memory however long it runs),
and appends every message to a JSONL file when given one.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import zlib
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, MutableSequence

log = logging.getLogger("telemetry_ops.collector")

# Larger than Segment's 500 KB batch limit, so that an oversized batch is seen, not cut.
MAX_BODY_BYTES = 4 << 20
# What a gzip body may grow to once decompressed: Segment's limits are 500 KB per batch, so
# this is generous, and it keeps a small "gzip bomb" from filling the collector's memory.
MAX_DECODED_BYTES = 16 << 20


class UndecodableBody(ValueError):
    """A body whose Content-Encoding we cannot undo (unknown, corrupt, or too large decoded)."""


def decoded_body(raw: bytes, content_encoding: str | None) -> bytes:
    """The request body with its Content-Encoding (none or gzip, as Segment accepts) undone."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding != "gzip":
        raise UndecodableBody(f"unsupported Content-Encoding {encoding!r}")
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)  # 16: expect the gzip header
    try:
        plain = decompressor.decompress(raw, MAX_DECODED_BYTES)
    except zlib.error:
        raise UndecodableBody("corrupt gzip body") from None
    if decompressor.unconsumed_tail:
        raise UndecodableBody("gzip body too large once decompressed")
    if not decompressor.eof:
        raise UndecodableBody("truncated gzip body")
    return plain


@dataclass
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: Any  # the decoded JSON, or None when it was not JSON
    status: int  # what the collector answered
    received_at: float = 0.0

    @property
    def messages(self) -> list[dict[str, Any]]:
        if not isinstance(self.body, dict):
            return []
        if self.path == "/v1/batch":
            batch = self.body.get("batch")
            return batch if isinstance(batch, list) else []
        return [self.body]


# Decides the answer to a request before it is recorded: (status, headers) or None for 200.
Responder = Callable[[str, Any], "tuple[int, dict[str, str]] | None"]


@dataclass
class Collector:
    host: str = "127.0.0.1"
    port: int = 0
    out: Path | None = None
    responder: Responder | None = None
    # None: keep every request (the tests read them); N: only the last N (0: none).
    keep_last: int | None = None
    requests: MutableSequence[ReceivedRequest] = field(default_factory=list)
    # Counted whatever is kept: every request, and the messages of those answered 2xx.
    requests_received: int = 0
    messages_accepted: int = 0

    def __post_init__(self) -> None:
        if self.keep_last is not None:
            self.requests = collections.deque(self.requests, maxlen=self.keep_last)
        self._lock = threading.RLock()  # wait_for predicates read under it
        self._changed = threading.Condition(self._lock)
        self._server = ThreadingHTTPServer((self.host, self.port), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "Collector":
        self._thread = threading.Thread(target=self._server.serve_forever, name="collector", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def accepted_messages(self) -> list[dict[str, Any]]:
        """Every message of every kept request that was answered 2xx, in arrival order."""
        with self._lock:
            return [m for r in self.requests if 200 <= r.status < 300 for m in r.messages]

    def wait_for(self, predicate: Callable[["Collector"], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    def _record(self, request: ReceivedRequest) -> None:
        accepted = 200 <= request.status < 300
        with self._changed:
            self.requests.append(request)
            self.requests_received += 1
            if accepted:
                self.messages_accepted += len(request.messages)
            self._changed.notify_all()
        if accepted and request.messages:
            if self.out is not None:
                with self.out.open("a", encoding="utf-8") as out:
                    for message in request.messages:
                        out.write(json.dumps(message, ensure_ascii=False) + "\n")
            events = ", ".join(str(m.get("event")) for m in request.messages if isinstance(m, dict))
            log.info("received %d messages on %s (%d in all): %s", len(request.messages), request.path,
                     self.messages_accepted, events)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The answer goes out in two writes (headers, body): without TCP_NODELAY, Nagle
            # holds the body until the client's delayed ACK, ~40 ms per request on Linux.
            disable_nagle_algorithm = True

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                if self.path not in ("/v1/batch", "/v1/track") or length > MAX_BODY_BYTES:
                    self._answer(404 if length <= MAX_BODY_BYTES else 413, {})
                    self.rfile.read(min(length, MAX_BODY_BYTES))
                    return
                raw = self.rfile.read(length)
                try:
                    body = json.loads(decoded_body(raw, self.headers.get("Content-Encoding")))
                except ValueError:  # UndecodableBody too: a 400, as for a body that is not JSON
                    body = None
                status, headers = 200, {}
                if collector.responder is not None:
                    status, headers = collector.responder(self.path, body) or (200, {})
                elif body is None:
                    status = 400
                # Recorded before answering: whatever a sender saw accepted is already on file.
                collector._record(ReceivedRequest(self.path, dict(self.headers), body, status, time.time()))
                self._answer(status, headers)

            def _answer(self, status: int, headers: dict[str, str]) -> None:
                payload = b'{"success":true}' if 200 <= status < 300 else b'{"success":false}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

        return Handler
