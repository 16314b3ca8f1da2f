"""The Segment-compatible backend of the bench: accepts `POST /v1/batch`, notes arrivals.

Not the project's collector (telemetry_ops/collector.py): that one answers each request in two
TCP writes (headers, then body) without TCP_NODELAY, so Nagle's algorithm holds the body
until the client's delayed ACK, about 40 ms per request on Linux. Both pipelines would
then measure that wait instead of themselves; this sink answers in one write, with
TCP_NODELAY, keeps no request bodies, and notes for each message (arrival time, the
message's own "timestamp"), which the hook, or Segment's `track()`, stamps when it fires.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from telemetry_ops.collector import decoded_body

ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n"
          b'{"success":true}')


def epoch(timestamp: object) -> float | None:
    try:
        return datetime.fromisoformat(str(timestamp)).timestamp()
    except ValueError:
        return None


class Sink:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._arrivals: list[tuple[float, float | None]] = []
        self._message_ids: set[object] = set()
        # Per POST whose body parsed: (messages in its batch, repeats included; the earliest
        # "timestamp" among them), since the last reset.
        self._posts: list[tuple[int, float | None]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="bench-sink", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _note(self, body: Any) -> None:
        arrived = time.time()
        batch = body.get("batch") if isinstance(body, dict) else None
        messages = [message for message in batch if isinstance(message, dict)] if isinstance(batch, list) else []
        fired = [epoch(message.get("timestamp")) for message in messages]
        with self._lock:
            self._posts.append((len(messages), min((at for at in fired if at is not None), default=None)))
            for message, fired_at in zip(messages, fired):
                message_id = message.get("messageId")
                if message_id is not None and message_id not in self._message_ids:
                    self._message_ids.add(message_id)
                    self._arrivals.append((arrived, fired_at))
            self._lock.notify_all()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    sink._note(json.loads(decoded_body(body, self.headers.get("Content-Encoding"))))
                except ValueError:
                    pass
                self.wfile.write(ANSWER)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def reset(self) -> None:
        with self._lock:
            self._arrivals.clear()
            self._message_ids.clear()
            self._posts.clear()

    def posts(self, fired_since: float | None = None) -> tuple[int, int]:
        """(POSTs, messages in them) since the last reset; with `fired_since` (epoch seconds),
        only the POSTs all of whose messages were fired then or later (not a warm-up's)."""
        with self._lock:
            kept = [size for size, earliest in self._posts
                    if fired_since is None or (earliest is not None and earliest >= fired_since)]
        return len(kept), sum(kept)

    def count(self) -> int:
        with self._lock:
            return len(self._arrivals)

    def arrivals(self) -> list[tuple[float, float | None]]:
        with self._lock:
            return list(self._arrivals)

    def wait_for_count(self, count: int, timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: len(self._arrivals) >= count, timeout)

    def wait_quiet(self, quiet: float, timeout: float) -> None:
        """Returns once no message arrived for `quiet` seconds (or `timeout` passed)."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            current = self.count()
            if current == last:
                return
            last = current
            time.sleep(quiet)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
