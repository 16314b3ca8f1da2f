"""Redis as the broker (`redis://`, `rediss://` for TLS, `sentinel://`): kombu's Redis transport,
and what rubrix-telemetry keeps there besides the queue.

- The queue is a Redis list; messages a worker took and has not acknowledged (being
  delivered, or held for a retry countdown) wait in the hash `unacked` (transport option
  `unacked_key`) until the visibility timeout gives them to another worker.
- The backlog (`RedisBroker.backlog`) is a running count of events in a hash, kept true by
  a recount in slices (`redis_backlog`); its bytes are Redis's own accounting of the list
  and the unacked hash (`MEMORY USAGE`).
- The delivery counts are the hash COUNTS_KEY (HINCRBY is atomic across workers).
- The deployment id is the key DEPLOYMENT_ID_KEY, set once with SET NX.

One parser for the broker URL: kombu's, the one Celery itself connects with. redis-py's own
`from_url` reads `rediss://...?ssl_cert_reqs=CERT_REQUIRED` differently and knows nothing
of `sentinel://`; kombu's channel gives a `redis.Redis` with the URL's TLS options, the
password or ACL user, and, on Sentinel, a pool that finds the current master by itself
(after a failover too), all with RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS applied.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qsl, urlsplit

from telemetry_core.brokers import redis_backlog
from telemetry_core.brokers.base import Broker, BrokerRefusedWorker, QueueState
from telemetry_core.settings import ConfigurationError, Settings, broker_transport_options

log = logging.getLogger("telemetry_core.brokers.redis")

COUNTS_KEY = "rubrix-telemetry:counts"
DEPLOYMENT_ID_KEY = "rubrix-telemetry:installation-id"
# Redis on a Unix socket, as kombu spells it: redis+socket:///path/redis.sock[?virtual_host=N].
SOCKET_SCHEME = "redis+socket"
# kombu's defaults for the transport options `unacked_key` and `unacked_index_key`.
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
# MEMORY USAGE samples this many elements of a list or hash and extrapolates: its cost stays
# the same whatever waits.
MEMORY_SAMPLES = 5


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


_clients: dict[tuple[int, str, float], BrokerRedis] = {}


def process_client(settings: Settings, timeout: float) -> Any:
    """This process's Redis client of the broker: one connection pool per process, never
    shared across a fork. It reconnects by itself (on Sentinel, to the current master)."""
    key = (os.getpid(), settings.broker_url_or_default, timeout)
    if key not in _clients:
        _clients[key] = BrokerRedis(settings, timeout)
    return _clients[key].client


class RedisCounts:
    """The deployment's counts in one Redis hash."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def add(self, increments: Mapping[str, int]) -> None:
        # MULTI/EXEC: all of the increments or none, so that a retry adds nothing twice.
        pipe = self._client.pipeline(transaction=True)
        for name, n in increments.items():
            pipe.hincrby(COUNTS_KEY, name, n)
        pipe.execute()

    def read(self) -> dict[str, int]:
        return dict(self._client.hgetall(COUNTS_KEY))


def _refusal(error: BaseException) -> str | None:
    """The cause when Redis refused the client for good (its credentials, its database); None
    when it could not be reached."""
    import ssl

    from redis.exceptions import AuthenticationError, AuthenticationWrongNumberOfArgsError, ResponseError

    seen: BaseException | None = error
    while seen is not None:  # kombu re-raises a library's error as its own, the original as the cause
        if isinstance(seen, ssl.SSLError):  # TLS (a ValueError too): left to Celery's retries
            return None
        if isinstance(seen, (AuthenticationError, AuthenticationWrongNumberOfArgsError, ValueError)):
            return str(seen) or type(seen).__name__
        if isinstance(seen, ResponseError) and str(seen).split(" ", 1)[0] in ("WRONGPASS", "NOAUTH", "NOPERM"):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


def _as_id(stored: Any) -> str | None:
    return None if stored is None else str(uuid.UUID(stored.decode() if isinstance(stored, bytes) else str(stored)))


class RedisBroker(Broker):
    label = "Redis"
    keeps_counts = True
    keeps_deployment_id = True

    def check_settings(self) -> None:
        super().check_settings()
        # kombu would only say so inside the worker's connection loop, and the server never.
        if self.scheme == "sentinel" and not self.settings.extra_transport_options.get("master_name"):
            raise ConfigurationError("a sentinel:// RUBRIX_TELEMETRY_BROKER_URL needs the master's name in "
                                     'RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS, e.g. {"master_name": "mymaster"}')

    def url_parts(self, url: str) -> Mapping[str, Any]:
        # redis+socket:///path/redis.sock: kombu's Redis channel reads the path as the socket and
        # the database from `?virtual_host=N` (0 without it); its `parse_url` takes the path for
        # the database, and fails on that query.
        parts = urlsplit(url)
        if parts.scheme != SOCKET_SCHEME:
            return super().url_parts(url)
        return {"transport": parts.scheme, "virtual_host": dict(parse_qsl(parts.query)).get("virtual_host", "")}

    def url_problem(self, parts: Mapping[str, Any]) -> str | None:
        # kombu's rule (transport/redis.py `_prepare_virtual_host`), checked before its
        # traceback: an optional leading '/', then a number.
        database = parts.get("virtual_host") or ""
        database = database[1:] if database.startswith("/") else database
        if database not in ("", "/") and not database.isdigit():
            return f"the Redis database is a number (0, 1, ...), not {database!r}"
        return None

    def use_worker_transport(self) -> None:
        from telemetry_core.brokers import redis_take

        redis_take.use_in_this_process()  # many messages per round trip: redis_take's docstring

    def worker_probing(self, probing: bool) -> None:
        from telemetry_core.brokers import redis_take

        redis_take.set_probing(probing)

    def prepare_worker(self, timeout: float) -> None:
        try:
            with broker_redis(self.settings, timeout):  # connecting pings it, with the URL's credentials
                pass
        except Exception as error:  # noqa: BLE001 (an unreachable broker is Celery's to retry)
            refusal = _refusal(error)
            if refusal is not None:
                raise BrokerRefusedWorker(refusal) from None

    def transport_options(self) -> dict[str, Any]:
        settings = self.settings
        restore_interval = max(1, min(10, int(settings.visibility_timeout // 10) or 1))
        return {
            "visibility_timeout": settings.visibility_timeout,
            # kombu restores a dead worker's unacked messages only when its timer fires
            # (every interval) and then only every `throttle` firings: 10 s x 10 by default.
            # Tie both to the visibility timeout so recovery takes about that long, no more.
            "unacked_restore_interval": restore_interval,
            "unacked_restore_throttle": 1,
            # The restore runs under a Redis lock that expires after this long (kombu: 300 s). A
            # worker killed while it held it (a restore takes a millisecond, but a busy worker's
            # 128 threads stretch it) held up every restore for 5 minutes: five intervals instead.
            "unacked_mutex_expire": 5 * restore_interval,
            "socket_connect_timeout": settings.publish_timeout,
            "socket_timeout": max(settings.publish_timeout, 5.0),
            "retry_on_timeout": False,
        }

    def _option(self, name: str, default: str) -> str:
        return str(self.settings.extra_transport_options.get(name, default))

    def queue_state(self, timeout: float) -> QueueState:
        with broker_redis(self.settings, timeout) as client:  # connecting pings it
            return QueueState(depth=int(client.llen(self.settings.queue)),
                              held=int(client.hlen(self._option("unacked_key", UNACKED_KEY))))

    def backlog(self, timeout: float, under: int | None = None) -> int | None:
        # The running count: one round trip whatever waits (`under` needs no cheaper look).
        client = process_client(self.settings, timeout)
        count, recount_due = redis_backlog.read_count(client, self.settings.queue)
        if recount_due:
            redis_backlog.recount_in_background(client, self.settings.queue, self._option("unacked_key", UNACKED_KEY),
                                                self.settings.events_per_task)
        return count

    def backlog_bytes(self, timeout: float) -> int | None:
        # Redis's own accounting, sampled: the list, the unacked hash and its index (every
        # queue's messages that workers hold: give telemetry a database of its own).
        from redis.exceptions import ResponseError

        pipe = process_client(self.settings, timeout).pipeline(transaction=False)
        for key in (self.settings.queue, self._option("unacked_key", UNACKED_KEY),
                    self._option("unacked_index_key", UNACKED_INDEX_KEY)):
            pipe.memory_usage(key, samples=MEMORY_SAMPLES)
        try:
            return sum(int(size or 0) for size in pipe.execute())
        except ResponseError as refused:  # an ACL user without MEMORY: it answers, but cannot tell
            log.debug("telemetry: Redis does not tell the backlog's bytes: %s", refused)
            return None

    def message_published(self, events: int) -> None:
        try:
            redis_backlog.add_published(process_client(self.settings, self.settings.publish_timeout),
                                        self.settings.queue, events)
        except Exception as error:  # noqa: BLE001 (the recount finds what this misses)
            log.debug("telemetry: could not add a message to the backlog count: %r", error)

    def message_settled(self, events: int) -> None:
        try:
            redis_backlog.subtract_settled(process_client(self.settings, self.settings.publish_timeout),
                                           self.settings.queue, events)
        except Exception as error:  # noqa: BLE001 (the recount finds what this misses)
            log.debug("telemetry: could not take a message from the backlog count: %r", error)

    def backlog_method(self) -> str:
        return (f"a running count of the events published and settled, recounted from each message's header "
                f"every {redis_backlog.RECOUNT_INTERVAL}s in slices; bytes: Redis's MEMORY USAGE of the list and "
                "the unacked hash")

    def counts_store(self, timeout: float) -> RedisCounts:
        return RedisCounts(process_client(self.settings, timeout))

    def shared_deployment_id(self, offered: str, timeout: float) -> str:
        client = process_client(self.settings, timeout)
        client.set(DEPLOYMENT_ID_KEY, offered, nx=True)  # atomic: exactly one first value wins
        shared = _as_id(client.get(DEPLOYMENT_ID_KEY))
        if shared is None:
            raise LookupError(f"{DEPLOYMENT_ID_KEY} was deleted as it was set")
        return shared

    def stored_deployment_id(self, timeout: float) -> str | None:
        return _as_id(process_client(self.settings, timeout).get(DEPLOYMENT_ID_KEY))
