"""A server whose broker is down or hanging: hooks return promptly, raise nothing, drop and count.
A broker that refuses (a closed port, a wrong password): the server's log line and the worker's
start name the cause; a broker URL mistake stops `celery -A tasks worker` with one line."""

from __future__ import annotations

import pytest

from tests.support import SilentBroker, child_environment, free_port, run_hook_client


@pytest.fixture(params=["refused", "silent"])
def dead_broker_url(request):
    if request.param == "refused":
        yield f"redis://127.0.0.1:{free_port()}/0"
    else:
        broker = SilentBroker()
        yield f"redis://127.0.0.1:{broker.port}/0"
        broker.close()


def test_thousand_hook_calls_return_promptly_when_broker_is_unreachable(dead_broker_url):
    env = child_environment(RUBRIX_TELEMETRY_BROKER_URL=dead_broker_url, RUBRIX_TELEMETRY_BUFFER_SIZE="500")
    report, took = run_hook_client(env, count=1000, flush_timeout=1.0)

    # 1000 calls in well under a second even on a loaded machine: the hooks never wait on the broker.
    assert report["elapsed"] < 1.0, report
    assert report["slowest"] < 0.05, report
    # Nothing reached the broker; 500 were buffered, the other 500 dropped and counted.
    assert report["flushed"] is False
    assert report["stats"]["published"] == 0
    assert report["stats"]["dropped"] == {"buffer_full": 500}
    # Exit waits for the bounded shutdown flush (2 s in the tests), not for the broker.
    assert took < 15, took


def test_an_outage_warns_once_per_interval_from_the_publisher_thread_not_per_request(caplog):
    import dataclasses
    import logging

    from rubrix_hooks import telemetry
    from telemetry_core.contract import LOG_RECORDS_REQUESTED, timestamp_us
    from rubrix_hooks.publisher import Publisher
    from tests.support import wait_until

    def refused(kwargs):
        raise ConnectionRefusedError("broker down")

    settings = dataclasses.replace(telemetry.settings, enabled=True, buffer_size=3, flush_interval=0.05)
    publisher = Publisher(settings, make_sender=lambda: refused)
    caplog.set_level(logging.WARNING, logger="rubrix_hooks.publisher")
    try:
        accepted = [publisher.submit((LOG_RECORDS_REQUESTED, timestamp_us(), "TextClassification", n))
                    for n in range(10)]
        assert accepted.count(True) == 3
        drop_warnings = lambda: [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]  # noqa: E731
        assert wait_until(lambda: drop_warnings(), timeout=5)
        assert drop_warnings() == ["telemetry: dropped 7 events since the last report (buffer_full: 7); "
                                   "the server is not affected"]
        # More drops within the interval (the 3 held events left room for 3 more): counted,
        # and no second line.
        for n in range(10):
            publisher.submit((LOG_RECORDS_REQUESTED, timestamp_us(), "TextClassification", n))
        assert publisher.stats()["dropped"]["buffer_full"] >= 14
        assert not publisher.flush(0.3)  # wakes the thread; the broker is still down
        assert len(drop_warnings()) == 1
        # Written by the publisher thread: a request that drops an event only counts it.
        assert {r.threadName for r in caplog.records if "dropped" in r.getMessage()} == {"rubrix-telemetry-publisher"}
    finally:
        publisher.close(0.1)


BROKER_PASSWORD = "hunter2-broker-secret"


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory):
    from tests.support import RedisServer

    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis-password"), appendonly=False,
                         extra_args=["--requirepass", BROKER_PASSWORD], client_options={"password": BROKER_PASSWORD})
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("refusal", ["closed port", "wrong password"])
def test_the_server_log_names_why_the_broker_refuses_without_the_password(refusal, redis_with_password):
    if refusal == "closed port":
        url, cause = f"redis://:{BROKER_PASSWORD}@127.0.0.1:{free_port()}/0", "Connection refused"
    else:
        url, cause = f"redis://:{BROKER_PASSWORD}-wrong@127.0.0.1:{redis_with_password.port}/0", "invalid"
    env = child_environment(RUBRIX_TELEMETRY_BROKER_URL=url)
    # 5 s: the first publish loads Celery and the transport, over a second on a loaded machine.
    report, _ = run_hook_client(env, count=3, flush_timeout=5.0)

    lines = [line for line in report["stderr"].splitlines() if "cannot reach the broker" in line]
    assert lines, report["stderr"]
    # One line that names the cause, as `status` does, not only the exception's class.
    assert cause in lines[0], lines[0]
    assert BROKER_PASSWORD not in report["stderr"]


# Each mistake in the broker URL or its credentials: what a worker's one line must name.
WORKER_MISTAKES = {
    "Redis database not a number": (lambda redis: f"redis://127.0.0.1:{redis.port}/abc", "abc"),
    "URL kombu cannot parse": (lambda redis: "redis://127.0.0.1:notaport/0", "notaport"),
    "wrong Redis password": (lambda redis: f"redis://:wrong-{BROKER_PASSWORD}@127.0.0.1:{redis.port}/0", "invalid"),
    "no Redis password": (lambda redis: f"redis://127.0.0.1:{redis.port}/0", "Authentication required"),
    "wrong RabbitMQ password": (lambda redis: f"amqp://guest:wrong-{BROKER_PASSWORD}@127.0.0.1:5672//",
                                "ACCESS_REFUSED"),
    "unknown RabbitMQ vhost": (lambda redis: "amqp://guest:guest@127.0.0.1:5672/rubrix-telemetry-no-such-vhost",
                               "NOT_ALLOWED"),
}


@pytest.mark.slow
@pytest.mark.parametrize("mistake", list(WORKER_MISTAKES))
def test_a_broker_mistake_stops_the_worker_with_one_line_and_exit_code_1(mistake, redis_with_password, tmp_path):
    from tests.support import WorkerProcess, wait_until

    url_of, cause = WORKER_MISTAKES[mistake]
    worker = WorkerProcess(child_environment(RUBRIX_TELEMETRY_BROKER_URL=url_of(redis_with_password)),
                           tmp_path / "worker.log")
    try:
        # Celery retries a refused login for ever (100 times, growing pauses): never that.
        wait_until(lambda: worker.process.poll() is not None, timeout=60, interval=0.2)
        assert worker.process.poll() == 1, worker.log()[-3000:]
    finally:
        worker.stop(timeout=5)
    output = worker.log()
    assert "Traceback" not in output, output[-3000:]
    # Celery's superuser warning may come first when the tests run as root; then our line.
    ours = [line for line in output.splitlines() if "RUBRIX_TELEMETRY_BROKER_URL" in line]
    assert len(ours) == 1 and cause in ours[0], output[-3000:]
    assert BROKER_PASSWORD not in output


@pytest.mark.slow
def test_an_unreachable_broker_is_no_mistake_the_worker_keeps_retrying(tmp_path):
    from tests.support import WorkerProcess, wait_until

    worker = WorkerProcess(child_environment(RUBRIX_TELEMETRY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0"),
                           tmp_path / "worker.log")
    try:
        assert wait_until(lambda: "Trying again" in worker.log() or worker.process.poll() is not None, timeout=60)
        assert worker.process.poll() is None, worker.log()[-3000:]
    finally:
        worker.stop()
