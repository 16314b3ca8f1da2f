"""The Redis client of the broker, as kombu builds it, for the counts and `status`.

One parser for the broker URL: kombu's, the one Celery itself connects with. redis-py's own
`from_url` reads `rediss://...?ssl_cert_reqs=CERT_REQUIRED` differently and knows nothing
of `sentinel://`; kombu's channel gives a `redis.Redis` with the URL's TLS options, the
password or ACL user, and, on Sentinel, a pool that finds the current master by itself
(after a failover too), all with RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS applied.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator
from urllib.parse import urlsplit

from rubrix_hooks.settings import Settings, broker_transport_options

# The kombu transports that keep their queues in Redis.
REDIS_SCHEMES = frozenset({"redis", "rediss", "sentinel"})


def uses_redis(settings: Settings) -> bool:
    return not settings.uses_embedded_broker and urlsplit(settings.broker_url_or_default).scheme in REDIS_SCHEMES


class BrokerRedis:
    """A kombu connection to the broker and the `redis.Redis` of its channel (`client`)."""

    def __init__(self, settings: Settings, timeout: float) -> None:
        from kombu import Connection
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # Fail fast: `timeout` seconds to connect (each Sentinel node, then the master) and
        # to answer, and no connection retries, whatever the shared options say (redis-py
        # retries each Sentinel node 3 times by default: 7 s for two dead ones).
        options = broker_transport_options(settings)
        sentinel_options = {**options.get("sentinel_kwargs", {}), "socket_connect_timeout": timeout,
                            "socket_timeout": timeout, "retry": Retry(NoBackoff(), 0)}
        options.update(socket_connect_timeout=timeout, socket_timeout=timeout, max_retries=0,
                       sentinel_kwargs=sentinel_options)
        self.connection = Connection(settings.broker_url_or_default, transport_options=options,
                                     connect_timeout=timeout)
        try:
            # Creating the channel connects (and pings): a dead broker raises here.
            self.client: Any = self.connection.default_channel.client
        except Exception as error:
            self.connection.release()
            # redis-py appends the repr of a client per Sentinel node: keep the sentence.
            if str(error).startswith("No master found"):
                raise ConnectionError(f"{str(error).split(' : ')[0]}: no Sentinel answers with it") from None
            raise

    def close(self) -> None:
        self.connection.release()


@contextlib.contextmanager
def broker_redis(settings: Settings, timeout: float) -> Iterator[Any]:
    """The broker's `redis.Redis` for the length of a `with` block."""
    broker = BrokerRedis(settings, timeout)
    try:
        yield broker.client
    finally:
        broker.close()
