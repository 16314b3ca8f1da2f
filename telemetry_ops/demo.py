"""`rubrix-telemetry demo`: the whole pipeline on one machine, with nothing installed.

A local collector (standing in for Segment) and a server with the hooks: the real Rubrix
when it is installed and its Elasticsearch answers, otherwise the example app. As any
server on the embedded on-disk queue does, it starts the one Celery worker that delivers
(the worker alongside, `telemetry_core/brokers/alongside.py`): the demo shows what a user's
server does, with no worker of its own. It sends a few realistic requests, whose dataset
names and record texts must never leave, then prints the events exactly as the collector
received them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from rubrix_hooks.server import listen_problem
from telemetry_core.brokers.alongside import log_path as worker_log_path
from telemetry_core.brokers.alongside import worker_alongside_runs
from telemetry_core.settings import Settings, load_settings
from telemetry_ops.collector import Collector

log = logging.getLogger("rubrix-telemetry.demo")

API_KEY_HEADER = {"X-Rubrix-Api-Key": "rubrix.apikey"}
# What a user stores in Rubrix: none of it may appear in what the collector receives.
PRIVATE_DATASET = "customer-complaints-acme"
PRIVATE_TEXTS = ["Refund my order 4411 to IBAN DE89370400440532013000", "My email is jane.doe@example.com"]
INVALID_DATASET = "Private_HR_Reviews"


class DemoFailed(Exception):
    pass


class DemoStopped(DemoFailed):
    """SIGTERM or SIGHUP (`kill`, a closed terminal) arrived: raised in the main thread, so
    that the stack is stopped and the temporary folder removed, as after Ctrl-C."""


# The signals that end the demo as Ctrl-C does; without handlers they end it at once,
# leaving the worker and the server running and the temporary folder on disk.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _stop_by_signal(signum: int, _frame: object) -> None:
    for stop_signal in STOP_SIGNALS:  # a second signal must not cut the clean-up short
        signal.signal(stop_signal, signal.SIG_IGN)
    raise DemoStopped(f"stopped by {signal.Signals(signum).name}")


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _request(url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", "User-Agent": "rubrix-telemetry-demo/1.0",
        "Accept-Language": "en-GB", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _server_listens(port: int) -> bool:
    # A connection, not a request: any API request would fire an event of its own and the
    # demo would print one more than it sent. uvicorn listens once the app has started.
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _rubrix_available() -> bool:
    """The real Rubrix can serve only when it is installed and its Elasticsearch answers."""
    try:
        import rubrix  # noqa: F401
    except ImportError:
        return False
    elasticsearch = os.environ.get("RUBRIX_ELASTICSEARCH", "http://localhost:9200")
    try:
        with urllib.request.urlopen(elasticsearch, timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _check_rubrix_installed() -> None:
    """Before anything starts: else the server child fails with the hint of
    `rubrix-telemetry server` (`--example`), a flag the demo does not have."""
    from rubrix_hooks.rubrix_patch import RubrixNotInstalled, _rubrix_telemetry_module

    try:
        _rubrix_telemetry_module()
    except RubrixNotInstalled as error:
        raise DemoFailed(f"{error} (or pass --server example to run the example app)") from None


def send_requests(base: str) -> list[tuple[str, int]]:
    """A short, realistic session; (description, HTTP status) for each request."""
    bulk = f"{base}/api/datasets/{PRIVATE_DATASET}/TextClassification:bulk"
    records = [{"inputs": {"text": text}, "metadata": {"customer": "acme-corp"}} for text in PRIVATE_TEXTS]
    calls = [
        ("GET /api/me", lambda: _request(base + "/api/me", headers=API_KEY_HEADER)),
        ("GET /api/me without a valid key", lambda: _request(base + "/api/me", headers={"X-Rubrix-Api-Key": "nope"})),
        (f"POST {PRIVATE_DATASET} TextClassification:bulk ({len(records)} records)",
         lambda: _request(bulk, "POST", {"records": records}, API_KEY_HEADER)),
        (f"POST {INVALID_DATASET} (invalid name) :bulk",
         lambda: _request(f"{base}/api/datasets/{INVALID_DATASET}/TextClassification:bulk", "POST",
                          {"records": records}, API_KEY_HEADER)),
        ("GET /api/datasets/unknown-dataset", lambda: _request(base + "/api/datasets/unknown-dataset",
                                                               headers=API_KEY_HEADER)),
    ]
    return [(what, call()) for what, call in calls]


def run_demo(settings: Settings, server_kind: str = "auto", keep_running: bool = False,
             port: int = 6900, collector_port: int = 0, timeout: float = 60.0) -> int:
    previous = {stop_signal: signal.signal(stop_signal, _stop_by_signal) for stop_signal in STOP_SIGNALS}
    try:
        return _run_demo(settings, server_kind, keep_running, port, collector_port, timeout)
    except DemoStopped:
        if keep_running:  # the way to stop a demo left running, as Ctrl-C is
            return 0
        raise
    finally:
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)


def _run_demo(settings: Settings, server_kind: str, keep_running: bool, port: int, collector_port: int,
              timeout: float) -> int:
    use_rubrix = server_kind == "rubrix" or (server_kind == "auto" and _rubrix_available())
    if use_rubrix:
        _check_rubrix_installed()
    problem = listen_problem("127.0.0.1", port)
    if problem:
        raise DemoFailed(problem)

    # The folder outlives the stack: processes are stopped before their files go.
    with tempfile.TemporaryDirectory(prefix="rubrix-telemetry-demo-") as folder, ExitStack() as stack:
        workdir = Path(folder)
        out = workdir / "received.jsonl"
        collector = Collector(port=collector_port, out=out).start()
        stack.callback(collector.stop)
        log.info("collector (stands in for Segment) on %s, writing %s", collector.url, out)

        env = {**os.environ, "RUBRIX_TELEMETRY_DATA_DIR": str(workdir / "data"),
               "RUBRIX_TELEMETRY_ENDPOINT": collector.url, "RUBRIX_TELEMETRY_FLUSH_INTERVAL": "0.1",
               # The server starts the worker, as a user's does (whatever this shell turned off).
               "RUBRIX_TELEMETRY_EMBEDDED_WORKER": "1"}
        env.pop("RUBRIX_TELEMETRY_BROKER_URL", None)  # the embedded on-disk queue
        env.pop("PYTHONPATH", None)
        server_settings = load_settings(env)
        # Stopped after the server (the stack runs its callbacks last first): the worker stops
        # once no server is left, and its folder must outlive it.
        stack.callback(_wait_for_the_worker_to_stop, server_settings, timeout)
        server_args = ["server", "--port", str(port)] + ([] if use_rubrix else ["--example"])
        # In a session of its own: the terminal's signals (Ctrl-C, SIGHUP when it closes) reach
        # the demo alone, which stops the server; its worker stops with it (its own session too).
        server = subprocess.Popen([sys.executable, "-m", "telemetry_ops.cli", *server_args], env=env,
                                  start_new_session=True)
        stack.callback(_stop, server)
        log.info("%s server on http://127.0.0.1:%d, starting its worker on the queue in %s (its log: %s)",
                 "Rubrix" if use_rubrix else "example", port, workdir / "data", worker_log_path(server_settings))

        base = f"http://127.0.0.1:{port}"

        def server_ready() -> bool:
            if server.poll() is not None:
                raise DemoFailed(f"the server exited with code {server.returncode}")
            return _server_listens(port)

        _wait(server_ready, timeout, "the server")
        sent = send_requests(base)
        for what, status in sent:
            log.info("sent %-55s -> HTTP %d", what, status)

        if not settings.enabled:
            time.sleep(3)
            print(f"\nTelemetry is off ({settings.decided_by}): the collector received {len(collector.accepted_messages())} "
                  "messages.")
        else:
            # One event per request sent: the readiness check above fired none.
            _wait(lambda: len(collector.accepted_messages()) >= len(sent), timeout,
                  f"the events at the collector (the worker's log: {worker_log_path(server_settings)})")
            time.sleep(0.5)
            received = out.read_text(encoding="utf-8")
            print("\nThe collector received, exactly as sent:")
            print(received, end="")
            leaked = [s for s in [PRIVATE_DATASET, INVALID_DATASET, *PRIVATE_TEXTS, "acme-corp"] if s in received]
            print(f"\n{len(collector.accepted_messages())} events for the {len(sent)} requests sent; dataset names, "
                  f"record texts and metadata sent to the server found in them: {leaked or 'none'}")
        if keep_running:
            print(f"\nStill running: server {base}, collector {collector.url} "
                  f"(messages appended to {out}). Ctrl-C (or SIGTERM) stops everything.", flush=True)
            try:
                while server.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
    return 0


def _wait_for_the_worker_to_stop(settings: Settings, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while worker_alongside_runs(settings):
        if time.monotonic() > deadline:
            log.warning("the worker alongside the server is still running after %.0fs", timeout)
            return
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
