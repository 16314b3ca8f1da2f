"""`rubrix-telemetry status`: is telemetry on, does the broker answer, how many events wait,
which workers consume the queue and with what settings, and what they have delivered,
retried and dropped.

The workers are asked, not guessed at: a Celery remote-control broadcast
(`tasks.remote_status`) to which every worker on the broker answers with the settings of
its own environment. The shell `status` runs in may have another endpoint, no write key,
or another broker: only its broker URL and queue name are used, to know where to ask.

Exit code 0 when healthy; otherwise 1, with one line on stderr per problem. Every wait has
a hard deadline (a status command that hangs on a dead broker is useless), and neither
the write key nor a broker password is ever printed.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from telemetry_core.brokers import broker_for
from telemetry_core.counts import add_counts
from telemetry_core.settings import Settings, load_settings, masked_url, without_password
from tasks import counters

T = TypeVar("T")

# Seconds the broker check may take, connection and DNS included.
STATUS_TIMEOUT = 3.0
# Seconds from the start of the checks after which nothing more is waited for, so that the
# whole command (interpreter start included) answers within 5 s even when nothing does.
CHECKS_BUDGET = 4.0
# The workers' answers: Celery waits this long after the last one for another; the whole
# exchange is cut after WORKERS_DEADLINE. On the embedded queue a worker looks for new
# messages once a second, so its answer comes after about one.
WORKER_REPLY_WAIT = 1.5
WORKERS_DEADLINE = 3.0


@dataclass(frozen=True)
class CheckBounds:
    """Seconds each check may take: `status`'s are the defaults; `metrics` fits them into a
    scrape's timeout (telemetry_ops/metrics.py)."""

    broker: float = STATUS_TIMEOUT  # the broker check, connection and DNS included
    total: float = CHECKS_BUDGET  # from the start of the checks: nothing is waited for after it
    reply_wait: float = WORKER_REPLY_WAIT  # Celery waits this long after the last answer for another
    workers: float = WORKERS_DEADLINE  # the whole exchange with the workers
    workers_at_least: float = 1.0  # the workers get this long even when the broker check was slow


STATUS_BOUNDS = CheckBounds()


def _within(timeout: float, name: str, work: Callable[[], T]) -> tuple[bool, T | None, BaseException | None]:
    """Runs `work` for at most `timeout` seconds: (finished, its result, what it raised).

    A daemon thread rather than socket timeouts alone: name resolution has no timeout,
    and a broker that accepts connections and never answers can hold a client for ever.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # noqa: BLE001 (any failure is the answer we report)
            outcome["error"] = error

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None, None
    return True, outcome.get("result"), outcome.get("error")


@dataclass
class BrokerReport:
    url: str
    answers: bool = False
    error: str | None = None
    queue_depth: int | None = None  # messages waiting in the telemetry queue
    unacked: int | None = None  # Redis, embedded: messages workers hold (in delivery or awaiting a retry)
    queue_error: str | None = None  # RabbitMQ: the queue exists with another type than configured
    backlog: int | None = None  # events waiting for delivery (`Broker.backlog`), against max_backlog
    max_backlog: int | None = None  # RUBRIX_TELEMETRY_MAX_BACKLOG, as this shell has it
    backlog_counted_by: str | None = None  # how the broker counts it (an estimate on RabbitMQ)
    backlog_bytes: int | None = None  # bytes the broker holds for it (`Broker.backlog_bytes`), against max_backlog_bytes
    max_backlog_bytes: int | None = None  # RUBRIX_TELEMETRY_MAX_BACKLOG_BYTES, as this shell has it
    counts: dict[str, Any] | None = None
    counts_error: str | None = None


def probe_broker(settings: Settings, timeout: float = STATUS_TIMEOUT) -> BrokerReport:
    """Asks the broker, giving up after `timeout` seconds whatever it is stuck on."""
    url = settings.broker_url_or_default
    broker = broker_for(settings)
    bounds = {"max_backlog": settings.max_backlog, "max_backlog_bytes": settings.max_backlog_bytes,
              "backlog_counted_by": broker.backlog_method()}
    report = BrokerReport(url=masked_url(url), **bounds)

    def probe() -> None:
        state = broker.queue_state(timeout)  # raises when the broker does not answer
        report.answers = True
        report.queue_depth, report.unacked, report.queue_error = state.depth, state.held, state.problem
        if state.problem is None:
            report.backlog = broker.backlog(timeout)
            report.backlog_bytes = broker.backlog_bytes(timeout)
        report.counts = counters.read_counts(settings, timeout)

    finished, _, error = _within(timeout, "status-broker", probe)
    if not finished:
        return BrokerReport(url=report.url, error=f"no answer within {timeout:g}s", **bounds)
    if isinstance(error, counters.CountsUnavailable):
        report.counts_error = str(error)
    elif error is not None:
        report.error = without_password(str(error), url) or type(error).__name__
    return report


def ask_workers(settings: Settings, deadline: float, reply_wait: float = WORKER_REPLY_WAIT) -> list[dict[str, Any]]:
    """The workers' answers to the status command that came within `deadline` seconds, by name."""
    from tasks.celery import app  # the workers' own broker configuration
    from tasks.remote_status import STATUS_COMMAND

    answers: list[dict[str, Any]] = []

    def collect(reply: dict[str, Any]) -> None:
        answers.extend({"name": name, **answer} for name, answer in reply.items() if isinstance(answer, dict))

    def broadcast() -> None:
        options = broker_for(settings).reply_transport_options()
        with app.connection_for_write(transport_options=options) as connection:
            app.control.broadcast(STATUS_COMMAND, connection=connection, reply=True, timeout=reply_wait,
                                  callback=collect)

    # Each answer is kept as it arrives: the deadline cuts the wait, never what came in.
    _within(deadline, "status-workers", broadcast)
    return sorted(list(answers), key=lambda answer: answer["name"])


@dataclass
class Status:
    telemetry_enabled: bool
    decided_by: str
    endpoint: str  # this shell's settings: each worker reports its own in `workers`
    write_key_set: bool
    queue: str
    broker: BrokerReport
    workers: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def consuming(self) -> list[dict[str, Any]]:
        return [worker for worker in self.workers if self.queue in worker.get("queues", [])]


def collect_status(settings: Settings, bounds: CheckBounds = STATUS_BOUNDS) -> Status:
    started = time.monotonic()
    status = Status(telemetry_enabled=settings.enabled, decided_by=settings.decided_by,
                    endpoint=masked_url(settings.endpoint), write_key_set=bool(settings.write_key),
                    queue=settings.queue, broker=probe_broker(settings, bounds.broker))
    if status.broker.answers:
        remaining = bounds.total - (time.monotonic() - started)
        workers = ask_workers(settings, max(bounds.workers_at_least, min(bounds.workers, remaining)), bounds.reply_wait)
        # An older release's worker reports its endpoint as it is, password included.
        status.workers = [{**worker, "endpoint": masked_url(worker["endpoint"])}
                          if isinstance(worker.get("endpoint"), str) else worker for worker in workers]
        if not counters.keeps_counts(settings) and status.consuming:
            # A broker that stores no values: each worker counts in its data folder and says so.
            status.broker.counts = add_counts([worker.get("deliveries") or {} for worker in status.consuming])
            status.broker.counts_error = None
    # Switched off here, nothing is expected to flow: what broker and workers say is information only.
    if settings.enabled:
        if status.broker.queue_error:
            status.problems.append(status.broker.queue_error)
        if not status.broker.answers:
            status.problems.append(f"the broker {status.broker.url} does not answer: {status.broker.error}")
        elif not status.consuming:
            status.problems.append(
                f"no worker consumes the queue {settings.queue!r} on {status.broker.url}: start one "
                f"(celery -A tasks worker -Q {settings.queue} -E -l INFO) with the same RUBRIX_TELEMETRY_BROKER_URL")
        for figure, bound, variable, unit in ((status.broker.backlog, settings.max_backlog,
                                               "RUBRIX_TELEMETRY_MAX_BACKLOG", "events"),
                                              (status.broker.backlog_bytes, settings.max_backlog_bytes,
                                               "RUBRIX_TELEMETRY_MAX_BACKLOG_BYTES", "bytes")):
            if figure is not None and figure >= bound:
                status.problems.append(f"the backlog is at its bound ({figure} of {variable}={bound} {unit}): "
                                       "servers drop new events until workers make room")
        status.problems.extend(f"worker {worker['name']} cannot deliver: {worker['problem']}"
                               for worker in status.consuming if worker.get("problem"))
        status.problems.extend(filter(None, (_failed_delivery(worker) for worker in status.consuming
                                             if not worker.get("problem"))))
    return status


def _ago(at: Any) -> str:
    return f"{max(0.0, time.time() - float(at)):.0f}s ago" if isinstance(at, (int, float)) else "at an unknown time"


def _failed_delivery(worker: dict[str, Any]) -> str | None:
    """The problem line for a worker whose last delivery attempt failed or was refused: the
    cause names the endpoint. None once a delivery succeeds (or before the first)."""
    from tasks.remote_status import FAILED, REFUSED  # as ask_workers: only once workers answered

    last = worker.get("last_delivery") or {}
    if not worker.get("telemetry", {}).get("enabled") or last.get("outcome") not in (FAILED, REFUSED):
        return None
    what = ("the last delivery failed ({}), its events wait for a retry" if last["outcome"] == FAILED
            else "the backend refused the last delivery ({}), its events were dropped")
    return f"worker {worker['name']}: {what.format(_ago(last.get('at')))}: {last.get('cause')}"


def _as_json(status: Status) -> str:
    document = {"healthy": status.healthy, "problems": status.problems,
                "telemetry": {"enabled": status.telemetry_enabled, "decided_by": status.decided_by},
                "broker": {key: value for key, value in asdict(status.broker).items()
                           if key not in ("queue_depth", "unacked", "queue_error", "counts", "counts_error",
                                          "backlog", "max_backlog", "backlog_counted_by", "backlog_bytes",
                                          "max_backlog_bytes")},
                "queue": {"name": status.queue, "depth": status.broker.queue_depth,
                          "unacked": status.broker.unacked, "error": status.broker.queue_error},
                # In events against RUBRIX_TELEMETRY_MAX_BACKLOG, in bytes against
                # RUBRIX_TELEMETRY_MAX_BACKLOG_BYTES (the same keys as `preview`'s).
                "backlog": {"events": status.broker.backlog, "max": status.broker.max_backlog,
                            "bytes": status.broker.backlog_bytes, "max_bytes": status.broker.max_backlog_bytes,
                            "counted_by": status.broker.backlog_counted_by},
                "endpoint": status.endpoint, "write_key_set": status.write_key_set,
                "counts": status.broker.counts, "counts_error": status.broker.counts_error,
                "workers": status.workers}
    return json.dumps(document, indent=2, ensure_ascii=False)


def _worker_line(worker: dict[str, Any], queue: str) -> str:
    switch = worker.get("telemetry", {})
    state = "on" if switch.get("enabled") else "OFF"
    consumes = "" if queue in worker.get("queues", []) else f" (does not consume {queue!r})"
    line = (f"  {worker['name']}: telemetry {state} (decided by {switch.get('decided_by')}), "
            f"queues {', '.join(worker.get('queues', [])) or 'none'}{consumes}, "
            f"endpoint {worker.get('endpoint')} (write key {'set' if worker.get('write_key_set') else 'not set'}), "
            f"{'paused while the backend fails, ' if worker.get('paused_queues') else ''}"
            f"concurrency {worker.get('concurrency')}, "
            f"Celery {worker.get('celery_version')}, kombu {worker.get('kombu_version')}")
    last = worker.get("last_delivery")
    if last:
        line += f", last delivery {_ago(last.get('at'))}: {last.get('outcome')}"
        line += f" ({last['cause']})" if last.get("cause") else ""
    return line + (f"; CANNOT DELIVER: {worker['problem']}" if worker.get("problem") else "")


def _as_text(status: Status) -> str:
    broker = status.broker
    lines = [
        f"telemetry:  {'on' if status.telemetry_enabled else 'off'} (decided by {status.decided_by})",
        f"broker:     {broker.url} ({'answers' if broker.answers else 'does not answer: ' + str(broker.error)})",
    ]
    # A broker that answers but reports no figure (one we have no module for) says so: not left out.
    unreported = broker.answers and not broker.queue_error
    if broker.queue_depth is not None:
        held = f", {broker.unacked} held by workers" if broker.unacked is not None else ""
        lines.append(f"queue:      {status.queue}: {broker.queue_depth} waiting{held}")
    elif unreported:
        lines.append(f"queue:      {status.queue}: depth not reported by {urlsplit(broker.url).scheme}:// brokers")
    if broker.backlog is not None:
        size = ("" if broker.backlog_bytes is None else
                f"{broker.backlog_bytes} of {broker.max_backlog_bytes} bytes (RUBRIX_TELEMETRY_MAX_BACKLOG_BYTES); ")
        lines.append(f"backlog:    {broker.backlog} of {broker.max_backlog} events (RUBRIX_TELEMETRY_MAX_BACKLOG); "
                     f"{size}counted by {broker.backlog_counted_by}")
    elif unreported:
        lines.append(f"backlog:    counted by {broker.backlog_counted_by}")
    if broker.answers:
        lines.append(f"workers:    {len(status.consuming)} consuming {status.queue!r}, "
                     f"{len(status.workers)} answering in all")
        lines.extend(_worker_line(worker, status.queue) for worker in status.workers)
    counts = broker.counts
    if counts is not None:
        lines.append(f"delivered:  {counts['delivered']}")
        lines.append(f"retried:    {counts['retried']}")
        lines.append(f"dropped:    {sum(counts['dropped'].values())}")
        lines.extend(f"  {n:>8}  {reason}" for reason, n in counts["dropped"].items())
    elif broker.counts_error:
        lines.append(f"counts:     unavailable ({broker.counts_error})")
    lines.append(f"status:     {'healthy' if status.healthy else 'UNHEALTHY'}")
    return "\n".join(lines)


def run_status(json_output: bool) -> int:
    status = collect_status(load_settings())
    print(_as_json(status) if json_output else _as_text(status))
    for problem in status.problems:
        print(f"rubrix-telemetry: unhealthy: {problem}", file=sys.stderr)
    return 0 if status.healthy else 1
