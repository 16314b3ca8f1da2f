"""`rubrix-telemetry metrics`: the deployment's telemetry figures on `/metrics`, for Prometheus.

Each scrape asks the broker and the workers exactly as `rubrix-telemetry status` does
(`telemetry_ops.status.collect_status`): a `prometheus_client` custom collector whose
`collect()` runs on each scrape. Nothing is counted in this process: the counts are the
deployment's, read from where the workers keep them, so several exporters, or several
Prometheus servers scraping one, never count an event twice.

A scrape never hangs: every check runs under a deadline that fits in the scrape's timeout
(Prometheus sends it in `X-Prometheus-Scrape-Timeout-Seconds`; without it, `status`'s 4 s).
A broker that does not answer in time is `rubrix_telemetry_broker_up 0`, never an error page.
Neither the write key nor a broker URL appears in what is served.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from telemetry_core.counts import DROP_REASON_LABELS, drop_reason_label
from telemetry_core.settings import Settings, masked_url
from telemetry_ops.status import CHECKS_BUDGET, STATUS_TIMEOUT, WORKER_REPLY_WAIT, CheckBounds, Status, collect_status
from tasks.remote_status import DELIVERED

log = logging.getLogger("telemetry_ops.metrics")

PREFIX = "rubrix_telemetry_"
# The share of Prometheus' scrape timeout the checks may use: the rest is for the answer to
# travel, and for a loaded machine.
SCRAPE_TIMEOUT_SHARE = 0.75
# The least a scrape is given, whatever Prometheus says: below it nothing could answer.
MIN_SCRAPE_SECONDS = 0.3
SCRAPE_TIMEOUT_HEADER = "HTTP_X_PROMETHEUS_SCRAPE_TIMEOUT_SECONDS"  # as WSGI names it


def scrape_budget(timeout_header: str | None) -> float:
    """Seconds this scrape's checks may take: a share of the timeout Prometheus announces,
    never more than `status` takes."""
    try:
        announced = float(timeout_header) if timeout_header else None
    except ValueError:
        announced = None
    if announced is None or announced != announced or announced <= 0:  # absent, not a number, NaN
        return CHECKS_BUDGET
    return max(MIN_SCRAPE_SECONDS, min(CHECKS_BUDGET, announced * SCRAPE_TIMEOUT_SHARE))


def check_bounds(budget: float) -> CheckBounds:
    """`status`'s checks, fitted into `budget` seconds: the broker gets at most half of it, the
    workers what is left."""
    return CheckBounds(broker=min(STATUS_TIMEOUT, budget / 2), total=budget,
                       reply_wait=min(WORKER_REPLY_WAIT, budget * 0.6), workers=budget, workers_at_least=0.0)


def last_delivered_at(status: Status) -> float | None:
    """When a worker consuming the queue last delivered, by the workers' own answers."""
    times = [float(last["at"]) for worker in status.consuming
             if isinstance(last := worker.get("last_delivery"), dict) and last.get("outcome") == DELIVERED
             and isinstance(last.get("at"), (int, float))]
    return max(times, default=None)


def deployment_metrics(status: Status, settings: Settings) -> list[Metric]:
    """The metric families of one scrape, from what `status` found; the limits as `settings` have them."""

    def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(PREFIX + name, documentation, value=value)

    families: list[Metric] = [
        gauge("broker_up", "1 when the broker answered this scrape in time, else 0", int(status.broker.answers)),
        gauge("workers_up", "Workers that answered this scrape and consume the telemetry queue",
              len(status.consuming)),
        gauge("backlog_limit_events", "RUBRIX_TELEMETRY_MAX_BACKLOG as this exporter reads it: beyond it "
              "servers drop new events", settings.max_backlog),
        gauge("backlog_limit_bytes", "RUBRIX_TELEMETRY_MAX_BACKLOG_BYTES as this exporter reads it: beyond it "
              "servers drop new events", settings.max_backlog_bytes),
    ]
    # Left out when the broker did not answer, or cannot tell (bytes: RabbitMQ).
    broker = status.broker
    if broker.answers and broker.backlog is not None:
        families.append(gauge("backlog_events", "Events that wait for delivery in the broker: queued, and "
                              "held by workers (being delivered or waiting for a retry)", broker.backlog))
    if broker.answers and broker.backlog_bytes is not None:
        families.append(gauge("backlog_bytes", "Bytes the broker holds for the events that wait, as it "
                              "accounts for them", broker.backlog_bytes))
    delivered_at = last_delivered_at(status)
    if delivered_at is not None:
        families.append(gauge("last_delivery_timestamp_seconds", "When a worker consuming the queue last "
                              "delivered events (seconds since the epoch; among the workers that answered)",
                              delivered_at))
    counts = status.broker.counts
    # Counts that cannot be read are left out, never shown as 0: Prometheus would take a 0 for
    # a counter reset, and the next scrape's figure for that many new events.
    if counts is not None:
        families.append(CounterMetricFamily(PREFIX + "events_delivered", "Events the backend accepted, "
                                            "deployment-wide (the counts `status` shows)", value=counts["delivered"]))
        families.append(CounterMetricFamily(PREFIX + "events_retried", "Events scheduled for another "
                                            "delivery attempt, deployment-wide", value=counts["retried"]))
        dropped = CounterMetricFamily(PREFIX + "events_dropped", "Events dropped, deployment-wide, by reason "
                                      "(a fixed set: see the README's Monitoring section)", labels=["reason"])
        by_label = dict.fromkeys(DROP_REASON_LABELS, 0)  # every label, 0 included: a new series' first rise counts
        for reason, n in counts["dropped"].items():
            by_label[drop_reason_label(reason)] += int(n)
        for label, n in by_label.items():
            dropped.add_metric([label], n)
        families.append(dropped)
    return families


class DeploymentCollector:
    """A `prometheus_client` collector that asks the deployment at each scrape, within `budget` seconds."""

    def __init__(self, settings: Settings, budget: float, on_broker: Callable[[Status], None] | None = None) -> None:
        self.settings = settings
        self.budget = budget
        self.on_broker = on_broker

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not ask the broker

    def collect(self) -> Iterator[Metric]:
        # The backlog comes with the broker's answer (`status` counts it in the same bounded check).
        status = collect_status(self.settings, check_bounds(self.budget))
        if self.on_broker is not None:
            self.on_broker(status)
        yield from deployment_metrics(status, self.settings)


class BrokerStateLog:
    """One log line when the broker stops answering the scrapes, and one when it answers again."""

    def __init__(self) -> None:
        self._answered: bool | None = None
        self._lock = threading.Lock()

    def __call__(self, status: Status) -> None:
        with self._lock:
            changed, self._answered = self._answered != status.broker.answers, status.broker.answers
        if changed and not status.broker.answers:
            log.warning("telemetry: the broker %s does not answer: %s (rubrix_telemetry_broker_up 0)",
                        status.broker.url, status.broker.error)
        elif changed:
            log.info("telemetry: the broker %s answers", status.broker.url)


def metrics_app(settings: Settings) -> Callable[..., Any]:
    """The WSGI application: `prometheus_client`'s exposition of a registry made for each scrape,
    so that the collector knows the scrape's timeout."""
    broker_state = BrokerStateLog()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(DeploymentCollector(settings, scrape_budget(environ.get(SCRAPE_TIMEOUT_HEADER)),
                                              on_broker=broker_state))
        return make_wsgi_app(registry)(environ, start_response)

    return app


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(0)  # out of serve_forever, through its clean-up


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the standard library's name)
        pass  # a line per scrape, every few seconds for weeks, says nothing


def serve_metrics(settings: Settings, host: str, port: int) -> None:
    """Serves `/metrics` until interrupted; raises OSError when it cannot listen."""
    from tasks import celery  # noqa: F401 (imported now: the first scrape must not pay for it)

    server = make_server(host, port, metrics_app(settings), server_class=ThreadingWSGIServer,
                         handler_class=_QuietHandler)
    log.info("metrics on http://%s:%d/metrics for the deployment on %s (queue %r)", host, server.server_port,
             masked_url(settings.broker_url_or_default), settings.queue)
    # A container's PID 1 ignores SIGTERM unless it handles it: `docker stop` would wait 10 s.
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
