"""The scale-out soak (bench/soak.py), short: 2 servers, 3 workers, one worker SIGKILLed
with its POST in flight and replaced; every fired event reaches the backend, and an event
that arrives twice carries the same messageId both times.

Redis: a private redis-server (append-only) with a 4 s visibility timeout, so the killed
worker's message comes back within the test. RabbitMQ: the machine's, in a vhost of the
test's own, deleted afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from bench.soak import Plan, passed, rabbitmq_vhost, redis_broker, run_soak

QUICK = Plan(rate=1000, seconds=5, visibility_timeout=4, drain_timeout=30)


@pytest.fixture
def soak_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, int | None]]:
    """(broker URL, pid of a broker the test started, if any)."""
    if request.param == "redis":
        with redis_broker(tmp_path) as (url, broker):
            yield url, broker["pid"]
    else:
        with rabbitmq_vhost("rubrix-soak-test") as url:
            yield url, None


@pytest.mark.slow
@pytest.mark.load  # a minute of scale-out on each broker: on one Python only
@pytest.mark.timeout(120)
@pytest.mark.parametrize("soak_broker", ["redis", "rabbitmq"], indirect=True)
def test_soak_two_servers_three_workers_one_killed_loses_nothing(soak_broker: tuple[str, int | None],
                                                                 tmp_path: Path) -> None:
    url, broker_pid = soak_broker
    result: dict[str, Any] = run_soak(url, QUICK, tmp_path, broker_pid=broker_pid)
    print(result)

    assert result["fired"] == 5000
    # The kill caught the worker mid-delivery: every worker had a POST in flight, and the
    # killed one's never reached the backend, so its events could only come back through
    # the broker.
    assert result["kill"]["posts_in_flight"] == QUICK.workers
    # (How many events that POST carried is noted when the sink can read its body; one CI run
    # on Python 3.13 counted none there, not yet explained, so it is not asserted.)
    assert result["kill"]["posts_discarded"] == 1
    assert [worker["killed"] for worker in result["workers"]] == [True, False, False, False]

    assert result["lost"] == 0, result["lost_examples"]
    assert result["delivered_unique"] == 5000
    assert result["duplicates_other_message_id"] == 0
    assert result["unexpected"] == 0
    for server in result["servers"]:
        assert server["published"] == 2500 and not server["dropped"]
    assert passed(result)
