"""The parts every measurement runs against: a private redis-server, a Segment-compatible
sink that notes when each message arrives, Celery workers and servers in child processes.

Every wait here is bounded in time; every child is stopped by its own pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from tests.support import RedisServer, free_port, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
TELEMETRY_QUEUE = "telemetry"


def closed_port() -> int:
    """A loopback port nothing listens on: connecting to it is refused at once."""
    return free_port()


def telemetry_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """This process's environment without any telemetry setting of its own, plus `settings`.

    The parent (a test session, a developer's shell) may carry RUBRIX_* variables; a child
    of the bench must see exactly the configuration it is measuring. Celery imports its
    plugins by name, so no extra folder is put on the children's PYTHONPATH.
    """
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("RUBRIX_") and name not in ("DO_NOT_TRACK", "PYTHONPATH")}
    env["RUBRIX_TELEMETRY_DATA_DIR"] = str(data_dir)
    env.update(settings)
    return env


def last_json_line(done: subprocess.CompletedProcess[str], what: str) -> dict[str, Any]:
    """The report a child printed as its last JSON line; raises with its output if it failed."""
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def _tree_kb(pid: int, file: str, field: str) -> int:
    """A memory field (kB) of /proc/<pid>/<file>, summed over the process and all its descendants."""
    total_kb = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            text = Path(f"/proc/{current}/{file}").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total_kb += next((int(line.split()[1]) for line in text.splitlines() if line.startswith(field)), 0)
        pending.extend(int(child) for child in children)
    return total_kb


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (a prefork parent and children)."""
    return _tree_kb(pid, "status", "VmRSS:") / 1024


def pss_mb(pid: int) -> float:
    """Proportional set size of a process and all its descendants (a prefork worker's main
    process and its pool), from /proc/<pid>/smaps_rollup: shared pages are split between the
    processes sharing them, so the sum is what the worker really costs the machine."""
    return _tree_kb(pid, "smaps_rollup", "Pss:") / 1024


def writable_out(out: Path, command: str) -> bool:
    """Whether the JSON output file can be written (checked before a long run); one line if not."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
    except OSError as error:
        print(f"{command}: cannot write --out {out}: {error.strerror}", file=sys.stderr)
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    """A child process with its output in a log file, stopped by its own pid."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(list(argv), cwd=REPO_ROOT, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 15) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log.close()


class Redis:
    """A redis-server of the bench's own (free port, temporary folder; no persistence unless
    `appendonly`): the test suite's, so that both start it the same way."""

    def __init__(self, folder: Path, appendonly: bool = False) -> None:
        self.server = RedisServer(port=free_port(), folder=folder, appendonly=appendonly)
        self.server.start()
        self.port = self.server.port
        self.url = self.server.url
        self.version = str(self.client().info("server")["redis_version"])

    def client(self):
        return self.server.client()

    def queue_length(self, queue: str = TELEMETRY_QUEUE) -> int:
        return int(self.client().llen(queue))

    def stop(self) -> None:
        self.server.stop()


WORKER_NICENESS = os.environ.get("BENCH_WORKER_NICENESS", "19")


def start_worker(env: dict[str, str], logs: Path, name: str = "worker") -> Child:
    """One worker process as an operator starts it: `celery -A tasks worker -Q telemetry`.

    --pool solo: one process, no pool; that is the "one worker process" of the issue.
    """
    # Run at the lowest CPU priority, as docs/benchmarks.md recommends for a worker that
    # shares a machine with the server: it then takes only the CPU the server leaves.
    worker = Child(name, ["nice", "-n", WORKER_NICENESS, sys.executable, "-m", "celery", "-A", "tasks", "worker",
                          "-Q", TELEMETRY_QUEUE,
                          "--pool", "solo", "--without-mingle", "--without-gossip", "-l", "WARNING",
                          "-n", f"bench-{os.getpid()}-{name}@%h"], env, logs)
    wait_for_banner(worker)
    return worker


def documented_worker(env: dict[str, str], logs: Path, name: str) -> Child:
    """A worker started with the README's command and no pool or concurrency flags
    (`celery -A tasks worker -Q telemetry -E`, at WARNING), not yet known to be ready."""
    return Child(name, [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", TELEMETRY_QUEUE, "-E",
                        "-l", "WARNING"], env, logs)


def wait_for_banner(worker: Child, timeout: float = 30) -> None:
    """Returns once a worker has printed its banner; raises with its log if it did not start."""
    # At WARNING (INFO would log two lines per task) there is no " ready." line: wait for
    # the banner, then the caller sends a probe event through the pipeline.
    if not wait_until(lambda: "[queues]" in worker.log() or worker.process.poll() is not None, timeout=timeout):
        worker.stop()
        raise RuntimeError(f"worker did not start:\n{worker.log()}")
    worker.check_alive()
