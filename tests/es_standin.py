"""A permissive Elasticsearch stand-in: just enough for the real Rubrix 0.18 server to start
and accept bulk logging (see the header of requirements/rubrix-0.18-server.txt)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, document: Any, status: int = 200) -> None:
        payload = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _route(self) -> None:
        body = self._body()
        path = self.path.split("?", 1)[0]
        if self.command == "HEAD":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/" and self.command == "GET":
            self._json({"version": {"number": "7.10.2", "distribution": "opensearch"}})
        elif path.endswith("/_mapping") and self.command == "GET":
            index = path.strip("/").split("/")[0]
            self._json({index: {"mappings": {"properties": {}}}})
        elif "_search" in path or path.endswith("/_count"):
            self._json({"took": 1, "timed_out": False, "count": 0,
                        "hits": {"total": 0, "max_score": None, "hits": []}, "aggregations": {}})
        elif path.endswith("/_bulk"):
            actions = [line for line in body.splitlines() if line.strip()][::2]
            self._json({"took": 1, "errors": False,
                        "items": [{"index": {"status": 201, "result": "created"}} for _ in actions]})
        elif self.command == "GET":
            self._json({"error": {"type": "index_not_found_exception"}, "status": 404}, status=404)
        else:
            self._json({"acknowledged": True})

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _route

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ElasticsearchStandIn:
    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
