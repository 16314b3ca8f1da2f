"""What the publisher's backlog check (RUBRIX_TELEMETRY_MAX_BACKLOG) costs a server, per broker.

    python -m bench.backlog_check [--checks N] [--out FILE]

Before each task message a server's publisher thread asks the broker how many events wait
(`Broker.backlog(timeout, under=bound)`). It runs beside the request threads, so what it
costs them is its CPU time (and the GIL it holds meanwhile). This measures one check's CPU
time in this process and its wall time, on each broker holding a backlog, and relates it to
a server: the checks per second at `make bench`'s load (the hand-off every 0.2 s, plus one
per full 500-event task at the requests per second given) against that server's CPU per
request. The paired rps runs of `make bench` are too noisy on 2 shared cores to resolve a
cost this size (their A/A pair spreads over several points); this is the direct figure.

Two more rows are where the check is not cheap: messages that are not full wait with no
worker, so no quick look proves room. On Redis, 100-event messages (a server at ~500 events/s
hands off every 0.2 s): the count then reads every waiting message's header in a Lua script,
which holds Redis for its whole run (the wall time). On the embedded queue, a quiet server's
one-event messages (RUBRIX_TELEMETRY_EMBEDDED_WORKER=0 and no worker started): the check
lists the queue's folder, so it grows with the files waiting. Such servers hand off at most
every 0.2 s: at most 5 checks a second.

Brokers: the embedded queue in a folder of its own, a redis-server of its own, and a vhost
of its own on the RabbitMQ at 127.0.0.1:5672 (skipped when none answers). Prints a table and
writes JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from bench.infra import REPO_ROOT, writable_out
from bench.stats import p50_p99
from telemetry_core.brokers import broker_for
from telemetry_core.settings import Settings, load_settings
from tests.support import RedisServer, free_port, publish_events

QUEUE = "backlog-check"
BOUND = 100_000  # RUBRIX_TELEMETRY_MAX_BACKLOG's default
EVENTS_PER_TASK = 500  # the default: a busy server's task messages are full
WAITING_EVENTS = 50_000  # half the bound waits: the cheap first look still proves room
QUIET_WAITING_MESSAGES = 10_000  # the embedded worst case's one-event messages (each publish checks: slow to fill)
PARTIAL_EVENTS_PER_TASK = 100  # Redis's slow case: messages a fifth full
PUBLISH_CHUNK_MESSAGES = 100  # task messages per flush of the filling publisher (each publish checks too)
# make bench's enabled server, for scale (docs/benchmarks.md): requests per second, and its CPU per request.
SERVER_RPS = 2100
SERVER_CPU_US_PER_REQUEST = 236.0
FLUSHES_PER_S = 5  # RUBRIX_TELEMETRY_FLUSH_INTERVAL 0.2 s


def sample_calls(call: Callable[[], Any], most: int, budget_s: float | None = None,
                 least: int = 1) -> tuple[list[float], list[float]]:
    """(CPU µs in this process, wall µs) of each call: `most` calls, or fewer once `budget_s`
    has passed (but at least `least`): a slow check is timed fewer times, never for minutes."""
    cpu: list[float] = []
    wall: list[float] = []
    started = time.perf_counter()
    while len(cpu) < most and (budget_s is None or len(cpu) < least or time.perf_counter() - started < budget_s):
        c, w = time.process_time(), time.perf_counter()
        call()
        cpu.append((time.process_time() - c) * 1e6)
        wall.append((time.perf_counter() - w) * 1e6)
    return cpu, wall


def timed(check: Callable[[], Any], checks: int) -> dict[str, float]:
    cpu, wall = sample_calls(check, checks)
    spread = p50_p99(wall)
    return {"cpu_us_mean": round(statistics.fmean(cpu), 1), "wall_us_p50": round(spread["p50"], 1),
            "wall_us_p99": round(spread["p99"], 1)}


def measure(name: str, settings: Settings, checks: int, waiting: int = WAITING_EVENTS,
            message_events: int = EVENTS_PER_TASK, busy: bool = True) -> dict[str, Any]:
    """`waiting` events in messages of `message_events`, then `checks` checks as a server with
    `settings` (RUBRIX_TELEMETRY_EVENTS_PER_TASK 500) makes them."""
    chunk = message_events * PUBLISH_CHUNK_MESSAGES
    for first in range(0, waiting, chunk):  # the server's own publisher, each chunk flushed
        publish_events(min(chunk, waiting - first), QUEUE, broker_url=settings.broker_url,
                       embedded_data_dir=settings.data_dir if settings.broker_url is None else None,
                       events_per_task=message_events)
    broker = broker_for(settings)
    backlog = broker.backlog(5, under=BOUND)
    figures = timed(lambda: broker.backlog(settings.publish_timeout, under=BOUND), checks)
    # A busy server checks before each hand-off and each full task; a quiet one at each hand-off.
    checks_per_s = FLUSHES_PER_S + (SERVER_RPS / EVENTS_PER_TASK if busy else 0)
    row = {"broker": name, "backlog_seen": backlog, **figures, "checks_per_s": checks_per_s,
           "core_pct": round(figures["cpu_us_mean"] * checks_per_s / 1e4, 3)}
    if busy:
        added_per_request = figures["cpu_us_mean"] * checks_per_s / SERVER_RPS
        row["cpu_us_per_request"] = round(added_per_request, 3)
        row["share_of_request_cpu_pct"] = round(100 * added_per_request / SERVER_CPU_US_PER_REQUEST, 3)
    return row


def base_settings(folder: Path, **changes: Any) -> Settings:
    settings = load_settings({"RUBRIX_ENABLE_TELEMETRY": "1", "RUBRIX_TELEMETRY_DATA_DIR": str(folder)})
    return replace(settings, queue=QUEUE, events_per_task=EVENTS_PER_TASK, **changes)


def main(argv: list[str] | None = None) -> int:
    from telemetry_ops.cli import OneLineParser

    parser = OneLineParser(prog="python -m bench.backlog_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=2000, help="checks timed per broker (default 2000)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "backlog_check.json")
    args = parser.parse_args(argv)
    if args.checks < 1:
        parser.error("--checks must be at least 1")
    if not writable_out(args.out, "python -m bench.backlog_check"):
        return 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as temp:
        folder = Path(temp)
        rows.append(measure("embedded", base_settings(folder / "embedded", broker_url=None), args.checks))
        rows.append(measure(f"embedded, {QUIET_WAITING_MESSAGES:,} one-event messages",
                            base_settings(folder / "quiet", broker_url=None), max(20, args.checks // 20),
                            waiting=QUIET_WAITING_MESSAGES, message_events=1, busy=False))
        redis = RedisServer(port=free_port(), folder=folder / "redis", appendonly=False)
        redis.start()
        try:
            rows.append(measure("redis", base_settings(folder / "data", broker_url=redis.url), args.checks))
            redis.client().flushall()
            rows.append(measure(f"redis, {PARTIAL_EVENTS_PER_TASK}-event messages",
                                base_settings(folder / "data", broker_url=redis.url), max(20, args.checks // 20),
                                message_events=PARTIAL_EVENTS_PER_TASK, busy=False))
        finally:
            redis.stop()
        try:
            from tests.rabbitmq import MachineVhost

            vhost = MachineVhost()
        except Exception as error:  # noqa: BLE001 (no RabbitMQ here: say so, measure the rest)
            print(f"bench: RabbitMQ skipped ({type(error).__name__}: {error})", file=sys.stderr)
        else:
            try:
                rows.append(measure("rabbitmq", base_settings(folder / "data", broker_url=vhost.url), args.checks))
            finally:
                vhost.delete()
    header = ("broker", "backlog seen (events)", "CPU µs/check", "wall p50 / p99 µs", "checks/s",
              "% of one core", "CPU µs/request (% of the request's)")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        per_request = (f"{row['cpu_us_per_request']} ({row['share_of_request_cpu_pct']} %)"
                       if "cpu_us_per_request" in row else "-")
        print(f"| {row['broker']} | {row['backlog_seen']} | {row['cpu_us_mean']} | {row['wall_us_p50']} / "
              f"{row['wall_us_p99']} | {row['checks_per_s']:.1f} | {row['core_pct']} | {per_request} |")
    args.out.write_text(json.dumps({"bound": BOUND, "waiting_events": WAITING_EVENTS, "server_rps": SERVER_RPS,
                                    "server_cpu_us_per_request": SERVER_CPU_US_PER_REQUEST, "rows": rows}, indent=2))
    print(f"bench: written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
