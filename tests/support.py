"""Helpers for the tests: a private redis-server, worker subprocesses, scripted backends."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """The predicate's first truthy value, or the last falsy one once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class RedisServer:
    """A redis-server of the test session's own, on a free port, that tests may stop and restart."""

    def __init__(self, port: int, folder: Path, appendonly: bool = True) -> None:
        self.port = port
        self.folder = folder
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed: run .ci/run or `apt-get install redis-server`")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if not wait_until(self.answers, timeout=10):
            raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:
            return False


def scripted(statuses: Iterable[int | tuple[int, dict[str, str]]]) -> Callable[[str, Any], tuple[int, dict[str, str]]]:
    """A collector responder answering each status in turn, then 200 for ever."""
    answers = list(statuses)

    def respond(path: str, body: Any) -> tuple[int, dict[str, str]]:
        if not answers:
            return 200, {}
        answer = answers.pop(0)
        return answer if isinstance(answer, tuple) else (answer, {})

    return respond


def message_ids(messages: list[dict[str, Any]]) -> Counter[str]:
    return Counter(message["messageId"] for message in messages)


def child_environment(**overrides: str | None) -> dict[str, str]:
    """The test environment for a child process, with overrides (None removes a variable).

    The tests folder is kept off the children's PYTHONPATH: `celery` imports its plugins
    by name, and a test helper named like one would be run by every child (DESIGN.md).
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


class WorkerProcess:
    """`celery -A tasks worker` as an operator runs it, in a child process."""

    def __init__(self, env: dict[str, str], log_file: Path, queue: str = "telemetry",
                 extra_args: Iterable[str] = ()) -> None:
        self.log_file = log_file
        self._log = log_file.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", queue, "--pool", "solo",
             "--without-mingle", "--without-gossip", "-l", "INFO", "-n", f"test-{os.getpid()}-{id(self)}@%h",
             *extra_args],
            cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        if not wait_until(lambda: " ready." in self.log() or self.process.poll() is not None, timeout):
            raise RuntimeError(f"worker not ready in {timeout}s:\n{self.log()}")
        if self.process.poll() is not None:
            raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# A server-like child process: fires hooks, then prints what it observed as one JSON line.
HOOK_CLIENT = r"""
import asyncio, json, sys, threading, time
from rubrix_hooks import flush, stats, track_bulk, track_error, track_login

class Request:
    headers = {"user-agent": "hook-client/1.0", "accept-language": "en"}

class Error:
    code = "rubrix.api.errors::EntityNotFoundError"

async def fire(count):
    slowest = 0.0
    started = time.perf_counter()
    for i in range(count):
        t = time.perf_counter()
        if i % 3 == 0:
            await track_login(Request(), "rubrix")
        elif i % 3 == 1:
            await track_bulk("TextClassification", i)
        else:
            await track_error(Error(), Request())
        slowest = max(slowest, time.perf_counter() - t)
    return time.perf_counter() - started, slowest

count = int(sys.argv[1])
flush_timeout = float(sys.argv[2])
elapsed, slowest = asyncio.run(fire(count))
flushed = flush(flush_timeout)
print(json.dumps({"elapsed": elapsed, "slowest": slowest, "flushed": flushed, "stats": stats(),
                  "threads": threading.active_count(), "celery_loaded": "celery" in sys.modules}))
"""


def run_hook_client(env: dict[str, str], count: int, flush_timeout: float = 5.0,
                    timeout: float = 60) -> tuple[dict[str, Any], float]:
    """Runs HOOK_CLIENT in a child process: (its report, seconds until the process had exited)."""
    import json

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HOOK_CLIENT, str(count), str(flush_timeout)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), took


class SilentBroker:
    """A TCP port that accepts connections (the kernel completes the handshake) and never
    answers: the broker that hangs, rather than refuses. Counts the connections it got."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = False
        import threading

        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)
            except OSError:
                continue

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        for conn in self.accepted:
            conn.close()
        self.sock.close()
