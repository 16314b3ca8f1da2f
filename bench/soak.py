"""The scale-out soak (issue 10): 2 servers, 3 workers, a worker SIGKILLed midway; nothing lost.

    python -m bench.soak --broker redis|rabbitmq|embedded [--rate 10000] [--seconds 60] [--out FILE] [--logs DIR]

Two server processes (bench/soak_server.py) fire `track_bulk` through the real hooks and
publisher, each at rate/2 events per second, every event told apart by its `records`
value. Three workers (`celery -A tasks worker -Q telemetry --pool solo`, as an operator
starts them) deliver to the bench's sink. Midway the sink holds its answers until every
worker has a POST in flight, one worker is SIGKILLed right then (its message is neither
delivered for sure nor acknowledged) and a new one is started. After the servers stop,
the soak waits (bounded) until every fired event has reached the sink, then counts:
fired, delivered once or more, lost, duplicates (the same event arriving again, which the
backend removes only if it carries the same messageId), and the delay from hook to sink.

Brokers: a private redis-server (append-only, fsync always), whose visibility timeout
(20 s here) brings the killed worker's message back within the soak; or the machine's
RabbitMQ at 127.0.0.1:5672 in a vhost of the soak's own, deleted at the end whatever
happens, which redelivers as soon as the killed worker's connection drops; or the embedded
queue (the default broker) in the soak's own data folder, shared by servers and workers,
where a running worker puts the killed worker's message back within its 5 s sweep.

The machine's cores are shared: the report gives the rate the servers really sustained
(events fired / seconds it took them), not the one asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Iterator

from bench.infra import Child, Redis, cpu_seconds, last_json_line, start_worker, telemetry_env, writable_out
from bench.payload import WRITE_KEY
from bench.sink import ANSWER, Sink
from bench.soak_server import RECORDS_STRIDE, event_of
from bench.stats import p50_p99
from telemetry_ops.cli import OneLineParser
from telemetry_ops.collector import decoded_body

RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672
# The longest a POST is held while the soak waits for every worker to have one in flight:
# well below the workers' HTTP timeout (10 s), so the hold itself causes no retry.
HOLD_TIMEOUT = 5.0


class SoakError(Exception):
    """The soak could not run (a broker missing, a child that died): one line for the user."""


@dataclass
class Plan:
    rate: float = 10_000
    seconds: float = 60
    servers: int = 2
    workers: int = 3
    # Redis: a message held by a dead worker comes back after this many seconds. The
    # workers' retry waits stay below it (settings refuse otherwise).
    visibility_timeout: float = 20
    # After the servers have stopped: the longest wait for the last events to arrive.
    drain_timeout: float = 120

    def settings(self) -> dict[str, str]:
        backoff_max = self.visibility_timeout / 2
        return {"RUBRIX_TELEMETRY_VISIBILITY_TIMEOUT": f"{self.visibility_timeout:g}",
                "RUBRIX_TELEMETRY_BACKOFF_MAX": f"{backoff_max:g}",
                "RUBRIX_TELEMETRY_BACKOFF_BASE": f"{min(1.0, backoff_max):g}"}


class SoakSink(Sink):
    """The bench's sink, noting also which event each message is (its `records` value) and
    every repeated arrival. It can hold its answers, to catch the workers mid-delivery; a
    held POST whose sender has gone meanwhile is discarded, like a backend that
    keeps only what it answered: the killed worker's events then arrive only if the
    broker gives its message to another worker."""

    def __init__(self) -> None:
        self.first_message_id: dict[int, str] = {}  # records -> the messageId it first came with
        self.same_id_duplicates = 0  # the backend de-duplicates these
        self.other_id_duplicates = 0  # an event sent twice under two ids: counted twice by the backend
        self.unidentified = 0
        self.duplicated: list[tuple[int, float]] = []  # (records, arrival) of each repeat
        self.discarded_posts = 0
        self.discarded_events = 0
        self._answering = threading.Event()
        self._answering.set()
        self._in_flight = 0
        self._flight = threading.Condition()
        super().__init__()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        sink = self
        answering = super()._handler_class()

        class HoldingHandler(answering):  # type: ignore[misc,valid-type]
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                with sink._flight:
                    sink._in_flight += 1
                    sink._flight.notify_all()
                try:
                    raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    try:
                        body = decoded_body(raw, self.headers.get("Content-Encoding"))
                    except ValueError:
                        body = b""
                    sink._answering.wait(HOLD_TIMEOUT * 2)  # bounded, whatever happens to the soak
                    if sender_gone(self.connection):
                        with sink._lock:
                            sink.discarded_posts += 1
                            sink.discarded_events += count_events(body)
                        self.close_connection = True
                        return
                    try:
                        sink._note(json.loads(body))
                    except ValueError:
                        pass
                    self.wfile.write(ANSWER)
                finally:
                    with sink._flight:
                        sink._in_flight -= 1

        return HoldingHandler

    def _note(self, body: Any) -> None:
        super()._note(body)
        self._identify(body)

    def _identify(self, body: Any) -> None:
        batch = body.get("batch") if isinstance(body, dict) else None
        with self._lock:
            for message in batch if isinstance(batch, list) else []:
                try:
                    records, message_id = message["properties"]["records"], message["messageId"]
                except (KeyError, TypeError):
                    self.unidentified += 1
                    continue
                first = self.first_message_id.setdefault(records, message_id)
                if first is not message_id:
                    if first == message_id:
                        self.same_id_duplicates += 1
                        self.duplicated.append((records, time.time()))
                    else:
                        self.other_id_duplicates += 1

    def hold(self, in_flight: int, timeout: float) -> int:
        """Stops answering until `in_flight` POSTs wait (or `timeout`); how many do."""
        self._answering.clear()
        with self._flight:
            self._flight.wait_for(lambda: self._in_flight >= in_flight, timeout)
            return self._in_flight

    def release(self) -> None:
        self._answering.set()


def count_events(body: bytes) -> int:
    try:
        batch = json.loads(body).get("batch")
    except (ValueError, AttributeError):
        return 0
    return len(batch) if isinstance(batch, list) else 0


def sender_gone(connection: socket.socket) -> bool:
    """Whether the peer has closed (or reset) this connection, once its request is read: a
    sender that is alive sends nothing more before our answer; a dead one's kernel has
    sent FIN (an empty read) or RST."""
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


# -- brokers ---------------------------------------------------------------------------------

@contextlib.contextmanager
def redis_broker(folder: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """A private redis-server, append-only as in production: (its URL, what it is)."""
    redis = Redis(folder / "redis", appendonly=True)
    try:
        yield redis.url, {"broker": "redis", "version": redis.version, "pid": redis.server.process.pid}
    finally:
        redis.stop()


def rabbitmqctl(*args: str) -> str:
    if shutil.which("rabbitmqctl") is None:
        raise SoakError("rabbitmqctl is not installed: the RabbitMQ soak needs the machine's RabbitMQ")
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise SoakError(f"rabbitmqctl {' '.join(args)} failed: {last[-1] if last else done.returncode}")
    return done.stdout.strip()


@contextlib.contextmanager
def rabbitmq_vhost(prefix: str = "rubrix-soak") -> Iterator[str]:
    """A vhost of our own on the machine's RabbitMQ, guest allowed in, deleted at the end
    even on failure: yields its `amqp://` URL. The rest of the node is left alone."""
    with socket.socket() as probe:
        probe.settimeout(3)
        if probe.connect_ex((RABBITMQ_HOST, RABBITMQ_PORT)) != 0:
            raise SoakError(f"RabbitMQ does not answer on {RABBITMQ_HOST}:{RABBITMQ_PORT}")
    vhost = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


@contextlib.contextmanager
def rabbitmq_broker(_folder: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with rabbitmq_vhost() as url:
        version = rabbitmqctl("version")
        yield url, {"broker": "rabbitmq", "version": version, "pid": None}


@contextlib.contextmanager
def embedded_broker(folder: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The embedded queue (the default broker) in the soak's data folder, which `run_soak`
    gives servers and workers alike: nothing to start."""
    import kombu

    yield "embedded://", {"broker": "embedded", "version": f"queue (kombu {kombu.__version__})", "pid": None}


BROKERS = {"redis": redis_broker, "rabbitmq": rabbitmq_broker, "embedded": embedded_broker}


# -- the soak --------------------------------------------------------------------------------

def _finished_report(child: Child, timeout: float) -> dict[str, Any]:
    try:
        child.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.stop()
        raise SoakError(f"{child.name} did not finish within {timeout:.0f} s") from None
    done = subprocess.CompletedProcess(child.process.args, child.process.returncode, child.log(), "")
    try:
        return last_json_line(done, child.name)
    except RuntimeError as error:
        raise SoakError(str(error).splitlines()[0] + f" (log: {child.log_path})") from None


def run_soak(broker_url: str, plan: Plan, folder: Path, broker_pid: int | None = None,
             logs: Path | None = None) -> dict[str, Any]:
    """Runs the soak against the broker at `broker_url`; returns its figures (see `summarize`).
    The children's logs go to `logs` (default: `folder`/logs)."""
    logs = logs or folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sink = SoakSink()
    env = telemetry_env(folder / "data", RUBRIX_TELEMETRY_BROKER_URL=broker_url,
                        RUBRIX_TELEMETRY_ENDPOINT=sink.url, RUBRIX_TELEMETRY_KEY=WRITE_KEY,
                        # The soak's own three workers, and no fourth alongside its servers.
                        RUBRIX_TELEMETRY_EMBEDDED_WORKER="0", **plan.settings())
    workers: list[dict[str, Any]] = []  # {"child", "started", "cpu_s", "killed"}
    servers: list[Child] = []
    broker_cpu_before = cpu_seconds(broker_pid) if broker_pid else None

    def add_worker() -> None:
        child = start_worker(env, logs, name=f"worker-{len(workers)}")
        workers.append({"child": child, "started": time.monotonic(), "cpu_s": None, "killed": False})

    def retire(worker: dict[str, Any], sig: int) -> None:
        child: Child = worker["child"]
        if child.process.poll() is None:
            worker["cpu_s"] = cpu_seconds(child.pid)
            worker["seconds"] = time.monotonic() - worker["started"]
        if sig == signal.SIGKILL:
            child.process.send_signal(signal.SIGKILL)
            child.process.wait(timeout=10)
            worker["killed"] = True
        child.stop()

    try:
        for _ in range(plan.workers):
            add_worker()
        per_server = plan.rate / plan.servers
        began = time.monotonic()
        for index in range(plan.servers):
            servers.append(Child(f"server-{index}", [sys.executable, "-m", "bench.soak_server", str(index),
                                                     str(per_server), str(plan.seconds)], env, logs))

        # Midway: catch every worker with a POST in flight, kill one of them right then.
        kill_at = began + plan.seconds / 2
        while time.monotonic() < kill_at:
            for child in [worker["child"] for worker in workers]:
                child.check_alive()
            for child in servers:
                if child.process.poll():  # a server that ended early with 0 is reported later
                    child.check_alive()
            time.sleep(min(0.5, max(0.0, kill_at - time.monotonic())))
        held_at = time.monotonic()
        in_flight = sink.hold(plan.workers, HOLD_TIMEOUT)
        killed_at = time.time()
        retire(workers[0], signal.SIGKILL)
        sink.release()
        kill = {"at_s": round(time.monotonic() - began, 1), "posts_in_flight": in_flight,
                "answers_held_s": round(time.monotonic() - held_at, 2)}
        add_worker()

        reports = [_finished_report(server, timeout=plan.seconds * 4 + 60) for server in servers]
        fired = sum(report["fired"] for report in reports)
        drained = sink.wait_for_count(fired, timeout=plan.drain_timeout)
        sink.wait_quiet(quiet=2, timeout=10)  # late duplicates of a redelivered message
        for worker in workers:
            if not worker["killed"]:
                retire(worker, signal.SIGTERM)
        broker_cpu = cpu_seconds(broker_pid) - broker_cpu_before if broker_pid else None
        return summarize(plan, sink, reports, workers, kill, killed_at, drained, broker_cpu)
    finally:
        sink.release()
        for child in servers + [worker["child"] for worker in workers]:
            if child.process.poll() is None:
                child.process.kill()
            child.stop()
        sink.stop()


def summarize(plan: Plan, sink: SoakSink, reports: list[dict[str, Any]], workers: list[dict[str, Any]],
              kill: dict[str, Any], killed_at: float, drained: bool,
              broker_cpu: float | None) -> dict[str, Any]:
    fired = sum(report["fired"] for report in reports)
    expected = {report["index"] * RECORDS_STRIDE + n for report in reports for n in range(report["fired"])}
    arrived = set(sink.first_message_id)
    lost = sorted(expected - arrived)
    arrivals = sink.arrivals()
    delays_ms = [(at - stamped) * 1000 for at, stamped in arrivals if stamped is not None]
    first_fire = min(report["started"] for report in reports)
    last_fire = max(report["started"] + report["elapsed"] for report in reports)
    firing_s = last_fire - first_fire
    last_arrival = max((at for at, _ in arrivals), default=last_fire)
    return {
        "plan": asdict(plan),
        "fired": fired,
        "fired_per_s": round(fired / firing_s, 1),
        "firing_seconds": round(firing_s, 2),
        "delivered_unique": len(arrived & expected),
        "lost": len(lost),
        "lost_examples": [list(event_of(records)) for records in lost[:5]],
        "duplicates_same_message_id": sink.same_id_duplicates,
        "duplicates_by_second": _duplicates_by_second(sink, killed_at),
        "duplicates_other_message_id": sink.other_id_duplicates,
        "unexpected": len(arrived - expected) + sink.unidentified,
        "drained": drained,
        "drain_seconds": round(max(0.0, last_arrival - last_fire), 2),
        "delivered_per_s": round(len(arrived & expected) / max(last_arrival - first_fire, 1e-6), 1),
        "latency_ms": {key: round(value, 1) for key, value in p50_p99(delays_ms).items()},
        "latency_max_ms": round(max(delays_ms, default=0.0), 1),
        "kill": {**kill, "posts_discarded": sink.discarded_posts,
                 "events_discarded": sink.discarded_events, "recovered_s": _recovered_after(sink, killed_at)},
        "servers": [{"index": report["index"], "fired": report["fired"],
                     "fired_per_s": round(report["fired"] / report["elapsed"], 1),
                     "published": report["stats"]["published"], "dropped": report["stats"]["dropped"],
                     "pending": report["stats"]["pending"], "flushed": report["flushed"],
                     "cpu_s": round(report["cpu_s"], 2),
                     "cpu_percent": round(100 * report["cpu_s"] / report["elapsed"], 1)} for report in reports],
        "workers": [{"name": worker["child"].name, "killed": worker["killed"],
                     "cpu_s": round(worker["cpu_s"], 2) if worker["cpu_s"] is not None else None,
                     "cpu_percent": round(100 * worker["cpu_s"] / worker["seconds"], 1)
                     if worker["cpu_s"] is not None else None} for worker in workers],
        "broker_cpu_s": round(broker_cpu, 2) if broker_cpu is not None else None,
    }


def _duplicates_by_second(sink: SoakSink, killed_at: float) -> dict[str, dict[str, Any]]:
    """Repeated arrivals grouped by when they arrived (seconds from the kill): which
    events, so that each can be traced to a redelivery or a re-publish in the logs."""
    groups: dict[str, dict[str, Any]] = {}
    for records, at in sink.duplicated:
        group = groups.setdefault(f"{at - killed_at:+.0f}", {"count": 0, "events": set()})
        group["count"] += 1
        group["events"].add(event_of(records))
    return {second: {"count": group["count"], "first": list(min(group["events"])),
                     "last": list(max(group["events"]))} for second, group in sorted(groups.items())}


def _recovered_after(sink: SoakSink, killed_at: float) -> float | None:
    """Seconds from the kill to the last arrival of an event fired before it: when the
    killed worker's message (and any backlog) had been delivered."""
    late = [at for at, stamped in sink.arrivals() if stamped is not None and stamped < killed_at]
    return round(max(late) - killed_at, 1) if late else None


def passed(result: dict[str, Any]) -> bool:
    return (result["lost"] == 0 and result["duplicates_other_message_id"] == 0 and result["unexpected"] == 0
            and all(not server["dropped"] for server in result["servers"]))


def machine() -> dict[str, Any]:
    import celery
    import kombu

    return {"cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "celery": celery.__version__, "kombu": kombu.__version__,
            "worker_niceness": os.environ.get("BENCH_WORKER_NICENESS", "19")}


def format_table(result: dict[str, Any]) -> str:
    rows = [
        ("broker", f"{result['broker']['broker']} {result['broker']['version']}"),
        ("asked", f"{result['plan']['rate']:g} events/s for {result['plan']['seconds']:g} s, "
                  f"{result['plan']['servers']} servers, {result['plan']['workers']} workers"),
        ("fired", f"{result['fired']} in {result['firing_seconds']} s = {result['fired_per_s']} events/s"),
        ("delivered (unique)", f"{result['delivered_unique']}, {result['delivered_per_s']} events/s"),
        ("lost", str(result["lost"])),
        ("duplicates, same messageId", str(result["duplicates_same_message_id"])),
        ("duplicates, other messageId", str(result["duplicates_other_message_id"])),
        ("latency p50 / p99 / max", f"{result['latency_ms']['p50']} / {result['latency_ms']['p99']} / "
                                    f"{result['latency_max_ms']} ms"),
        ("last arrival after last fire", f"{result['drain_seconds']} s"),
        ("kill", f"at {result['kill']['at_s']} s, {result['kill']['posts_in_flight']} POSTs in flight, "
                 f"the killed worker's discarded ({result['kill']['events_discarded']} events); "
                 f"events fired before it all in {result['kill']['recovered_s']} s"),
    ]
    rows += [(f"server {s['index']}", f"fired {s['fired']} ({s['fired_per_s']}/s), published {s['published']}, "
                                      f"dropped {s['dropped'] or 0}, CPU {s['cpu_s']} s ({s['cpu_percent']}%)")
             for s in result["servers"]]
    rows += [(w["name"] + (" (killed)" if w["killed"] else ""), f"CPU {w['cpu_s']} s ({w['cpu_percent']}%)")
             for w in result["workers"]]
    if result["broker_cpu_s"] is not None:
        rows.append(("broker CPU", f"{result['broker_cpu_s']} s"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=sorted(BROKERS), required=True)
    parser.add_argument("--rate", type=float, default=Plan.rate, help="events per second, all servers together")
    parser.add_argument("--seconds", type=float, default=Plan.seconds, help="how long the servers fire")
    parser.add_argument("--logs", type=Path, help="keep the servers' and workers' logs in this folder")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here "
                                                 "(default: rubrix-soak-BROKER.json in the temp folder)")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0:
        parser.error("--rate and --seconds must be positive")
    out = args.out or Path(tempfile.gettempdir()) / f"rubrix-soak-{args.broker}.json"
    plan = Plan(rate=args.rate, seconds=args.seconds)
    if not writable_out(out, "python -m bench.soak"):
        return 1
    where = machine()
    try:
        with tempfile.TemporaryDirectory(prefix="rubrix-soak-") as workdir, \
                BROKERS[args.broker](Path(workdir)) as (url, broker):
            result = run_soak(url, plan, Path(workdir), broker_pid=broker.pop("pid"), logs=args.logs)
    except (SoakError, RuntimeError) as error:  # RuntimeError: a child of bench.infra failed
        print(f"python -m bench.soak: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    command = " ".join(["python -m bench.soak", *(sys.argv[1:] if argv is None else argv)])
    result = {"broker": broker, "machine": where, "command": command,
              "passed": passed(result), **result}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"figures: {out}")
    if not result["passed"]:
        print("python -m bench.soak: events were lost or sent twice under two ids (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
