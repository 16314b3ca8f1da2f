"""The Celery app of the telemetry workers: `celery -A tasks worker -Q telemetry -E -l INFO`."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any, Callable

import click
from celery import Celery, bootsteps
from celery.exceptions import CPendingDeprecationWarning
from celery.signals import (task_rejected, task_unknown, worker_init, worker_process_shutdown, worker_ready,
                            worker_shutdown)

from telemetry_core.brokers import broker_for
from telemetry_core.brokers.base import BrokerRefusedWorker, QueueMisconfigured
from telemetry_core.contract import DELIVER_TASK_NAME
from telemetry_core.settings import (ConfigurationError, Settings, broker_transport_options, load_settings,
                                     masked_url, report_switch_error, without_password)
from tasks import counters
from tasks.event_flush import EventFlushStep
from tasks.remote_status import delivery_problem  # also registers the command `status` sends

log = logging.getLogger("tasks")


def _started_by_celery_command() -> bool:
    # Celery's command line loads `-A tasks` inside its click command.
    return click.get_current_context(silent=True) is not None


def _stop_the_command(error: str) -> None:
    """Celery's command line would print its usage banner and our traceback, and exit 2:
    one line naming the cause and exit code 1 instead (a caller that imports the app, such
    as `status`, gets the exception)."""
    if _started_by_celery_command():
        raise SystemExit(f"celery -A tasks: {error}") from None


def _load_settings() -> Settings:
    try:
        return load_settings()
    except ConfigurationError as error:
        _stop_the_command(f"configuration error: {error}")
        raise


def _transport_options(settings: Settings) -> dict[str, Any]:
    try:
        return broker_transport_options(settings)
    except OSError as error:  # the embedded queue makes its folders here: under a file, on /proc, ...
        _stop_the_command(f"RUBRIX_TELEMETRY_DATA_DIR={settings.data_dir}: cannot make the queue's folders there "
                          f"({error.filename}: {error.strerror})")
        raise


# The worker's default pool: see `worker_pool` below.
WORKER_THREADS = 128
PREFETCH_MULTIPLIER = 2

# Read at import: `celery -A tasks worker` fails at start-up on a bad value.
settings = _load_settings()
broker = broker_for(settings)
# Before anything resolves the broker's scheme (kombu keeps what it resolved): in the worker, and in
# what imports this app to speak as one (`status`, Flower), whose consumers do not acknowledge and
# so consume as kombu does (redis_take.py). The servers publish with kombu's own transports.
broker.use_worker_transport()

app = Celery("tasks", include=["tasks.deliver"])
app.conf.update(
    broker_url=settings.broker_url_or_default,
    broker_transport_options=_transport_options(settings),
    broker_connection_retry_on_startup=True,
    # A worker must never unpickle a message it did not write itself.
    task_serializer="json",
    result_serializer="json",
    event_serializer="json",
    accept_content=["json"],
    # The message leaves the broker only once the backend has the events (or they were
    # dropped for good). A worker that dies mid-delivery hands its message to another one:
    # Redis after the visibility timeout; the embedded queue at the next worker's start or
    # within seconds (telemetry_core/brokers/embedded.py: kombu's own filesystem transport
    # deletes a message as it is taken, and acks_late alone does not bring it back).
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # Group commit (tasks/group_commit.py): the tasks running at once in a process share one
    # sender, which puts the events of all of them that wait into one POST. On a quiet server each
    # event is a task message of its own, so a backlog drains at about as many events per POST as
    # tasks wait on the sender: threads (they wait on the network and on the sender without
    # holding a core), 128 of them, so that a POST can carry 100 or more one-event messages;
    # prefetch 2 x 128: the threads a POST releases find their next messages in the worker, not a
    # broker round trip away. 256 in flight is at most 256 messages redelivered after a crash and,
    # at the 200-400 one-event messages a second measured on 2 busy cores, about a second of
    # waiting inside the worker, far below any visibility timeout. The command line's
    # `--pool` (prefork is `--pool processes`), `--concurrency` and `--prefetch-multiplier`
    # still override these.
    worker_pool="threads",
    worker_concurrency=WORKER_THREADS,
    worker_prefetch_multiplier=PREFETCH_MULTIPLIER,
    # A delivery under way when the broker connection drops runs to its end (the backend gets
    # the events, the count is kept for later); its ack cannot reach the broker, so the message
    # comes back and is delivered again under the same messageIds. Cancelling it instead (the
    # future default) could cut a POST in the middle and gain nothing. Celery warns about this
    # choice in ten lines at every connection loss; the one line it logs besides says enough.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    task_default_queue=settings.queue,
    # As the broker declares it (on RabbitMQ, with RUBRIX_TELEMETRY_QUEUE_TYPE: `x-queue-type`).
    task_queues=broker.task_queues(),
    task_routes={DELIVER_TASK_NAME: {"queue": settings.queue}},
    task_ignore_result=True,
    # Task events on, so that Flower sees every delivery, retry and failure.
    worker_send_task_events=True,
    task_send_sent_event=True,
    timezone="UTC",
)


class BackendBreaker:
    """Stops the worker taking new work while the backend fails, and resumes once it answers.

    Without it every message of a backlog is tried, fails and becomes a retry with a
    countdown, which Celery keeps in the worker's memory until it is due (celery#2218: about
    11 KB each, outside the prefetch limit): 20,000 waiting messages took a worker from 100 to
    338 MB, and after the backend returned each retry cost a POST of its own. Instead, the
    first failure cancels the worker's task queues: the backlog stays in the broker, untouched,
    and only the few messages already taken are retried. After a pause (the backoff for this many
    pauses in a row, at most a minute, and never before a 429's Retry-After) the
    worker consumes again: its next delivery is the probe. A failure pauses it again, for
    longer; once deliveries succeed the backlog drains at the normal speed.

    Its calls come from the worker's main process (the task Request's on_retry/on_success),
    but not always from the consumer's thread (prefork's result handler may be a thread):
    the queues are cancelled and added back from the consumer's own loop (`call_soon`).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.consumer: Any = None  # set by BackendBreakerStep once the worker's consumer starts
        self.paused_queues: list[str] = []
        self.resume_due = False  # a resume is scheduled: failures meanwhile do not pause again
        self.probing = False  # paused since the last delivery that succeeded
        self._pauses = 0
        self._resumed_at: float | None = None

    def pauses_in_a_row(self) -> int:
        """Pauses since the backend last answered. A failure this long after the last resume
        (the longest pause and one HTTP timeout) is a new outage, probed from the first backoff:
        while the backend fails, a probe fails within an HTTP timeout of the resume."""
        quiet = self.settings.backoff_max + self.settings.http_timeout
        if self._resumed_at is not None and time.monotonic() - self._resumed_at > quiet:
            self._pauses, self._resumed_at = 0, None
        return self._pauses

    def backend_failed(self, pause: float) -> None:
        """Pauses for `pause` seconds, unless a pause is under way (or this is no worker)."""
        consumer = self.consumer
        if consumer is None or self.paused_queues or self.resume_due:
            return
        self._pauses = self.pauses_in_a_row() + 1
        self.resume_due = True
        self.probing = True
        broker.worker_probing(True)  # the probes after the pause take one message, not a batch
        logger = log.warning if self._pauses == 1 else log.info
        # The task's own line just before this one names the cause.
        logger("telemetry: the backend failed: taking no new work for %.1fs, the backlog waits in the broker", pause)
        consumer.call_soon(self._pause, pause)

    def backend_answered(self) -> None:
        """A delivery succeeded (the task request's on_success): the worker takes its messages in
        batches again."""
        if self.probing:
            self.probing = False
            broker.worker_probing(False)

    def _pause(self, seconds: float) -> None:
        consumer = self.consumer
        try:
            queues = [queue.name for queue in consumer.task_consumer.queues]
            for name in queues:
                consumer.cancel_task_queue(name)
            self.paused_queues = queues
        except Exception as error:  # noqa: BLE001 (a connection lost meanwhile: Celery reconnects)
            log.warning("telemetry: could not pause the task queues (%s); going on", type(error).__name__)
        # The consumer's timer: the event loop's own, or a thread (then call_soon hands over).
        consumer.timer.call_after(seconds, self._on_loop(self._resume))

    def _on_loop(self, function: Callable[[], None]) -> Callable[[], None]:
        return lambda: self.consumer.call_soon(function)

    def _resume(self) -> None:
        consumer, self.resume_due, self._resumed_at = self.consumer, False, time.monotonic()
        queues, self.paused_queues = self.paused_queues, []
        try:
            for name in queues:
                consumer.add_task_queue(name)
        except Exception as error:  # noqa: BLE001
            self.paused_queues, self.resume_due = queues, True
            log.warning("telemetry: could not resume the task queues (%s); trying again in 1s", type(error).__name__)
            consumer.timer.call_after(1.0, self._on_loop(self._resume))


backend_breaker = BackendBreaker(settings)


class BackendBreakerStep(bootsteps.StartStopStep):
    """Gives the breaker the worker's consumer, once its task consumer exists."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, parent: Any) -> None:
        backend_breaker.consumer = parent


app.steps["consumer"].add(BackendBreakerStep)
# Task events go out in batches, not one broker publish per task message (tasks/event_flush.py).
app.steps["consumer"].add(EventFlushStep)


@worker_init.connect
def _check_broker(**_: object) -> None:
    """Stops the start with one line when the broker refuses the worker (a wrong password, a
    database or vhost it does not have) or the queue exists with another type: Celery would
    retry a refused login 100 times, or stop with a traceback, and a supervisor restart it
    for ever. A broker that cannot be reached is no mistake: Celery retries it, as before."""
    url = settings.broker_url_or_default
    try:
        broker.prepare_worker(timeout=max(settings.publish_timeout, 5.0))
    except QueueMisconfigured as error:
        print(f"rubrix-telemetry: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except BrokerRefusedWorker as error:
        print(f"celery -A tasks: RUBRIX_TELEMETRY_BROKER_URL={masked_url(url)}: the broker refused the worker: "
              f"{without_password(str(error), url)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    # Held while it runs (the embedded queue: so that no server starts a worker beside it; in
    # the worker a server started, also what stops it once no server is left).
    broker.worker_starting()


@worker_ready.connect
def _quiet_the_cancel_warning(**_: object) -> None:
    # After Celery's logging set-up, which puts its own "always show" filter first.
    warnings.filterwarnings("ignore", category=CPendingDeprecationWarning,
                            message=r"\s*In Celery 5.1 we introduced an optional breaking change")


@worker_ready.connect
def _announce(**_: object) -> None:
    if settings.switch_error:  # logged here, once the worker's logging is set up
        report_switch_error(settings)
    elif not settings.enabled:
        log.warning("telemetry is switched off by %s: events are acknowledged and dropped, nothing is sent",
                    settings.decided_by)
    elif delivery_problem(settings):
        log.error("telemetry: %s", delivery_problem(settings))
    else:
        log.info("telemetry: delivering to %s from broker %s", masked_url(settings.endpoint),
                 masked_url(settings.broker_url_or_default))


# Messages refused before our task runs (not JSON, not a task body, a task we do not have)
# are logged by Celery; count them with the rest, so that `status` shows them. The unit is
# a message: what it carried was never read.
@task_rejected.connect
def _count_rejected(exc: BaseException | None = None, **_: object) -> None:
    reason = type(exc).__name__ if exc is not None else "unknown message format"
    counters.record(settings, dropped={f"rejected message ({reason})": 1})


@task_unknown.connect
def _count_unknown(**_: object) -> None:
    counters.record(settings, dropped={"rejected message (unregistered task)": 1})


# Counts the broker could not take (it was down) are retried in the background; a stopping
# worker (or pool process) tries once more, and says what it could not write.
@worker_process_shutdown.connect
@worker_shutdown.connect
def _write_held_counts(**_: object) -> None:
    unwritten = counters.write_unwritten(settings)
    if unwritten:
        log.warning("telemetry: stopping with counts the broker did not take, missing from status: %s", unwritten)
