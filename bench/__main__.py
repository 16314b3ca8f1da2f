"""`python -m bench [--quick] [--out FILE]`: run every measurement, write results.json, print a table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.infra import REPO_ROOT, Redis, closed_port, last_json_line, rss_mb, start_worker, telemetry_env
from bench.sink import Sink
from bench.payload import WRITE_KEY
from bench.pipeline import measure_latency, measure_throughput, run_producer
from bench.report import check_targets, format_table
from bench.server_cpu import measure as measure_server_cpu
from bench.server_load import CONTROL, FLOOR, SEGMENT_CLIENT, LoadPlan, measure_server_rps

DEFAULT_OUT = REPO_ROOT / "bench" / "results.json"
# A quick run's numbers are rough: they never replace the full run's results.json.
QUICK_OUT = Path(tempfile.gettempdir()) / "rubrix-bench-quick.json"
HOOK_QUEUE = "bench-hooks"  # no worker consumes it: the hook phase must not wake the worker
# The rate at which `server_cpu` fires events, paced like requests.
SERVER_CPU_RATE = 5000


@dataclass
class Plan:
    hook_calls: int
    hook_repetitions: int
    load: LoadPlan
    e2e_events: int
    e2e_repetitions: int
    latency_rate: float
    latency_seconds: float
    cpu_rounds: int
    cpu_seconds: float


    # Full run only: also small task messages (20 events), and Segment's client in the server.
    compare_defaults: bool


FULL = Plan(hook_calls=5000, hook_repetitions=5, load=LoadPlan(rounds=6, seconds=3, warmup_seconds=2),
            e2e_events=10_000, e2e_repetitions=2, latency_rate=100, latency_seconds=8, cpu_rounds=5,
            cpu_seconds=4, compare_defaults=True)
QUICK = Plan(hook_calls=300, hook_repetitions=2, load=LoadPlan(rounds=1, seconds=1, warmup_seconds=1),
             e2e_events=300, e2e_repetitions=1, latency_rate=50, latency_seconds=1.5, cpu_rounds=1,
             cpu_seconds=0.5, compare_defaults=False)

# Settings of the pipeline that the bench sets beyond the broker, endpoint and key: none,
# every other setting keeps its default. The full run also measures small task messages
# (20 events, the default before this benchmark): each Celery task message costs the
# server ~2 ms of CPU to publish and the worker ~4 ms to take and deliver, whatever it
# carries (docs/benchmarks.md).
TUNED: dict[str, str] = {}
DEFAULT_BATCHING = {"RUBRIX_TELEMETRY_EVENTS_PER_TASK": "20"}


def machine(redis: Redis) -> str:
    return f"{os.cpu_count()} cores, Python {platform.python_version()}, Redis {redis.version}"


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def run_child_json(module: str, args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return last_json_line(done, module)


def run(plan: Plan, workdir: Path, log: Any) -> dict[str, Any]:
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_before = os.getloadavg()
    redis = Redis(workdir / "redis")
    sink = Sink()
    worker = None
    try:
        enabled = telemetry_env(workdir / "data", RUBRIX_ENABLE_TELEMETRY="1", RUBRIX_TELEMETRY_BROKER_URL=redis.url,
                                RUBRIX_TELEMETRY_ENDPOINT=sink.url, RUBRIX_TELEMETRY_KEY=WRITE_KEY, **TUNED)
        disabled = {**enabled, "RUBRIX_ENABLE_TELEMETRY": "0"}
        envs = {
            "disabled": disabled,
            "enabled": enabled,
            "broker_down": {**enabled, "RUBRIX_TELEMETRY_BROKER_URL": f"redis://127.0.0.1:{closed_port()}/0"},
            CONTROL: disabled,
            FLOOR: disabled,  # our hooks off; bench/peer_server.py puts the floor's in their place
        }
        pipelines = {"ours": enabled, "segment": enabled}
        if plan.compare_defaults:
            envs["enabled_default_batching"] = {**enabled, **DEFAULT_BATCHING}
            envs[SEGMENT_CLIENT] = enabled
            pipelines["ours_default_batching"] = {**enabled, **DEFAULT_BATCHING}

        log("hook_us: track_bulk vs Segment's Client.track() vs a direct apply_async ...")
        hooks = run_child_json("bench.hook_cost", [str(plan.hook_calls), str(plan.hook_repetitions), sink.url,
                                                   redis.url, HOOK_QUEUE],
                               {**enabled, "RUBRIX_TELEMETRY_QUEUE": HOOK_QUEUE}, timeout=300)
        redis.client().delete(HOOK_QUEUE)

        log(f"server_cpu_us_per_event: off / ours / Segment's client / the floor, {SERVER_CPU_RATE} events/s ...")
        cpu_env = {**enabled, "RUBRIX_TELEMETRY_QUEUE": HOOK_QUEUE}
        server_cpu = measure_server_cpu(plan.cpu_rounds, SERVER_CPU_RATE, plan.cpu_seconds, sink.url, redis.url,
                                        "bench-floor", lambda variant: envs["disabled"] if variant == "off" else cpu_env,
                                        str(REPO_ROOT))
        redis.client().delete(HOOK_QUEUE, "bench-floor")

        log("starting one worker process and sending a probe through the pipeline ...")
        worker = start_worker(enabled, logs)
        probe = run_producer("ours", 20, 0, enabled, sink)
        if probe["delivered"] < 20:
            raise RuntimeError(f"the pipeline does not deliver: {probe['delivered']}/20 probe events\n{worker.log()}")

        log("server_rps: example server on / broker down / floor, each paired with off on a shared CPU ...")
        server = measure_server_rps(envs, plan.load, redis, sink, logs, others=[worker.pid])

        log("e2e_events_per_s: ours (Redis + 1 worker) vs Segment's client, to the same sink ...")
        e2e = measure_throughput(pipelines, plan.e2e_events, plan.e2e_repetitions, sink)
        worker_rss = rss_mb(worker.pid)

        log("delivery_latency_ms: hook call to arrival at a steady rate ...")
        latency = measure_latency("ours", plan.latency_rate, plan.latency_seconds, enabled, sink)
        latency_segment = measure_latency("segment", plan.latency_rate, plan.latency_seconds, enabled, sink)
        worker.check_alive()
    finally:
        if worker is not None:
            worker.stop()
        sink.stop()
        redis.stop()

    results: dict[str, Any] = {
        "hook_us": {name: hooks[name] for name in ("ours", "segment", "apply_async")},
        "server_cpu_us_per_event": server_cpu["us_per_event"],
        "server_rps": {name: server["rps"][name] for name in ("disabled", "enabled", "broker_down")},
        "server_rps_ratio": server["ratio_to_disabled"],
        "e2e_events_per_s": {name: e2e["e2e_events_per_s"][name] for name in ("ours", "segment")},
        "delivery_latency_ms": {"p50": latency["p50"], "p99": latency["p99"]},
        "worker_rss_mb": round(worker_rss, 1),
        "machine": machine(redis),
    }
    results["targets"] = check_targets(results)
    results["details"] = {
        "quick": plan is QUICK,
        "plan": {key: getattr(plan, key) if key != "load" else vars(plan.load) for key in vars(plan)},
        "tuned_settings": TUNED,
        "default_batching": DEFAULT_BATCHING if plan.compare_defaults else None,
        "hook_us_segment_send_false": hooks["segment_send_false"],
        "server_cpu": {key: value for key, value in server_cpu.items() if key != "us_per_event"},
        "hook_calls_per_repetition": hooks["calls_per_repetition"],
        "hook_ours_stats": hooks["ours_stats"],
        "server_rps_all": server["rps"],
        "server_cpu_us_per_request": server["cpu_us_per_request"],
        "server_latency_ms": server["latency_ms"],
        "server_events_delivered": server["events_delivered"],
        "server_runs_rps": server["runs"],
        "server_shared_cpu": server["shared_cpu"],
        "load_tool": server["load_tool"],
        "e2e_events_per_s_all": e2e["e2e_events_per_s"],
        "e2e_runs": e2e["e2e_runs"],
        "delivery_latency": latency,
        "delivery_latency_segment_ms": latency_segment,
        "worker": "celery -A tasks worker -Q telemetry --pool solo (1 process)",
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "duration_s": round(time.monotonic() - started, 1),
    }
    return results


def write_atomically(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(path.name + ".tmp")
    draft.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    draft.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: seconds, same keys, rough numbers")
    parser.add_argument("--out", type=Path, help=f"results file (default: {DEFAULT_OUT.relative_to(REPO_ROOT)}, "
                                                 f"with --quick {QUICK_OUT})")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(f"bench: {line}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="rubrix-bench-") as workdir:
        results = run(QUICK if args.quick else FULL, Path(workdir), log)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    write_atomically(out, results)
    print(format_table(results))
    log(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
