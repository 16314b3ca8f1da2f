"""The one interface every broker module implements, and what a broker we have no module for gets.

Each method answers one question that the publisher, the worker app, the delivery counts,
the deployment id or `status` used to answer with a branch of its own on the broker URL's
scheme. `telemetry_core.brokers.broker_for(settings)` picks the module (kombu's
`TRANSPORT_ALIASES` is the model); adding a broker is adding a module and one alias.

A scheme kombu knows but we have no module for (`sqs://`, `sqla+postgresql://`, ...) gets
this class as it is: delivery works, as Celery and kombu do it there, and what it cannot
report (the queue's depth, the counts in one place, a deployment-wide id) it says plainly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol
from urllib.parse import urlsplit

from telemetry_core.settings import ConfigurationError, Settings, masked_url, without_password


class PublishUnconfirmed(Exception):
    """The broker did not confirm a publish in time (RabbitMQ blocks publishers during a
    memory or disk alarm). The batch is held and published again."""


class QueueMisconfigured(Exception):
    """The broker refuses the telemetry queue as configured (one line for an operator)."""


class BrokerRefusedWorker(Exception):
    """The broker refused the worker for good (its credentials, its virtual host or database):
    no retry can mend it. The text is the broker's cause."""


@dataclass
class QueueState:
    """What `status` shows of the telemetry queue; None where the broker cannot tell."""

    depth: int | None = None  # task messages waiting
    held: int | None = None  # task messages workers hold: being delivered, or waiting for a retry
    problem: str | None = None  # the queue cannot be used as configured


class CountsStore(Protocol):
    """Where the delivery counts of a deployment live (fields: `delivered`, `retried`,
    `dropped:<reason>`)."""

    def add(self, increments: Mapping[str, int]) -> None:
        """Adds all of the increments, or raises having added none."""

    def read(self) -> dict[str, int]:
        """Every field; raises when the store cannot be read."""


class Broker:
    """A broker kombu knows, as rubrix-telemetry uses it (see the module's docstring)."""

    #: How `status` and the logs name this kind of broker.
    label: ClassVar[str] = "kombu"
    #: Whether the deployment's delivery counts live in the broker (else each worker keeps
    #: its own in its data folder and reports them in its answer to `status`).
    keeps_counts: ClassVar[bool] = False
    #: Whether the broker keeps the deployment id (else each data folder's id is used).
    keeps_deployment_id: ClassVar[bool] = False

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def url(self) -> str:
        return self.settings.broker_url_or_default

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    # -- configuration (checked when the settings are loaded) ----------------------------
    def check_settings(self) -> None:
        """Raises ConfigurationError for a setting this broker cannot honour, or a URL it cannot
        use (knowable without a connection: Celery would stop with a traceback)."""
        for part in self.url.split(";"):
            try:
                problem = self.url_problem(self.url_parts(part))
            except ValueError as error:
                problem = f"kombu cannot parse it: {error}"
            if problem:
                raise ConfigurationError(f"RUBRIX_TELEMETRY_BROKER_URL={masked_url(self.url)}: "
                                         f"{without_password(problem, self.url)}")
        if self.settings.queue_type != "classic":
            raise ConfigurationError(f"RUBRIX_TELEMETRY_QUEUE_TYPE={self.settings.queue_type} needs a RabbitMQ "
                                     f"broker (amqp://), not {self.scheme}://")

    def url_parts(self, url: str) -> Mapping[str, Any]:
        """One URL of the list as kombu reads it (`parse_url`: transport, hostname, ..., virtual_host)."""
        from kombu.utils.url import parse_url

        return parse_url(url)

    def url_problem(self, parts: Mapping[str, Any]) -> str | None:
        """What this broker cannot use in one URL of the list (kombu's `parse_url` parts)."""
        return None

    def redelivery_limit(self) -> tuple[str, float]:
        """The variable, and its seconds, after which the broker takes back a message a worker
        holds unacknowledged: every retry countdown must stay below it."""
        return "RUBRIX_TELEMETRY_VISIBILITY_TIMEOUT", self.settings.visibility_timeout

    # -- Celery and kombu ---------------------------------------------------------------
    def transport_options(self) -> dict[str, Any]:
        """kombu transport options for every connection, before the operator's own
        (RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS) are merged over them."""
        return {}

    def publisher_transport_options(self) -> dict[str, Any]:
        """Transport options added for the processes that publish task messages."""
        return {}

    def publish_bounds(self) -> dict[str, float]:
        """Keyword arguments that bound each publish's waits (`send_task`/`apply_async`)."""
        return {}

    def reply_transport_options(self) -> dict[str, Any]:
        """Transport options for a short-lived client waiting for the workers' replies (`status`)."""
        return {}

    def task_queues(self) -> list[Any]:
        """Celery's `task_queues`: the telemetry queue as this broker declares it."""
        from kombu import Queue

        return [Queue(self.settings.queue, routing_key=self.settings.queue)]

    def use_worker_transport(self) -> None:
        """Called in a worker's process before its app connects: a broker whose worker consumes
        through a transport of ours (kombu's, extended) makes kombu resolve its schemes to it."""

    def worker_probing(self, probing: bool) -> None:
        """The worker's breaker: the backend fails and the worker probes it (True), or a delivery
        succeeded (False). A transport that takes many messages at once takes one meanwhile."""

    def prepare_worker(self, timeout: float) -> None:
        """Before a worker consumes: raises BrokerRefusedWorker or QueueMisconfigured for what
        must stop its start (a supervisor would restart it for ever); a broker that cannot be
        reached is no such thing: Celery retries it."""

    def start_worker_alongside(self) -> None:
        """Called once from each server process's publisher thread: on a broker whose queue lives
        beside the server (the embedded queue), starts the one worker it needs when none consumes
        it. Never raises, never blocks the server. Elsewhere workers are the operator's: nothing."""

    def worker_starting(self) -> None:
        """At a worker's start (`worker_init`): what the broker needs a running worker to hold
        (the embedded queue: the lock that tells servers a worker consumes). Never raises."""

    def explain_publish_error(self, error: Exception) -> Exception | None:
        """A clearer exception for a failed publish (PublishUnconfirmed, QueueMisconfigured),
        or None to let the error stand."""
        return None

    # -- what `status` shows -------------------------------------------------------------
    def queue_state(self, timeout: float) -> QueueState:
        """The queue's depth and what workers hold; raises when the broker does not answer."""
        from kombu import Connection

        with Connection(self.url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1)
        return QueueState()

    def backlog(self, timeout: float, under: int | None = None) -> int | None:
        """EVENTS that wait for delivery: queued, and held by workers (being delivered or waiting
        for a retry); None where the broker cannot tell. What RUBRIX_TELEMETRY_MAX_BACKLOG bounds.

        Each task message counts the events its header says (`message.EVENTS_HEADER`); one
        without it (an older release's) counts as `events_per_task`. With `under` (the
        publisher's check before each publish), a broker may answer any figure below `under`
        once a cheap look shows the backlog is below it; otherwise the figure is its best.
        Raises when the broker does not answer. Here, for a broker we have no module for: the
        messages `queue_state` sees, each counted as `events_per_task` (an upper bound).
        """
        state = self.queue_state(timeout)
        if state.depth is None:
            return None
        return (state.depth + (state.held or 0)) * self.settings.events_per_task

    def backlog_bytes(self, timeout: float) -> int | None:
        """BYTES the broker holds for the waiting messages (queued, and held by workers), as the
        broker itself accounts for them; None where it cannot tell (then only the events are
        bounded). What RUBRIX_TELEMETRY_MAX_BACKLOG_BYTES bounds. Costs the same whatever waits.
        Raises when the broker does not answer."""
        return None

    def message_published(self, events: int) -> None:
        """Called once the broker has taken a task message of `events` events (a server's publish,
        or a worker's retry), so that a broker keeping a running count adds them. Never raises:
        a count this misses is found by the broker's recount."""

    def message_settled(self, events: int) -> None:
        """Called by a worker once a message it took (carrying `events` events, as its header said)
        is settled for good: delivered, dropped, or replaced by its retry. Never raises."""

    def backlog_method(self) -> str:
        """How `backlog` counts on this broker, in a few words (`status`, `preview`)."""
        if type(self).queue_state is Broker.queue_state:  # the fallback itself: no depth to count from
            return (f"nothing: {self.scheme}:// brokers report no queue depth to rubrix-telemetry, "
                    "so RUBRIX_TELEMETRY_MAX_BACKLOG is not enforced")
        return "task messages times RUBRIX_TELEMETRY_EVENTS_PER_TASK (an upper bound)"

    def no_counts_reason(self) -> str:
        return f"no counts kept on {self.scheme}:// brokers"

    # -- where the counts and the deployment id live ---------------------------------------
    def counts_store(self, timeout: float) -> CountsStore | None:
        """The deployment's counts in the broker; None when it keeps none (`keeps_counts`)."""
        return None

    def shared_deployment_id(self, offered: str, timeout: float) -> str:
        """The deployment id kept by the broker, `offered` becoming it if it has none yet."""
        raise NotImplementedError(f"{self.label} brokers keep no deployment id")

    def stored_deployment_id(self, timeout: float) -> str | None:
        """The deployment id kept by the broker, or None; only reads."""
        raise NotImplementedError(f"{self.label} brokers keep no deployment id")
