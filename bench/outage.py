"""The backend outage (issue 18): what waits where, and what a worker holds, while the
backend answers 503; how the backlog drains once it is back.

    python -m bench.outage [--minutes 10] [--quick] [--rate 100] [--out FILE] [--logs DIR]

A server (bench/soak_server.py: the real hooks and publisher) fires `track_bulk` at a
steady rate into a Redis of the bench's own while the backend (the project's collector)
answers 503 for `--minutes`; one worker (`celery -A tasks worker --pool processes -c 2`: prefork)
delivers to it. Every 5 s the bench notes the backlog against RUBRIX_TELEMETRY_MAX_BACKLOG
(`broker_for(settings).backlog`), the drops by reason (`rubrix-telemetry status --json`),
the worker's PSS (main process and pool) and Redis's `used_memory`. Then the backend answers
200 again, the server stops, and the bench waits until everything the server published has
arrived: the time to drain, events per second, POSTs per event, events lost. `--quick`: a
20 s outage, for a smoke run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.infra import pss_mb, writable_out

SAMPLE_EVERY = 5.0
DRAIN_TIMEOUT = 900.0


def _status(env: dict[str, str]) -> dict[str, Any]:
    from bench.infra import REPO_ROOT

    done = subprocess.run([sys.executable, "-m", "telemetry_ops.cli", "status", "--json"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    try:
        return json.loads(done.stdout)
    except ValueError:
        return {}


def run_outage(minutes: float, rate: float, folder: Path, logs: Path) -> dict[str, Any]:
    from bench.infra import REPO_ROOT, Child, Redis, telemetry_env
    from telemetry_core.brokers import broker_for
    from telemetry_core.settings import load_settings
    from telemetry_ops.collector import Collector

    down = threading.Event()
    down.set()
    backend = Collector(responder=lambda path, body: (503, {}) if down.is_set() else (200, {})).start()
    redis = Redis(folder / "redis")
    env = telemetry_env(folder / "data", RUBRIX_ENABLE_TELEMETRY="1", RUBRIX_TELEMETRY_BROKER_URL=redis.url,
                        RUBRIX_TELEMETRY_ENDPOINT=backend.url, RUBRIX_TELEMETRY_EMBEDDED_WORKER="0")
    settings = load_settings(env)
    broker = broker_for(settings)
    outage_s = minutes * 60
    worker = Child("worker", [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", settings.queue,
                              "--pool", "processes", "-c", "2", "--without-mingle", "--without-gossip", "-l", "INFO",
                              "-n", f"bench-outage-{time.time_ns()}@%h"], env, logs)
    server: Child | None = None
    try:
        deadline = time.monotonic() + 60
        while " ready." not in worker.log() and time.monotonic() < deadline:
            worker.check_alive()
            time.sleep(0.2)
        time.sleep(2)
        idle_pss = pss_mb(worker.pid)
        server = Child("server", [sys.executable, "-m", "bench.soak_server", "0", f"{rate:g}", f"{outage_s:g}"],
                       env, logs)
        started = time.monotonic()
        samples: list[dict[str, Any]] = []
        while time.monotonic() - started < outage_s:
            status = _status(env)
            samples.append({
                "at_s": round(time.monotonic() - started, 1),
                "backlog": broker.backlog(5.0),
                "max_backlog": settings.max_backlog,
                "dropped": (status.get("counts") or {}).get("dropped", {}),
                "worker_pss_mb": round(pss_mb(worker.pid), 1),
                "redis_used_memory_mb": round(int(redis.client().info("memory")["used_memory"]) / 2**20, 2),
                "posts": backend.requests_received,
            })
            worker.check_alive()
            time.sleep(max(0.0, SAMPLE_EVERY - (time.monotonic() - started) % SAMPLE_EVERY))
        down.clear()
        back_at = time.monotonic()
        posts_before = backend.requests_received
        server.process.wait(timeout=120)
        report = json.loads([line for line in server.log().splitlines() if line.startswith("{")][-1])
        published = report["stats"]["published"]

        def unique() -> int:
            return len({m["messageId"] for m in backend.accepted_messages()})

        while unique() < published and time.monotonic() - back_at < DRAIN_TIMEOUT:
            backend.wait_for(lambda b: b.messages_accepted >= published, timeout=5)
        drained_s = time.monotonic() - back_at
        delivered = unique()
        status = _status(env)
        peak_pss = max([s["worker_pss_mb"] for s in samples] + [pss_mb(worker.pid)])
        return {
            "outage_minutes": minutes, "rate": rate,
            "fired": report["fired"], "published": published, "server_stats": report["stats"],
            "samples": samples,
            "worker_pss_idle_mb": round(idle_pss, 1), "worker_pss_peak_mb": round(peak_pss, 1),
            "redis_used_memory_peak_mb": max(s["redis_used_memory_mb"] for s in samples),
            "backlog_peak": max((s["backlog"] or 0) for s in samples), "max_backlog": settings.max_backlog,
            "posts_during_outage": posts_before,
            "drain_s": round(drained_s, 1),
            "drained_events_per_s": round(delivered / drained_s, 1) if drained_s else None,
            "posts_per_event_after": round((backend.requests_received - posts_before) / max(delivered, 1), 3),
            "delivered_unique": delivered,
            "lost": published - delivered - sum((status.get("counts") or {}).get("dropped", {}).values()),
            "dropped_by_worker": (status.get("counts") or {}).get("dropped", {}),
        }
    finally:
        if server is not None:
            server.stop()
        worker.stop()
        redis.stop()
        backend.stop()


def format_table(result: dict[str, Any]) -> str:
    rows = [(f"t={s['at_s']:>6} s", f"backlog {s['backlog']}/{s['max_backlog']}, worker PSS {s['worker_pss_mb']} MB, "
                                   f"Redis {s['redis_used_memory_mb']} MB, POSTs {s['posts']}, dropped {s['dropped']}")
            for s in result["samples"]]
    rows += [
        ("outage", f"{result['outage_minutes']:g} min, server at {result['rate']:g} events/s: fired {result['fired']}, "
                   f"published {result['published']}, server dropped {result['server_stats'].get('dropped')}"),
        ("worker PSS", f"idle {result['worker_pss_idle_mb']} MB, peak {result['worker_pss_peak_mb']} MB"),
        ("Redis used_memory peak", f"{result['redis_used_memory_peak_mb']} MB"),
        ("backlog peak", f"{result['backlog_peak']} (bound {result['max_backlog']})"),
        ("POSTs during the outage", str(result["posts_during_outage"])),
        ("drain", f"{result['drain_s']} s, {result['drained_events_per_s']} events/s, "
                  f"{result['posts_per_event_after']} POSTs per event"),
        ("lost", f"{result['lost']} (worker dropped {result['dropped_by_worker']})"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    from telemetry_ops.cli import OneLineParser

    parser = OneLineParser(prog="python -m bench.outage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the backend answers 503")
    parser.add_argument("--quick", action="store_true", help="a 20 s outage, for a smoke run")
    parser.add_argument("--rate", type=float, default=100.0, help="events per second the server fires")
    parser.add_argument("--logs", type=Path, help="keep the server's and worker's logs in this folder")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here "
                                                 "(default: rubrix-outage.json in the temp folder)")
    args = parser.parse_args(argv)
    minutes = 20 / 60 if args.quick else args.minutes
    if minutes <= 0 or args.rate <= 0:
        parser.error("--minutes and --rate must be positive")
    out = args.out or Path(tempfile.gettempdir()) / "rubrix-outage.json"
    if not writable_out(out, "python -m bench.outage"):
        return 1
    with tempfile.TemporaryDirectory(prefix="rubrix-outage-") as workdir:
        logs = args.logs or Path(workdir)
        logs.mkdir(parents=True, exist_ok=True)
        try:
            result = run_outage(minutes, args.rate, Path(workdir), logs)
        except RuntimeError as error:  # a child of bench.infra failed
            print(f"python -m bench.outage: {str(error).splitlines()[0]}", file=sys.stderr)
            return 1
    command = " ".join(["python -m bench.outage", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command, **result}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"figures: {out}")
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
