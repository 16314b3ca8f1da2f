"""Helpers for the tests: a private redis-server, worker subprocesses, scripted backends."""

from __future__ import annotations

import os
import re
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


# Our runtime dependencies, for the environments the tests build: the project itself comes
# from PYTHONPATH, so a cached environment does not depend on where this checkout lives.
RUNTIME_DEPENDENCIES = ["celery[redis]>=5.7,<6", "requests>=2.28"]


def cached_venv(name: str, python: str, installs: list[list[str]], fingerprint: str = "") -> Path:
    """A virtual environment built once with `python` and each `pip install` argument list in
    turn, then reused (RUBRIX_TELEMETRY_TEST_CACHE, default ~/.cache/rubrix-telemetry-tests).
    `fingerprint` is whatever else should rebuild it when it changes (a requirements file's
    content). Returns its python."""
    import hashlib
    import json

    version = subprocess.run([python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True,
                             check=True).stdout
    key = hashlib.sha256((version + json.dumps(installs) + fingerprint).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("RUBRIX_TELEMETRY_TEST_CACHE", Path.home() / ".cache" / "rubrix-telemetry-tests"))
    venv = cache / f"{name}-{key}"
    venv_python = venv / "bin" / "python"
    if not (venv / "complete").exists():
        pip = [str(venv_python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        for step in [[python, "-m", "venv", "--clear", str(venv)], *(pip + args for args in installs)]:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{' '.join(step)} failed:\n{done.stderr[-3000:]}"
        (venv / "complete").touch()
    return venv_python


def pyenv_pythons() -> dict[tuple[int, int], str]:
    """pyenv's CPython interpreters on this machine, by (major, minor): the newest patch of each."""
    try:
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {}
    found: dict[tuple[int, int], tuple[tuple[int, ...], str]] = {}
    for folder in Path(root, "versions").glob("3.*"):
        parts = folder.name.split(".")
        python = folder / "bin" / "python3"
        if len(parts) == 3 and all(p.isdigit() for p in parts) and python.exists():
            number = tuple(int(p) for p in parts)
            if number[:2] not in found or found[number[:2]][0] < number:
                found[number[:2]] = (number, str(python))
    return {minor: python for minor, (_, python) in found.items()}


class RedisServer:
    """A redis-server of the test session's own, on a free port, that tests may stop and restart.

    `extra_args` go after ours on the command line, where the last of a setting wins (a TLS
    server: `--port 0 --tls-port P ...`, with `client_options` such as `ssl=True` for
    `client()`); `sentinel=True` runs it as a Sentinel (`redis-server <conf> --sentinel`),
    whose configuration file lives in `folder`.
    """

    def __init__(self, port: int, folder: Path, appendonly: bool = True, extra_args: Iterable[str] = (),
                 sentinel: bool = False, client_options: dict[str, Any] | None = None) -> None:
        self.port = port
        self.folder = folder
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.sentinel = sentinel
        self.client_options = client_options or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not installed: run .ci/run or `apt-get install redis-server`")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.sentinel:
            config = self.folder / "sentinel.conf"  # Sentinel rewrites it with what it learns
            config.touch()
            mode = [str(config), "--sentinel"]
        else:
            mode = ["--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always"]
        self.process = subprocess.Popen(
            [self.binary, *mode, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--logfile", str(self.folder / "redis.log"), *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if not wait_until(self.answers, timeout=10):
            raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.send_signal(sig)
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, **self.client_options)

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
    by name, and a test helper named like one would be run by every child.
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def status_json(**env: str | None) -> tuple[int, dict[str, Any], str]:
    """`rubrix-telemetry status --json` as an operator runs it, with `env` over the test
    environment (`child_environment`): (exit code, document, stderr)."""
    import json

    done = subprocess.run([sys.executable, "-m", "telemetry_ops.cli", "status", "--json"], cwd=REPO_ROOT,
                          env=child_environment(**env), capture_output=True, text=True, timeout=30)
    return done.returncode, json.loads(done.stdout), done.stderr


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Signals a child and waits for it; kills it if it has not exited after `timeout`."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def celery_workers_of(data_dir: Path) -> list[int]:
    """The Celery worker processes serving this data folder (the machine runs other tests' too)."""
    wanted = f"RUBRIX_TELEMETRY_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"celery" not in b" ".join(argv) or b"worker" not in argv:
                continue
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile
    return found


class WorkerProcess:
    """`celery -A tasks worker` as an operator runs it, in a child process; `command_prefix`
    runs it through a wrapper (`setpriv ...`, `sh -c 'umask 002 && exec "$@"' sh`)."""

    def __init__(self, env: dict[str, str], log_file: Path, queue: str = "telemetry",
                 extra_args: Iterable[str] = (), command_prefix: Iterable[str] = (),
                 pool_args: Iterable[str] = ("--pool", "solo")) -> None:
        self.log_file = log_file
        self._log = log_file.open("wb")
        self.process = subprocess.Popen(
            [*command_prefix, sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", queue, *pool_args,
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
        stop_process(self.process, sig, timeout)
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
        if interval:
            await asyncio.sleep(interval)
    return time.perf_counter() - started, slowest

count = int(sys.argv[1])
flush_timeout = float(sys.argv[2])
interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0  # seconds between events: a server firing for a while
watch = len(sys.argv) > 4 and sys.argv[4] == "watch"
elapsed, slowest = asyncio.run(fire(count))
if watch:
    # As a server runs: no flush; its stats every 0.25 s until nothing is pending, at most
    # flush_timeout seconds; `stats` then says what the publisher did on its own.
    deadline = time.monotonic() + flush_timeout
    while stats()["pending"] and time.monotonic() < deadline:
        print(json.dumps({"at": time.monotonic(), "stats": stats()}), flush=True)
        time.sleep(0.25)
    flushed = not stats()["pending"]
else:
    flushed = flush(flush_timeout) if flush_timeout >= 0 else None  # < 0: leave it to the exit flush
print(json.dumps({"at": time.monotonic(), "elapsed": elapsed, "slowest": slowest, "flushed": flushed, "stats": stats(),
                  "threads": threading.active_count(), "celery_loaded": "celery" in sys.modules}))
"""


def hook_client_argv(count: int, flush_timeout: float, watch: bool = False, interval: float = 0.0) -> list[str]:
    """The command line of HOOK_CLIENT, `interval` seconds between two events; `watch`: it
    prints its stats as JSON lines while the publisher works on its own (no flush), its
    report last."""
    return [sys.executable, "-c", HOOK_CLIENT, str(count), str(flush_timeout), str(interval),
            *(["watch"] if watch else [])]


def run_hook_client(env: dict[str, str], count: int, flush_timeout: float = 5.0,
                    timeout: float = 60, interval: float = 0.0) -> tuple[dict[str, Any], float]:
    """Runs HOOK_CLIENT in a child process, `interval` seconds between two events: (its
    report, seconds until the process had exited)."""
    import json

    started = time.monotonic()
    done = subprocess.run(hook_client_argv(count, flush_timeout, interval=interval),
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["stderr"] = done.stderr
    return report, took


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


# -- fault and hostile-input tests (issue 6) ------------------------------------------------

# A test-only wrapper around the example server, written to a temporary folder that only the
# server children get on their PYTHONPATH (never the tests folder: see child_environment).
# It tags each response with the serving process id and answers GET /_stats with that
# process's hook counters; RT_FIRE_AT_IMPORT=1 fires an event at import, so that under
# `gunicorn --preload` the publisher thread exists in the master before it forks.
WRAPPED_APP_MODULE = "rt_fault_app"
_WRAPPED_APP_SOURCE = '''
import asyncio, json, os

import rubrix_hooks
from rubrix_hooks.example_app import app as example

if os.environ.get("RT_FIRE_AT_IMPORT") == "1":
    asyncio.run(rubrix_hooks.track_bulk("Text2Text", 0))
    rubrix_hooks.flush(10)  # a fork during the thread's first publish is another test's subject


async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/_stats":
        body = json.dumps({"pid": os.getpid(), **rubrix_hooks.stats()}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return

    async def tagged(message):
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), (b"x-served-by", str(os.getpid()).encode())]
            message = {**message, "headers": headers}
        await send(message)

    await example(scope, receive, tagged)
'''


def write_wrapped_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{WRAPPED_APP_MODULE}.py").write_text(_WRAPPED_APP_SOURCE)
    return folder


class ServerProcess:
    """A web server (uvicorn or gunicorn, any argv) in a child process, logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_file: Path, port: int,
                 cwd: Path | None = None) -> None:
        self.port = port
        self.log_file = log_file
        self._log = log_file.open("wb")
        self.process = subprocess.Popen(argv, cwd=cwd or REPO_ROOT, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        def answers() -> bool:
            if self.process.poll() is not None:
                return True
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        if not wait_until(answers, timeout, interval=0.1) or self.process.poll() is not None:
            raise RuntimeError(f"server not ready in {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> float:
        """Signals the server and waits for it to exit; returns the seconds it took."""
        started = time.monotonic()
        stop_process(self.process, sig, timeout)
        self._log.close()
        return time.monotonic() - started


def http_request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
                 body: bytes | None = None, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection: (status, lower-cased headers, body)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def raw_http_status(port: int, request: bytes, timeout: float = 10) -> int | None:
    """Sends bytes exactly as given; the response's status code, or None if the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(request)
        received = b""
        while b"\r\n" not in received:
            chunk = connection.recv(4096)
            if not chunk:
                return None
            received += chunk
    parts = received.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def unique_messages(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The messages de-duplicated by messageId, as the analytics backend does."""
    return {message["messageId"]: message for message in messages}


# The worker's log line for a retry: "... to retry in 1.2s (HTTP 503)".
RETRY_LINE = re.compile(r"to retry in (?P<countdown>[\d.]+)s \((?P<reason>[^)]*)\)")


def retries_logged(worker: WorkerProcess) -> list[tuple[float, str]]:
    """(countdown, reason) of every retry a worker process logged."""
    return [(float(m["countdown"]), m["reason"]) for m in RETRY_LINE.finditer(worker.log())]


def assert_each_delivered_once_after_dedup(events: list[dict[str, Any]], backend: Any) -> dict[str, int]:
    """Every event reached the backend, unchanged, and nothing else did (duplicates only
    with the same messageId); returns the figures."""
    accepted = backend.accepted_messages()
    unique = unique_messages(accepted)
    assert set(unique) == {event["messageId"] for event in events}
    for event in events:
        assert unique[event["messageId"]]["properties"] == event["properties"]
    return {"sent": len(events), "accepted": len(accepted), "unique": len(unique),
            "duplicates": len(accepted) - len(unique)}


def publish_events(count: int, queue: str, broker_url: str | None = None, embedded_data_dir: Path | None = None,
                   events_per_task: int | None = None, queue_type: str = "classic") -> list[dict[str, Any]]:
    """`count` valid LogRecordsRequested events put on `queue` by the server's own publisher
    (settings.events_per_task per task message), on the embedded queue in `embedded_data_dir`
    when given; returns them as a worker reads them back."""
    from dataclasses import replace

    from telemetry_core import message
    from telemetry_core.contract import LOG_RECORDS_REQUESTED, timestamp_us
    from rubrix_hooks.publisher import CeleryBatchSender, Publisher
    from telemetry_core.settings import load_settings

    settings = load_settings()
    settings = replace(settings, queue=queue, broker_url=broker_url or settings.broker_url,
                       buffer_size=max(count, settings.buffer_size),
                       events_per_task=events_per_task or settings.events_per_task, queue_type=queue_type)
    if embedded_data_dir is not None:
        settings = replace(settings, broker_url=None, data_dir=embedded_data_dir)
    sent: list[dict[str, Any]] = []
    sender = CeleryBatchSender(settings)

    def send(kwargs: dict[str, Any]) -> None:
        sender(kwargs)
        sent.extend(message.read([], kwargs).events)

    publisher = Publisher(settings, make_sender=lambda: send)
    try:
        for n in range(count):
            publisher.submit((LOG_RECORDS_REQUESTED, timestamp_us(), "TextClassification", n))
        assert publisher.flush(10), "the events did not reach the broker"
    finally:
        publisher.close(1)
        sender.close()
    return sent


class Children:
    """Worker and server processes a test starts; all stopped when it ends (the `children` fixture)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[WorkerProcess | ServerProcess] = []

    def worker(self, queue: str, endpoint: str, broker_url: str | None = None, ready: bool = True,
               embedded_data_dir: Path | None = None, extra_args: Iterable[str] = (),
               env: dict[str, str] | None = None, pool_args: Iterable[str] = ("--pool", "solo"),
               **settings: str) -> WorkerProcess:
        """`celery -A tasks worker -Q queue` delivering to `endpoint`; settings: BACKOFF_MAX="2", ...;
        on the embedded queue in `embedded_data_dir` when given; `env`: other variables; `pool_args`
        () for the app's default pool (the documented command)."""
        broker: dict[str, str | None] = {"RUBRIX_TELEMETRY_BROKER_URL": broker_url} if broker_url else {}
        if embedded_data_dir is not None:
            broker = {"RUBRIX_TELEMETRY_BROKER_URL": None, "RUBRIX_TELEMETRY_DATA_DIR": str(embedded_data_dir)}
        env = child_environment(
            RUBRIX_TELEMETRY_QUEUE=queue, RUBRIX_TELEMETRY_ENDPOINT=endpoint, **broker, **(env or {}),
            **{f"RUBRIX_TELEMETRY_{name.upper()}": value for name, value in settings.items()})
        worker = WorkerProcess(env, self.folder / f"worker-{len(self.started)}.log", queue=queue,
                               extra_args=extra_args, pool_args=pool_args)
        self.started.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    def server(self, argv: list[str], port: int, env: dict[str, str]) -> ServerProcess:
        app_folder = write_wrapped_app(self.folder / "app")
        # The checkout too, as for every other child (they run in it): else this one would
        # import the project from wherever it is installed.
        env = {**env, "PYTHONPATH": os.pathsep.join([str(app_folder), str(REPO_ROOT)])}
        server = ServerProcess(argv, env, self.folder / f"server-{len(self.started)}.log", port, cwd=app_folder)
        self.started.append(server)
        server.wait_ready()
        return server

    def stop_all(self) -> None:
        for child in reversed(self.started):
            child.stop(signal.SIGKILL if isinstance(child, WorkerProcess) else signal.SIGTERM)


def children_fixture(folder: Path):
    """Body of a `children` fixture: `yield from children_fixture(tmp_path)`."""
    group = Children(folder)
    try:
        yield group
    finally:
        group.stop_all()
