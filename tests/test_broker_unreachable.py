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
