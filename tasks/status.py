"""`rubrix-telemetry status`: is telemetry on, does the broker answer, how many events wait,
and what the workers have delivered, retried and dropped.

Exit code 0 when healthy; otherwise 1, with one line on stderr saying why. The broker is
asked with a short, hard deadline (a status command that hangs on a dead broker is
useless), and neither the write key nor a broker password is ever printed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

from rubrix_hooks import rabbitmq
from rubrix_hooks.settings import Settings, embedded_broker_folders, load_settings, masked_url
from tasks import counters

# Seconds the whole broker check may take, connection and DNS included.
STATUS_TIMEOUT = 3.0
# kombu's Redis transport: messages taken by a worker and not yet acknowledged (being
# delivered, or held for a retry countdown) wait in this hash, not in the queue's list.
REDIS_UNACKED_KEY = "unacked"


@dataclass
class BrokerReport:
    url: str
    answers: bool = False
    error: str | None = None
    queue_depth: int | None = None  # messages waiting in the telemetry queue
    unacked: int | None = None  # Redis only: messages workers hold (in delivery or awaiting a retry)
    queue_error: str | None = None  # RabbitMQ: the queue exists with another type than configured
    counts: dict[str, Any] | None = None
    counts_error: str | None = None


def _probe_redis(settings: Settings, report: BrokerReport) -> None:
    client = counters.redis_client(settings.broker_url_or_default, STATUS_TIMEOUT)
    client.ping()
    report.answers = True
    report.queue_depth = int(client.llen(settings.queue))
    report.unacked = int(client.hlen(REDIS_UNACKED_KEY))
    report.counts = counters.read_counts(settings, client)


def _probe_embedded(settings: Settings, report: BrokerReport) -> None:
    queue_folder = embedded_broker_folders(settings)["queue"]
    if not os.access(queue_folder, os.R_OK | os.W_OK):
        raise PermissionError(f"cannot read and write {queue_folder}")
    report.answers = True
    # kombu's filesystem transport names each message `<time>_<id>.<queue>.msg`.
    ours = f"{settings.queue}.msg"
    report.queue_depth = sum(1 for name in os.listdir(queue_folder) if name.partition(".")[2] == ours)
    report.counts = counters.read_counts(settings)


def _probe_other(settings: Settings, report: BrokerReport) -> None:
    from kombu import Connection

    with Connection(settings.broker_url_or_default, connect_timeout=STATUS_TIMEOUT) as connection:
        connection.ensure_connection(max_retries=1)
    report.answers = True
    if settings.uses_amqp_broker:
        try:
            report.queue_depth = rabbitmq.queue_depth(settings, STATUS_TIMEOUT)
        except rabbitmq.QueueTypeMismatch as error:
            report.queue_error = str(error)
    report.counts_error = f"no counts kept on a {urlsplit(settings.broker_url_or_default).scheme}:// broker"


def _without_password(text: str, url: str) -> str:
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def probe_broker(settings: Settings, timeout: float = STATUS_TIMEOUT) -> BrokerReport:
    """Asks the broker, giving up after `timeout` seconds whatever it is stuck on."""
    url = settings.broker_url_or_default
    report = BrokerReport(url=masked_url(url))
    probe: Callable[[Settings, BrokerReport], None]
    if settings.uses_embedded_broker:
        probe = _probe_embedded
    elif urlsplit(url).scheme in counters.REDIS_SCHEMES:
        probe = _probe_redis
    else:
        probe = _probe_other

    def run() -> None:
        try:
            probe(settings, report)
        except counters.CountsUnavailable as error:
            report.counts_error = str(error)
        except Exception as error:  # noqa: BLE001 (any failure is the answer we report)
            report.error = _without_password(str(error) or type(error).__name__, url)

    # A daemon thread rather than socket timeouts alone: name resolution has no timeout.
    thread = threading.Thread(target=run, name="status-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return BrokerReport(url=report.url, error=f"no answer within {timeout:g}s")
    return report


@dataclass
class Status:
    telemetry_enabled: bool
    decided_by: str
    endpoint: str
    write_key_set: bool
    queue: str
    broker: BrokerReport
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


def collect_status(settings: Settings) -> Status:
    status = Status(telemetry_enabled=settings.enabled, decided_by=settings.decided_by,
                    endpoint=settings.endpoint, write_key_set=bool(settings.write_key),
                    queue=settings.queue, broker=probe_broker(settings))
    # Switched off, nothing is expected to flow: what the broker says is information only.
    if settings.enabled:
        if not status.broker.answers:
            status.problems.append(f"the broker {status.broker.url} does not answer: {status.broker.error}")
        if status.broker.queue_error:
            status.problems.append(status.broker.queue_error)
        if settings.is_segment and not settings.write_key:
            status.problems.append(f"RUBRIX_TELEMETRY_KEY is not set: workers drop every event "
                                   f"instead of sending it to {settings.endpoint}")
    return status


def _as_json(status: Status) -> str:
    document = {"healthy": status.healthy, "problems": status.problems,
                "telemetry": {"enabled": status.telemetry_enabled, "decided_by": status.decided_by},
                "broker": {key: value for key, value in asdict(status.broker).items()
                           if key not in ("queue_depth", "unacked", "queue_error", "counts", "counts_error")},
                "queue": {"name": status.queue, "depth": status.broker.queue_depth,
                          "unacked": status.broker.unacked, "error": status.broker.queue_error},
                "endpoint": status.endpoint, "write_key_set": status.write_key_set,
                "counts": status.broker.counts, "counts_error": status.broker.counts_error}
    return json.dumps(document, indent=2, ensure_ascii=False)


def _as_text(status: Status) -> str:
    broker = status.broker
    lines = [
        f"telemetry:  {'on' if status.telemetry_enabled else 'off'} (decided by {status.decided_by})",
        f"broker:     {broker.url} ({'answers' if broker.answers else 'does not answer: ' + str(broker.error)})",
    ]
    if broker.queue_depth is not None:
        held = f", {broker.unacked} held by workers" if broker.unacked is not None else ""
        lines.append(f"queue:      {status.queue}: {broker.queue_depth} waiting{held}")
    lines.append(f"endpoint:   {status.endpoint} (write key {'set' if status.write_key_set else 'not set'})")
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
    if not status.healthy:
        print(f"rubrix-telemetry: unhealthy: {status.problems[0]}", file=sys.stderr)
        return 1
    return 0
