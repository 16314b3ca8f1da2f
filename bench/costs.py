"""What the pipeline costs as a function of what waits, per broker (issue 22, item 5).

    python -m bench.costs [--quick] [--brokers embedded,redis,rabbitmq] [--out FILE]

Per broker (the embedded queue in a temporary data folder, a redis-server of the bench's own,
a vhost of its own on the RabbitMQ at 127.0.0.1:5672, deleted afterwards), with ONE-EVENT
task messages waiting (what a quiet server sends: it hands off every 0.2 s), filled by the
server's own sender (`CeleryBatchSender`, as the publisher sends, without its backlog check
so that filling is not itself O(n^2); `Broker.message_published` is told of each message):

1. the publisher's check before each publish (`backlog(publish_timeout, under=max_backlog)`,
   then `backlog_bytes(publish_timeout)` unless the bound is reached), with no worker: wall
   and CPU time (this process) per check, p50 and p99, with the default settings (500 events
   per task) and with RUBRIX_TELEMETRY_EVENTS_PER_TASK=1; on Redis also redis-server's CPU per
   check and the SLOWLOG entries of 10 ms or more during the checks;
2. broker bytes per waiting event: Redis's used_memory growth, the embedded queue's bytes on
   disk, RabbitMQ's message_bytes and queue memory (`rabbitmqctl list_queues`);
3. the drain: DRAIN one-event messages waiting, then one worker started with the documented
   command and no pool or concurrency flags (`celery -A tasks worker -Q telemetry -E`): time
   until every messageId reached the sink, POSTs made, events per POST; bounded in time;
4. a quiet server's latency: the real hooks (bench/producer.py) at a few events a
   second (4.7), a worker running on an empty queue: p50 and p99 from the hook to the sink;
5. Segment's own client (segment-analytics-python, upload_size 100) as the peer, on the same
   quiet load and sink: latency, events per POST, and its memory per queued event.

`--quick` is a smoke run (small backlogs, seconds per broker) written to the temporary folder.
docs/benchmarks.md ("Costs as a function of what waits") has the method and the figures.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from bench.backlog_check import sample_calls
from bench.infra import (REPO_ROOT, TELEMETRY_QUEUE, Child, Redis, closed_port, cpu_seconds, documented_worker,
                         telemetry_env, wait_for_banner, writable_out)
from bench.payload import WRITE_KEY, segment_client, segment_track
from bench.pipeline import TIMESTAMP_RESOLUTION, measure_latency, run_producer
from bench.sink import Sink
from bench.stats import p50_p99
from telemetry_core.settings import Settings, load_settings

DEFAULT_OUT = REPO_ROOT / "bench" / "costs.json"
QUICK_OUT = Path(tempfile.gettempdir()) / "rubrix-bench-costs-quick.json"
BROKERS = ("embedded", "redis", "rabbitmq")
SLOWLOG_THRESHOLD_US = 10_000  # issue 22: no command of telemetry holds Redis for 10 ms or more
PROBE_EVENTS = 20


@dataclass(frozen=True)
class Plan:
    levels: tuple[int, ...]  # waiting one-event messages at which the check and the bytes are measured
    drain: int  # one-event messages waiting when the drain's worker starts
    drain_timeout_s: float
    check_budget_s: float  # time spent timing checks, per level and settings (at least `least_checks`)
    most_checks: int
    least_checks: int
    # Events (requests) per second of the quiet server: not a divisor of the publisher's 5
    # wake-ups a second, or every event would meet the hand-off at the same phase (at 5/s
    # the latency is that phase, and drifts from run to run); at 4.7/s the phases cycle.
    quiet_rate: float
    quiet_seconds: float
    segment_queued: int  # events queued in Segment's client to weigh them


FULL = Plan(levels=(1_000, 10_000, 100_000), drain=20_000, drain_timeout_s=300, check_budget_s=8, most_checks=300,
            least_checks=5, quiet_rate=4.7, quiet_seconds=40, segment_queued=10_000)
QUICK = Plan(levels=(100, 1_000), drain=2_000, drain_timeout_s=90, check_budget_s=1, most_checks=50, least_checks=3,
             quiet_rate=4.7, quiet_seconds=2, segment_queued=2_000)


# -- the brokers under test ------------------------------------------------------------------
class BrokerUnderTest:
    """One broker, emptied between phases; what it holds, by its own accounts."""

    name = ""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    def broker_env(self) -> dict[str, str]:
        """RUBRIX_TELEMETRY_* settings that point at this broker."""
        return {}

    def empty(self) -> None:
        """A fresh, empty queue for the next phase (whatever a drain left)."""

    def held_bytes(self) -> dict[str, int]:
        """What the broker holds, in bytes, by each of its own measures."""
        return {}

    def before_checks(self) -> None:
        pass

    def after_checks(self, checks: int) -> dict[str, Any]:
        """Figures the broker itself reports for the checks just made."""
        return {}

    def version(self) -> str:
        return ""

    def close(self) -> None:
        pass


class EmbeddedUnderTest(BrokerUnderTest):
    name = "embedded"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self._phase = 0

    @property
    def data_dir(self) -> Path:
        return self.folder / f"data-{self._phase}"

    def empty(self) -> None:
        self._phase += 1  # a new data folder: a new queue, whatever layout it has

    def held_bytes(self) -> dict[str, int]:
        # The whole broker folder, whatever layout (files, a database) the queue uses.
        disk = apparent = 0
        for root, _, files in os.walk(self.data_dir / "broker"):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    stat = os.stat(os.path.join(root, name))
                    disk += stat.st_blocks * 512
                    apparent += stat.st_size
        return {"disk_bytes": disk, "file_bytes": apparent}


class RedisUnderTest(BrokerUnderTest):
    name = "redis"

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.redis = Redis(folder / "redis")
        self._cpu_before = 0.0

    def broker_env(self) -> dict[str, str]:
        return {"RUBRIX_TELEMETRY_BROKER_URL": self.redis.url}

    def empty(self) -> None:
        self.redis.client().flushall()

    def held_bytes(self) -> dict[str, int]:
        return {"used_memory": int(self.redis.client().info("memory")["used_memory"])}

    def before_checks(self) -> None:
        client = self.redis.client()
        client.config_set("slowlog-log-slower-than", SLOWLOG_THRESHOLD_US)
        client.config_set("slowlog-max-len", 1024)
        client.slowlog_reset()
        self._cpu_before = cpu_seconds(self.redis.server.process.pid)

    def after_checks(self, checks: int) -> dict[str, Any]:
        cpu = cpu_seconds(self.redis.server.process.pid) - self._cpu_before
        client = self.redis.client()
        slow = client.slowlog_get(1024)
        return {"redis_cpu_ms_per_check": round(cpu * 1000 / checks, 3),
                "slowlog_10ms": int(client.slowlog_len()),
                "slowlog_max_ms": round(max((entry["duration"] for entry in slow), default=0) / 1000, 1)}

    def version(self) -> str:
        return f"Redis {self.redis.version}"

    def close(self) -> None:
        self.redis.stop()


class RabbitMQUnderTest(BrokerUnderTest):
    name = "rabbitmq"

    def __init__(self, folder: Path) -> None:
        from tests.rabbitmq import MachineVhost

        super().__init__(folder)
        self.vhost = MachineVhost(prefix="rubrix-telemetry-bench")

    def broker_env(self) -> dict[str, str]:
        return {"RUBRIX_TELEMETRY_BROKER_URL": self.vhost.url}

    def empty(self) -> None:
        from tests.rabbitmq import MachineVhost

        self.vhost.delete()
        self.vhost = MachineVhost(prefix="rubrix-telemetry-bench")

    def held_bytes(self) -> dict[str, int]:
        # The queue's own accounts: the bodies it holds, and its process's memory.
        lines = self.vhost._ctl("list_queues", "-p", self.vhost.name, "name", "message_bytes", "memory").splitlines()
        for line in lines:
            fields = line.split()
            if len(fields) == 3 and fields[0] == TELEMETRY_QUEUE:
                return {"message_bytes": int(fields[1]), "queue_memory": int(fields[2])}
        return {"message_bytes": 0, "queue_memory": 0}

    def version(self) -> str:
        return "RabbitMQ " + self.vhost._ctl("version").strip()

    def close(self) -> None:
        self.vhost.delete()


UNDER_TEST: dict[str, Callable[[Path], BrokerUnderTest]] = {
    "embedded": EmbeddedUnderTest, "redis": RedisUnderTest, "rabbitmq": RabbitMQUnderTest}


# -- the measurements ------------------------------------------------------------------------
def child_env(target: BrokerUnderTest, sink: Sink, **settings: str) -> dict[str, str]:
    """A worker's or server's environment on this broker, delivering to the sink."""
    return telemetry_env(target.data_dir, RUBRIX_ENABLE_TELEMETRY="1", RUBRIX_TELEMETRY_ENDPOINT=sink.url,
                         RUBRIX_TELEMETRY_KEY=WRITE_KEY, RUBRIX_TELEMETRY_EMBEDDED_WORKER="0",
                         **target.broker_env(), **settings)


def publish_one_event_messages(settings: Settings, count: int) -> float:
    """`count` one-event task messages, as a quiet server's publisher sends them (its sender,
    its message format, its messageIds), without the check before each; seconds taken."""
    from rubrix_hooks.publisher import CeleryBatchSender
    from telemetry_core import message
    from telemetry_core.brokers import broker_for
    from telemetry_core.contract import LOG_RECORDS_REQUESTED, checked_wire_event, new_message_id_prefix, timestamp_us
    from telemetry_core.platform_info import platform_info

    started = time.perf_counter()
    sender = CeleryBatchSender(settings)
    broker = broker_for(settings)
    prefix, platform_data = new_message_id_prefix(), platform_info()
    try:
        for sequence in range(count):
            event = checked_wire_event((LOG_RECORDS_REQUESTED, timestamp_us(), "TextClassification", 100), sequence)
            sender(message.encode(platform_data, prefix, [event]))
            broker.message_published(1)  # a running count, where the broker keeps one
    finally:
        sender.close()
    return time.perf_counter() - started


def publisher_check(broker: Any, settings: Settings) -> tuple[int | None, int | None]:
    """What the publisher asks before each publish (rubrix_hooks.publisher: _broker_has_room)."""
    events = broker.backlog(settings.publish_timeout, under=settings.max_backlog)
    if events is not None and events >= settings.max_backlog:
        return events, None
    return events, broker.backlog_bytes(settings.publish_timeout)


def measure_checks(target: BrokerUnderTest, settings: Settings, plan: Plan) -> dict[str, Any]:
    """The check timed; one that raises (a socket timeout on a slow count) is timed and counted
    as failed, as the publisher would meet it (it then publishes: rubrix_hooks.publisher)."""
    from telemetry_core.brokers import broker_for

    broker = broker_for(settings)
    errors: list[str] = []

    def check() -> tuple[int | None, int | None]:
        try:
            return publisher_check(broker, settings)
        except Exception as error:  # noqa: BLE001 (noted in the figures, never the end of the run)
            errors.append(f"{type(error).__name__}: {error}")
            return None, None

    seen_events, seen_bytes = check()  # connects once, as a server's publisher has
    target.before_checks()
    errors.clear()
    cpu, wall = sample_calls(check, plan.most_checks, plan.check_budget_s, plan.least_checks)
    cpu_spread, wall_spread = p50_p99(cpu), p50_p99(wall)
    return {"checks": len(wall), "wall_ms_p50": round(wall_spread["p50"] / 1000, 3),
            "wall_ms_p99": round(wall_spread["p99"] / 1000, 3), "cpu_ms_p50": round(cpu_spread["p50"] / 1000, 3),
            "cpu_ms_p99": round(cpu_spread["p99"] / 1000, 3), "failed": len(errors),
            "first_failure": errors[0] if errors else None, "backlog_seen": seen_events,
            "backlog_bytes_seen": seen_bytes, **target.after_checks(len(wall))}


def per_event(before: dict[str, int], after: dict[str, int], events: int) -> dict[str, float]:
    return {key: round((after[key] - before[key]) / events, 1) for key in after}


def measure_drain(target: BrokerUnderTest, count: int, plan: Plan, sink: Sink, logs: Path) -> dict[str, Any]:
    """`count` messages wait; one documented worker starts: how long until all reached the sink."""
    sink.reset()
    spawned = time.time()
    worker = documented_worker(child_env(target, sink), logs, f"{target.name}-drain-worker")
    try:
        deadline = time.monotonic() + plan.drain_timeout_s
        while not sink.wait_for_count(count, timeout=1.0) and time.monotonic() < deadline:
            worker.check_alive()
    finally:
        worker.stop()
    arrivals = [arrived for arrived, _ in sink.arrivals()]
    posts, posted = sink.posts()
    drained = len(arrivals) >= count
    return {"messages": count, "delivered": len(arrivals), "drained": drained, "timeout_s": plan.drain_timeout_s,
            "seconds_from_worker_start": round(max(arrivals) - spawned, 1) if drained else None,
            "seconds_first_to_last": round(max(arrivals) - min(arrivals), 1) if arrivals else None,
            "posts": posts, "events_per_post": round(posted / posts, 2) if posts else None}


def quiet_figures(latency: dict[str, Any], sink: Sink) -> dict[str, Any]:
    """Latency and events per POST of a quiet run (the warm-up's POSTs left out)."""
    posts, posted = sink.posts(fired_since=latency["started"] - TIMESTAMP_RESOLUTION)
    return {"p50_ms": latency["p50"], "p99_ms": latency["p99"], "events": latency["events"],
            "delivered": latency["delivered"], "rate_per_s": latency["rate_per_s"], "posts": posts,
            "events_per_post": round(posted / posts, 2) if posts else None}


def measure_quiet(target: BrokerUnderTest, plan: Plan, sink: Sink, logs: Path) -> dict[str, Any]:
    """A documented worker on an empty queue, the real hooks at a quiet rate."""
    server_env = child_env(target, sink)  # every setting at its default, as a quiet server runs
    worker = documented_worker(server_env, logs, f"{target.name}-quiet-worker")
    try:
        wait_for_banner(worker)
        probe = run_producer("ours", PROBE_EVENTS, 0, server_env, sink)
        if probe["delivered"] < PROBE_EVENTS:
            raise RuntimeError(f"{target.name}: the pipeline does not deliver ({probe['delivered']}/{PROBE_EVENTS})"
                               f"\n{worker.log()[-3000:]}")
        latency = measure_latency("ours", plan.quiet_rate, plan.quiet_seconds, server_env, sink)
        worker.check_alive()
    finally:
        worker.stop()
    return quiet_figures(latency, sink)


def segment_bytes_per_queued_event(count: int) -> float:
    """Python heap per event waiting in Segment's client (no consumer thread: they all wait)."""
    client = segment_client(f"http://127.0.0.1:{closed_port()}", thread=0, max_queue_size=count + 1)
    atexit.unregister(client.join)  # no consumer thread to join (thread=0 leaves it no list of them)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            segment_track(client)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    if client.queue.qsize() != count:
        raise RuntimeError(f"Segment's client queued {client.queue.qsize()} of {count} events")
    return round(grown / count, 1)


def measure_segment(plan: Plan, sink: Sink) -> dict[str, Any]:
    from segment.analytics.client import Client

    defaults = Client.DefaultConfig  # bench/producer.py's client keeps them: upload_size 100
    latency = measure_latency("segment", plan.quiet_rate, plan.quiet_seconds, {**os.environ}, sink)
    return {"upload_size": defaults.upload_size, "upload_interval_s": defaults.upload_interval,
            "quiet": quiet_figures(latency, sink),
            "bytes_per_queued_event": segment_bytes_per_queued_event(plan.segment_queued)}


def measure_broker(target: BrokerUnderTest, plan: Plan, sink: Sink, logs: Path,
                   log: Callable[[str], None]) -> dict[str, Any]:
    load_before = os.getloadavg()
    env = child_env(target, sink)
    result: dict[str, Any] = {"version": target.version(), "check": {}, "bytes_per_event": {}}
    fill_seconds, filled, waiting_now = 0.0, 0, 0

    def fill_to(waiting: int) -> None:
        nonlocal fill_seconds, filled, waiting_now
        settings = replace(load_settings(env), events_per_task=1)  # RUBRIX_TELEMETRY_EVENTS_PER_TASK=1
        fill_seconds += publish_one_event_messages(settings, waiting - waiting_now)
        filled += waiting - waiting_now
        waiting_now = waiting

    def measure_level(waiting: int, empty_bytes: dict[str, int]) -> None:
        log(f"{target.name}: {waiting:,} one-event messages wait: the check, the bytes ...")
        default = load_settings(env)
        result["check"][str(waiting)] = {
            "default_settings": measure_checks(target, default, plan),
            "events_per_task_1": measure_checks(target, replace(default, events_per_task=1), plan)}
        result["bytes_per_event"][str(waiting)] = per_event(empty_bytes, target.held_bytes(), waiting)

    # Below the drain's backlog: measured on the way to it, then drained.
    empty_bytes = target.held_bytes()
    for waiting in [level for level in plan.levels if level <= plan.drain]:
        fill_to(waiting)
        measure_level(waiting, empty_bytes)
    fill_to(plan.drain)
    log(f"{target.name}: {plan.drain:,} messages wait: drain by one documented worker (at most "
        f"{plan.drain_timeout_s:g} s) ...")
    result["drain"] = measure_drain(target, plan.drain, plan, sink, logs)
    target.empty()  # whatever the drain left
    env = child_env(target, sink)
    log(f"{target.name}: quiet server at {plan.quiet_rate:g} events/s for {plan.quiet_seconds:g} s ...")
    result["quiet"] = measure_quiet(target, plan, sink, logs)
    # Beyond it: filled from an empty queue.
    for waiting in [level for level in plan.levels if level > plan.drain]:
        target.empty()
        env = child_env(target, sink)
        waiting_now = 0
        empty_bytes = target.held_bytes()
        log(f"{target.name}: filling {waiting:,} one-event messages ...")
        fill_to(waiting)
        measure_level(waiting, empty_bytes)
    target.empty()
    result["fill_ms_per_message"] = round(fill_seconds * 1000 / filled, 3)
    result["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    return result


# -- the report ----------------------------------------------------------------------------------
def _check_cell(check: dict[str, Any]) -> str:
    failed = f", {check['failed']} of {check['checks']} failed" if check.get("failed") else ""
    return f"{check['wall_ms_p50']:g} / {check['wall_ms_p99']:g} ({check['cpu_ms_p50']:g}){failed}"


def table_rows(results: dict[str, Any]) -> list[tuple[str, list[str]]]:
    brokers = results["brokers"]
    names = list(brokers)
    segment = results["segment"]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cell: Callable[[dict[str, Any]], str], peer: str = "-") -> None:
        rows.append((label, [cell(brokers[name]) if "skipped" not in brokers[name] else "skipped"
                             for name in names] + [peer]))

    levels = results["plan"]["levels"]
    for settings, label in (("default_settings", "check, default settings"),
                            ("events_per_task_1", "check, EVENTS_PER_TASK=1")):
        for level in levels:
            row(f"{label}, {level:,} waiting: wall p50 / p99 ms (CPU p50 ms)",
                lambda b, level=level, s=settings: _check_cell(b["check"][str(level)][s]))
    for level in levels:
        row(f"backlog seen at {level:,} (default / EVENTS_PER_TASK=1)",
            lambda b, level=level: "{} / {}".format(b["check"][str(level)]["default_settings"]["backlog_seen"],
                                                    b["check"][str(level)]["events_per_task_1"]["backlog_seen"]))
    row("Redis SLOWLOG >= 10 ms during the checks, default settings (" + " / ".join(f"{lv:,}" for lv in levels) + ")",
        lambda b: " / ".join(str(b["check"][str(level)]["default_settings"].get("slowlog_10ms", "-"))
                             for level in levels))
    row("redis-server CPU ms per check, default settings (" + " / ".join(f"{lv:,}" for lv in levels) + ")",
        lambda b: " / ".join(str(b["check"][str(level)]["default_settings"].get("redis_cpu_ms_per_check", "-"))
                             for level in levels))
    for level in levels:
        row(f"broker bytes per waiting event at {level:,}",
            lambda b, level=level: ", ".join(f"{key} {value:g}" for key, value in b["bytes_per_event"][str(level)].items()),
            f"{segment['bytes_per_queued_event']:g} (Python heap, in the server)" if level == levels[-1] else "-")

    def drain_cell(b: dict[str, Any]) -> str:
        d = b["drain"]
        if d["drained"]:
            return f"{d['seconds_from_worker_start']:g} s"
        return f"not drained in {d['timeout_s']:g} s, {d['delivered']:,} delivered"

    row(f"drain {results['plan']['drain']:,} one-event messages, from the worker's start", drain_cell)
    row("drain: POSTs, events per POST", lambda b: f"{b['drain']['posts']:,}, {b['drain']['events_per_post']}")
    quiet = segment["quiet"]
    row(f"quiet server ({results['plan']['quiet_rate']:g} events/s): latency p50 / p99 ms",
        lambda b: f"{b['quiet']['p50_ms']:g} / {b['quiet']['p99_ms']:g}", f"{quiet['p50_ms']:g} / {quiet['p99_ms']:g}")
    row("quiet server: events per POST", lambda b: str(b["quiet"]["events_per_post"]), str(quiet["events_per_post"]))
    row("filling: ms per one-event message published", lambda b: f"{b['fill_ms_per_message']:g}")
    return rows


def format_table(results: dict[str, Any]) -> str:
    header = ["measure", *results["brokers"], f"Segment's client (upload_size {results['segment']['upload_size']})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in table_rows(results)]
    return "\n".join(lines)


def run(plan: Plan, brokers: list[str], workdir: Path, log: Callable[[str], None],
        save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every measurement; `save` gets the figures so far after each broker (a long run that
    fails later keeps them)."""
    started = time.monotonic()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"plan": asdict(plan), "quick": plan is QUICK, "brokers": {},
                               "load_average_start": [round(value, 2) for value in os.getloadavg()]}
    sink = Sink()
    try:
        for name in brokers:
            try:
                target = UNDER_TEST[name](workdir / name)
            except RuntimeError as error:  # no RabbitMQ answers here: say so, measure the rest
                log(f"{name} skipped: {error}")
                results["brokers"][name] = {"skipped": str(error)}
                continue
            try:
                results["brokers"][name] = measure_broker(target, plan, sink, logs, log)
            finally:
                target.close()
            save({**results, "partial": True})
        log(f"Segment's client at {plan.quiet_rate:g} events/s ...")
        results["segment"] = measure_segment(plan, sink)
    finally:
        sink.stop()
    results["machine"] = {"cores": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform(), "shared": "2 cores shared with other jobs: noisy"}
    results["load_average_end"] = [round(value, 2) for value in os.getloadavg()]
    results["duration_s"] = round(time.monotonic() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    from telemetry_ops.cli import OneLineParser

    parser = OneLineParser(prog="python -m bench.costs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small backlogs, same keys, rough numbers")
    parser.add_argument("--brokers", default=",".join(BROKERS), help=f"comma-separated, of {', '.join(BROKERS)}")
    parser.add_argument("--out", type=Path, help=f"JSON file (default: {DEFAULT_OUT.relative_to(REPO_ROOT)}, "
                                                 f"with --quick {QUICK_OUT})")
    args = parser.parse_args(argv)
    brokers = [name.strip() for name in args.brokers.split(",") if name.strip()]
    unknown = sorted(set(brokers) - set(BROKERS))
    if unknown or not brokers:
        parser.error(f"--brokers: unknown {', '.join(unknown) or 'none given'} (known: {', '.join(BROKERS)})")
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    if not writable_out(out, "python -m bench.costs"):
        return 1

    def log(line: str) -> None:
        print(f"bench.costs: {line}", file=sys.stderr, flush=True)

    command = " ".join(["python -m bench.costs", *(sys.argv[1:] if argv is None else argv)])

    def save(results: dict[str, Any]) -> None:
        out.write_text(json.dumps({"command": command, **results}, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="rubrix-bench-costs-") as workdir:
        try:
            results = run(QUICK if args.quick else FULL, brokers, Path(workdir), log, save)
        except RuntimeError as error:  # a child of bench.infra failed
            print(f"python -m bench.costs: {str(error).splitlines()[0]}", file=sys.stderr)
            return 1
    save(results)
    print(format_table(results))
    log(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
