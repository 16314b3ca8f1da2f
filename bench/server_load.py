"""Requests per second of the example server with telemetry off, on, and on with the broker down.

Three uvicorn servers (`rubrix_hooks.example_app:app`, one process each) run side by side,
one per configuration; the load (wrk with bench/mix.lua, else bench/loadgen.py) comes
from a separate process and visits them in turn, the order rotating each round, so that
noise from the rest of the machine falls on all three alike. After a run against the
enabled server the bench waits until its events have drained through Redis and the
worker, so that no run pays for the previous one's backlog.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.infra import REPO_ROOT, Child, Redis, cpu_seconds, free_port, last_json_line, wait_until
from bench.sink import Sink
from bench.stats import median_of

CONNECTIONS = 16


@dataclass
class LoadPlan:
    rounds: int
    seconds: float
    warmup_seconds: float


def answers(port: int) -> bool:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/me",
                                     headers={"X-Rubrix-Api-Key": "rubrix.apikey"})
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


# The configuration whose server runs Segment's client instead of our hooks.
SEGMENT_CLIENT = "segment_client"


def start_server(name: str, env: dict[str, str], logs: Path, sink: Sink) -> tuple[Child, int]:
    port = free_port()
    if name == SEGMENT_CLIENT:
        argv = [sys.executable, "-m", "bench.segment_server", str(port), sink.url]
    else:
        argv = [sys.executable, "-m", "uvicorn", "rubrix_hooks.example_app:app", "--host", "127.0.0.1",
                "--port", str(port), "--no-access-log", "--log-level", "warning"]
    return Child(f"server-{name}", argv, env, logs), port


def wait_answering(name: str, server: Child, port: int) -> None:
    if not wait_until(lambda: answers(port) or server.process.poll() is not None, timeout=30):
        raise RuntimeError(f"server {name} did not answer:\n{server.log()}")
    server.check_alive()


def load_command(port: int, seconds: float) -> tuple[str, list[str]]:
    wrk = shutil.which("wrk")
    if wrk:
        return "wrk", [wrk, "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "-s",
                       str(REPO_ROOT / "bench" / "mix.lua"), f"http://127.0.0.1:{port}"]
    return "bench.loadgen", [sys.executable, "-m", "bench.loadgen", str(port), str(CONNECTIONS), str(seconds)]


def run_load(server: Child, port: int, seconds: float) -> dict[str, Any]:
    """One load run; also the server's CPU time per request, which noise from other
    processes on the machine barely moves (it shifts requests per second a lot)."""
    tool, argv = load_command(port, seconds)
    cpu_before = cpu_seconds(server.pid)
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=seconds + 60)
    cpu = cpu_seconds(server.pid) - cpu_before
    result = last_json_line(done, tool)
    return {"tool": tool, **result, "cpu_us_per_request": cpu * 1e6 / max(1, result["requests"])}


def wait_drained(redis: Redis, sink: Sink, timeout: float = 30) -> None:
    """Until the enabled server's events have left Redis and stopped arriving at the sink."""
    wait_until(lambda: redis.queue_length() == 0, timeout=timeout, interval=0.1)
    sink.wait_quiet(quiet=0.5, timeout=timeout)


def measure_server_rps(envs: dict[str, dict[str, str]], plan: LoadPlan, redis: Redis, sink: Sink,
                       logs: Path) -> dict[str, Any]:
    servers: dict[str, tuple[Child, int]] = {}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in envs}
    try:
        for name, env in envs.items():
            servers[name] = start_server(name, env, logs, sink)
        for name, (server, port) in servers.items():
            wait_answering(name, server, port)
        # The warm-up also fills the broker_down server's buffer: its runs then measure an
        # outage's steady state, where every new event is dropped.
        for name, (server, port) in servers.items():
            run_load(server, port, plan.warmup_seconds)
        wait_drained(redis, sink)
        sink.reset()
        names = list(servers)
        for round_number in range(plan.rounds):
            offset = round_number % len(names)
            for name in names[offset:] + names[:offset]:
                server, port = servers[name]
                runs[name].append(run_load(server, port, plan.seconds))
                server.check_alive()
                if name.startswith("enabled") or name == SEGMENT_CLIENT:
                    wait_drained(redis, sink)
                else:
                    time.sleep(0.5)
    finally:
        for server, _ in servers.values():
            server.stop()
    summary = {name: median_of({key: r[key] for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")}
                               for r in results)
               for name, results in runs.items()}
    return {
        "rps": {name: round(values["rps"], 1) for name, values in summary.items()},
        "latency_ms": {name: {"p50": values["p50_ms"], "p99": values["p99_ms"]}
                              for name, values in summary.items()},
        "cpu_us_per_request": {name: round(values["cpu_us_per_request"], 1)
                                      for name, values in summary.items()},
        "runs": runs,
        "events_delivered": sink.count(),
        "load_tool": next(iter(runs.values()))[0]["tool"],
    }
