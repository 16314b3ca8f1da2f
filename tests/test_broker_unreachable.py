"""A server whose broker is down or hanging: hooks return promptly, raise nothing, drop and count."""

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
