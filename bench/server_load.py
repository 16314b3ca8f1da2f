"""Requests per second of the example server with telemetry on, and with the broker down,
each against the same server with telemetry off, at the same moments.

The machines this runs on are shared: a server's speed drifts by ±15 % within seconds,
alike for every process on the machine. Servers measured one after the other, even in
rotating rounds, then differ by as much as telemetry could cost (two identical servers
measured so came out 4-6 % apart). So the servers are measured in pairs: `disabled` and
one other configuration, loaded at the same time by two load generators, sharing one CPU
of their own (the load, Redis, the worker and the sink run on the other CPUs). The kernel
gives each of the two half of that CPU, and each one's requests per second is what its
requests cost it, measured under the same conditions; the ratio of the two is the figure
the targets read (median over rounds). Costs that come per second rather than per request
(the publisher's wake-ups) weigh double there, since each server serves half as many
requests as alone: the pairing errs against telemetry, never for it.

`disabled_control` (a second server with telemetry off) shows the method's own error in
each run, and `floor` (`bench/peer_server.py`: a deque and a thread that LPUSHes to Redis,
no checks, no Celery) what any background hand-off costs this server.

The load is wrk with bench/mix.lua (else bench/loadgen.py), one telemetry event per
request. After a run against a server that sends events through the worker, the bench
waits until Redis is empty and the sink quiet, so that no run pays for another's backlog.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.infra import REPO_ROOT, Child, Redis, cpu_seconds, free_port, last_json_line, wait_until
from bench.peer_server import FLOOR_QUEUE
from bench.sink import Sink
from bench.stats import median_of

CONNECTIONS = 16
BASELINE = "disabled"
# A second server with telemetry off: two identical servers should measure 1.00.
CONTROL = "disabled_control"
# Servers with another hand-off where our hooks are (bench/peer_server.py).
SEGMENT_CLIENT = "segment_client"
FLOOR = "floor"
# These send their events through the bench's worker: their rounds wait for the drain.
DRAINED = ("enabled", "enabled_default_batching", SEGMENT_CLIENT)


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


def start_server(name: str, env: dict[str, str], logs: Path, sink: Sink, redis: Redis) -> tuple[Child, int]:
    port = free_port()
    if name == SEGMENT_CLIENT:
        argv = [sys.executable, "-m", "bench.peer_server", "segment", str(port), sink.url]
    elif name == FLOOR:
        argv = [sys.executable, "-m", "bench.peer_server", "floor", str(port), redis.url]
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


def run_loads(servers: dict[str, tuple[Child, int]], seconds: float) -> dict[str, dict[str, Any]]:
    """Loads every given server at once, each from its own load process; per server its
    load report and its CPU time per request (all threads, from /proc)."""
    cpu_before = {name: cpu_seconds(server.pid) for name, (server, _) in servers.items()}
    loads = {}
    for name, (_, port) in servers.items():
        tool, argv = load_command(port, seconds)
        loads[name] = (tool, subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
    results = {}
    for name, (tool, process) in loads.items():
        stdout, stderr = process.communicate(timeout=seconds + 60)
        done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        result = last_json_line(done, tool)
        cpu = cpu_seconds(servers[name][0].pid) - cpu_before[name]
        results[name] = {"tool": tool, **result, "cpu_us_per_request": cpu * 1e6 / max(1, result["requests"])}
    return results


def wait_drained(redis: Redis, sink: Sink, timeout: float = 30) -> None:
    """Until the enabled server's events have left Redis and stopped arriving at the sink."""
    wait_until(lambda: redis.queue_length() == 0, timeout=timeout, interval=0.1)
    sink.wait_quiet(quiet=0.5, timeout=timeout)


def split_cpus() -> tuple[set[int], set[int]] | None:
    """(the servers' CPU, everybody else's), or None on a one-CPU machine."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[-1]}, set(cpus[:-1])


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` on `cpus` (Linux sets affinity per thread); a process or
    thread that has gone meanwhile is no error."""
    try:
        threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


def measure_server_rps(envs: dict[str, dict[str, str]], plan: LoadPlan, redis: Redis, sink: Sink,
                       logs: Path, others: list[int] = ()) -> dict[str, Any]:
    """`envs` names `disabled` and the configurations to compare with it; `others` are the
    pids of the bench's other processes (workers), kept off the servers' CPU."""
    names = [name for name in envs if name != BASELINE]
    servers: dict[str, tuple[Child, int]] = {}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    baseline_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    cpus = split_cpus()
    own_affinity = os.sched_getaffinity(0)
    try:
        if cpus is not None:
            # This process (the sink's threads; the load tools inherit it), Redis, workers.
            for pid in [os.getpid(), redis.server.process.pid, *others]:
                pin(pid, cpus[1])
        for name, env in envs.items():
            servers[name] = start_server(name, env, logs, sink, redis)
        for name, (server, port) in servers.items():
            wait_answering(name, server, port)
        # Imports, connections and caches warm; the broker_down server's buffer filled, so
        # that its runs measure an outage's steady state, where every new event is dropped.
        for name in servers:
            run_loads({name: servers[name]}, plan.warmup_seconds)
        if "broker_down" in servers:
            run_loads({"broker_down": servers["broker_down"]}, 3 * plan.warmup_seconds)
        wait_drained(redis, sink)
        sink.reset()
        for round_number in range(plan.rounds):
            offset = round_number % len(names)
            for name in names[offset:] + names[:offset]:
                pair = {BASELINE: servers[BASELINE], name: servers[name]}
                if cpus is not None:
                    for server, _ in pair.values():
                        pin(server.pid, cpus[0])  # threads started since (the publisher's) too
                results = run_loads(pair, plan.seconds)
                runs[name].append(results[name])
                baseline_runs[name].append(results[BASELINE])
                for server, _ in pair.values():
                    server.check_alive()
                if name in DRAINED:
                    wait_drained(redis, sink)
    finally:
        for server, _ in servers.values():
            server.stop()
        pin(os.getpid(), own_affinity)
        redis.client().delete(FLOOR_QUEUE)
    every_baseline = [run for name in names for run in baseline_runs[name]]
    summary = {name: median_of({key: run[key] for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")}
                               for run in results)
               for name, results in {BASELINE: every_baseline, **runs}.items()}
    return {
        "ratio_to_disabled": {name: round(statistics.median(run["rps"] / base["rps"]
                                                            for run, base in zip(runs[name], baseline_runs[name])), 3)
                              for name in names},
        "rps": {name: round(values["rps"], 1) for name, values in summary.items()},
        "cpu_us_per_request": {name: round(values["cpu_us_per_request"], 1) for name, values in summary.items()},
        "latency_ms": {name: {"p50": values["p50_ms"], "p99": values["p99_ms"]} for name, values in summary.items()},
        "shared_cpu": None if cpus is None else {"servers": sorted(cpus[0]), "others": sorted(cpus[1])},
        "runs": {name: [{"rps": round(run["rps"], 1), "disabled_rps": round(base["rps"], 1)}
                        for run, base in zip(runs[name], baseline_runs[name])] for name in names},
        "events_delivered": sink.count(),
        "load_tool": every_baseline[0]["tool"],
    }
