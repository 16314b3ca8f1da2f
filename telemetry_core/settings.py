"""Every setting of rubrix-telemetry, read from the environment in this one place.

Server hooks and Celery workers read the same variables, so one `.env` configures both.
A bad value raises `ConfigurationError` naming the variable, at start-up (import of the
hooks, `celery -A tasks worker`, any `rubrix-telemetry` command), never later.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")

log = logging.getLogger("telemetry_core.settings")

# The spellings pydantic's bool accepted for Rubrix 0.18's RUBRIX_ENABLE_TELEMETRY (any case,
# surrounding spaces ignored); DO_NOT_TRACK, the cross-tool convention, reads the same way.
TRUE_VALUES = ("1", "true", "t", "yes", "y", "on")
FALSE_VALUES = ("0", "false", "f", "no", "n", "off")
SEGMENT_ENDPOINT = "https://api.segment.io"
# The URL scheme of the embedded on-disk queue (telemetry_core/brokers/embedded.py), the default.
EMBEDDED_SCHEME = "embedded"
QUEUE_TYPES = ("classic", "quorum")


class ConfigurationError(ValueError):
    """A setting in the environment has a value we cannot use."""


@dataclass(frozen=True)
class Settings:
    enabled: bool
    # Which variable decided `enabled` ("RUBRIX_ENABLE_TELEMETRY", "DO_NOT_TRACK" or "default").
    decided_by: str
    data_dir: Path
    # None means the embedded on-disk queue in `data_dir` (see `broker_url_or_default`).
    broker_url: str | None
    endpoint: str
    write_key: str | None = field(repr=False)
    queue: str
    buffer_size: int
    flush_interval: float
    events_per_task: int
    publish_timeout: float
    shutdown_timeout: float
    backoff_base: float
    backoff_max: float
    # The most events that may wait in the broker (queued, held by workers, waiting for a
    # retry); beyond it a server drops new events and counts them.
    max_backlog: int
    # The most bytes the broker may hold for them, as it accounts for them (brokers that can
    # tell: `Broker.backlog_bytes`); beyond it a server drops new events too.
    max_backlog_bytes: int
    # Seconds after its hook fired when an event is no longer delivered (dropped, `expired`).
    max_event_age: float
    visibility_timeout: float
    http_timeout: float
    # RabbitMQ only: the queue's type, and the broker's consumer_timeout as we know it.
    queue_type: str
    consumer_timeout: float
    # The embedded queue: whether a server starts a worker alongside when none consumes.
    embedded_worker: bool = True
    # RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS: merged over ours (`broker_transport_options`).
    extra_transport_options: dict[str, Any] = field(default_factory=dict, hash=False)
    # Set when a switch variable holds a value that is neither true nor false: telemetry is
    # then off, and this is the one line that says why (logged at start; CLI exit 1).
    switch_error: str | None = None

    @property
    def broker_url_or_default(self) -> str:
        return self.broker_url or f"{EMBEDDED_SCHEME}://localhost//"

    @property
    def is_segment(self) -> bool:
        host = urlsplit(self.endpoint).hostname or ""
        return host == "segment.io" or host.endswith((".segment.io", ".segment.com"))

    @property
    def lacks_write_key(self) -> bool:
        """Telemetry is on, the endpoint is Segment's and there is no write key: Segment refuses
        every batch, so a worker with these settings drops every event."""
        return self.enabled and self.is_segment and not self.write_key


class Switch(NamedTuple):
    enabled: bool
    # The variable that decided: "RUBRIX_ENABLE_TELEMETRY", "DO_NOT_TRACK" or "default".
    decided_by: str
    error: str | None = None


def _switch_value(environ: Mapping[str, str], name: str) -> bool | str | None:
    """True or False for a true or false spelling, None when unset or empty, else the raw value."""
    raw = environ.get(name)
    value = (raw or "").strip().lower()
    if not value:
        return None
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    return raw


def telemetry_switch(environ: Mapping[str, str]) -> Switch:
    """Whether telemetry is on, the variable that decided, and why when a value was not understood.

    One rule for server and worker: RUBRIX_ENABLE_TELEMETRY false, or DO_NOT_TRACK true, is
    off. A value of either that is neither true nor false is off too, with an error naming
    it: an opt-out with a typo must never leave telemetry on.
    """
    enable = _switch_value(environ, "RUBRIX_ENABLE_TELEMETRY")
    do_not_track = _switch_value(environ, "DO_NOT_TRACK")
    if enable is False:
        return Switch(False, "RUBRIX_ENABLE_TELEMETRY")
    for name, value in (("RUBRIX_ENABLE_TELEMETRY", enable), ("DO_NOT_TRACK", do_not_track)):
        if isinstance(value, str):
            return Switch(False, name, f"{name}={value!r} is neither true nor false, so telemetry is OFF; "
                                       f"accepted (any case): {'/'.join(TRUE_VALUES)} or {'/'.join(FALSE_VALUES)}")
    if do_not_track is True:
        return Switch(False, "DO_NOT_TRACK")
    if enable is True:
        return Switch(True, "RUBRIX_ENABLE_TELEMETRY")
    return Switch(True, "default")


_reported_switch_errors: set[str] = set()


def report_switch_error(settings: Settings) -> None:
    """Logs the switch's error once per process (hooks, worker and a CLI command may each
    read the settings)."""
    if settings.switch_error and settings.switch_error not in _reported_switch_errors:
        _reported_switch_errors.add(settings.switch_error)
        log.error("telemetry: %s", settings.switch_error)


def _default_data_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "rubrix-telemetry"


def _read(environ: Mapping[str, str], name: str, default: T, parse: Callable[[str], T], rule: str) -> T:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse(raw.strip())
    except (ValueError, TypeError):
        password = _password_of(raw)  # a URL's password is never echoed
        shown = raw.replace(password, "***") if password else raw
        raise ConfigurationError(f"{name} must be {rule}, got {shown!r}") from None


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    return _read(environ, name, default, _positive_float, "a positive number of seconds")


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError
    return value


def _http_url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError
    return raw.rstrip("/")


def _check_endpoint(endpoint: str) -> None:
    """A user or password in the endpoint's URL would never be used: the workers sign in with
    the write key as the user name (HTTP Basic), which overrides them. Refused, masked."""
    parts = urlsplit(endpoint)
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(f"RUBRIX_TELEMETRY_ENDPOINT={masked_url(endpoint)} has a user or password in it, "
                                 "which would never be used (the workers sign in with RUBRIX_TELEMETRY_KEY as "
                                 "the user name): take them out of the URL")


def _broker_url(raw: str) -> str | None:
    if "://" not in raw:
        raise ValueError
    # `status` shows the default queue as embedded://localhost//: set, that URL means the default.
    return None if urlsplit(raw).scheme == EMBEDDED_SCHEME else raw


def _check_broker_scheme(url: str) -> None:
    """An unknown scheme is a configuration error at start, not a KeyError deep in kombu."""
    from kombu.transport import TRANSPORT_ALIASES  # only when a broker URL is set

    scheme = urlsplit(url).scheme
    # kombu reads `transport+url` (sqla+postgresql://, redis+socket://) by its first part.
    if scheme.partition("+")[0] not in TRANSPORT_ALIASES:
        raise ConfigurationError(f"RUBRIX_TELEMETRY_BROKER_URL has an unknown broker scheme {scheme + '://'!r}: "
                                 f"use one of kombu's, e.g. redis://, rediss://, sentinel://, amqp://")


TRANSPORT_OPTIONS_VARIABLE = "RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS"


def _transport_options(env: Mapping[str, str]) -> dict[str, Any]:
    raw = env.get(TRANSPORT_OPTIONS_VARIABLE, "")
    if not raw.strip():
        return {}
    rule = f'{TRANSPORT_OPTIONS_VARIABLE} must be a JSON object such as {{"master_name": "mymaster"}}'
    # The value is not echoed: it may hold a password (sentinel_kwargs).
    try:
        value = json.loads(raw)
    except ValueError as error:
        raise ConfigurationError(f"{rule}: {error}") from None
    if not isinstance(value, dict):
        raise ConfigurationError(f"{rule}, got a JSON {type(value).__name__}")
    return value


def _check_transport_options(settings: Settings) -> None:
    extra = settings.extra_transport_options
    # The visibility timeout has its own variable, checked against BACKOFF_MAX below.
    if "visibility_timeout" in extra:
        raise ConfigurationError(f"{TRANSPORT_OPTIONS_VARIABLE} must not set visibility_timeout: "
                                 "use RUBRIX_TELEMETRY_VISIBILITY_TIMEOUT")


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ValueError


# Events waiting in the broker at most. An event takes about 100 bytes in a task message
# (format 2), so the bound keeps the broker's share to about 10 MB.
DEFAULT_MAX_BACKLOG = 100_000
# Bytes the broker may hold for the waiting messages. A quiet server sends one event per task
# message, and a message costs a broker about 1.7 KB whatever it carries: without this bound,
# 100,000 such events took 197 MB of Redis. 40 MiB keeps more than 20,000 of them (a quiet
# server's events of weeks), and the broker's share under 64 MB.
DEFAULT_MAX_BACKLOG_BYTES = 40 << 20
MAX_EVENT_AGE_VARIABLE = "RUBRIX_TELEMETRY_MAX_EVENT_AGE"
DEPRECATED_MAX_RETRY_DURATION = "RUBRIX_TELEMETRY_MAX_RETRY_DURATION"
_reported_deprecations: set[str] = set()


def _max_event_age(env: Mapping[str, str]) -> float:
    """RUBRIX_TELEMETRY_MAX_EVENT_AGE, or the variable it replaces (with one warning a process)."""
    if (env.get(MAX_EVENT_AGE_VARIABLE) or "").strip() or not (env.get(DEPRECATED_MAX_RETRY_DURATION) or "").strip():
        return _seconds(env, MAX_EVENT_AGE_VARIABLE, 86_400.0)
    if DEPRECATED_MAX_RETRY_DURATION not in _reported_deprecations:
        _reported_deprecations.add(DEPRECATED_MAX_RETRY_DURATION)
        log.warning("telemetry: %s is deprecated: set %s (seconds after an event's hook fired when it is "
                    "dropped as expired) instead", DEPRECATED_MAX_RETRY_DURATION, MAX_EVENT_AGE_VARIABLE)
    return _seconds(env, DEPRECATED_MAX_RETRY_DURATION, 86_400.0)


def _queue_name(raw: str) -> str:
    if not raw.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError
    return raw


def _queue_type(raw: str) -> str:
    if raw.lower() not in QUEUE_TYPES:
        raise ValueError
    return raw.lower()


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    switch = telemetry_switch(env)
    settings = Settings(
        enabled=switch.enabled,
        decided_by=switch.decided_by,
        switch_error=switch.error,
        data_dir=Path(_read(env, "RUBRIX_TELEMETRY_DATA_DIR", str(_default_data_dir(env)), str, "a folder path")),
        broker_url=_read(env, "RUBRIX_TELEMETRY_BROKER_URL", None, _broker_url,
                         "a broker URL such as redis://host:6379/0"),
        endpoint=_read(env, "RUBRIX_TELEMETRY_ENDPOINT", SEGMENT_ENDPOINT, _http_url,
                       "an http(s) URL such as https://api.segment.io"),
        write_key=env.get("RUBRIX_TELEMETRY_KEY") or None,
        queue=_read(env, "RUBRIX_TELEMETRY_QUEUE", "telemetry", _queue_name,
                    "a queue name of letters, digits, '-', '_' and '.'"),
        buffer_size=_read(env, "RUBRIX_TELEMETRY_BUFFER_SIZE", 10_000, _positive_int, "a positive integer"),
        flush_interval=_seconds(env, "RUBRIX_TELEMETRY_FLUSH_INTERVAL", 0.2),
        # Each task message costs the server ~2 ms of CPU to publish and the worker ~4 ms to
        # take and deliver, whatever it carries (docs/benchmarks.md); the publisher fills a
        # task only as far as events are waiting, so quiet servers still send small ones.
        events_per_task=_read(env, "RUBRIX_TELEMETRY_EVENTS_PER_TASK", 500, _positive_int, "a positive integer"),
        publish_timeout=_seconds(env, "RUBRIX_TELEMETRY_PUBLISH_TIMEOUT", 1.0),
        shutdown_timeout=_seconds(env, "RUBRIX_TELEMETRY_SHUTDOWN_TIMEOUT", 5.0),
        backoff_base=_seconds(env, "RUBRIX_TELEMETRY_BACKOFF_BASE", 2.0),
        backoff_max=_seconds(env, "RUBRIX_TELEMETRY_BACKOFF_MAX", 600.0),
        max_backlog=_read(env, "RUBRIX_TELEMETRY_MAX_BACKLOG", DEFAULT_MAX_BACKLOG, _positive_int,
                          "a positive integer"),
        max_backlog_bytes=_read(env, "RUBRIX_TELEMETRY_MAX_BACKLOG_BYTES", DEFAULT_MAX_BACKLOG_BYTES, _positive_int,
                                "a positive integer (bytes)"),
        max_event_age=_max_event_age(env),
        visibility_timeout=_seconds(env, "RUBRIX_TELEMETRY_VISIBILITY_TIMEOUT", 3600.0),
        http_timeout=_seconds(env, "RUBRIX_TELEMETRY_HTTP_TIMEOUT", 10.0),
        queue_type=_read(env, "RUBRIX_TELEMETRY_QUEUE_TYPE", "classic", _queue_type, "classic or quorum"),
        consumer_timeout=_seconds(env, "RUBRIX_TELEMETRY_CONSUMER_TIMEOUT", 1800.0),
        extra_transport_options=_transport_options(env),
        embedded_worker=_read(env, "RUBRIX_TELEMETRY_EMBEDDED_WORKER", True, _bool,
                              f"{'/'.join(TRUE_VALUES)} or {'/'.join(FALSE_VALUES)}"),
    )
    _check_endpoint(settings.endpoint)
    if settings.broker_url is not None:
        _check_broker_scheme(settings.broker_url)
    _check_transport_options(settings)
    from telemetry_core.brokers import broker_for  # the brokers import this module

    broker = broker_for(settings)
    broker.check_settings()
    # A retry waits its countdown in a message the worker holds unacknowledged (acks_late; a
    # Celery retry is a new message with an ETA, which the worker keeps until it is due). Held
    # longer than the broker allows, it is redelivered to a second worker (Redis: visibility
    # timeout), or RabbitMQ closes the worker's channel (consumer_timeout, celery#6760):
    # refuse such a configuration outright.
    limit_name, limit = broker.redelivery_limit()
    if settings.backoff_max >= limit:
        raise ConfigurationError(
            f"RUBRIX_TELEMETRY_BACKOFF_MAX must be below {limit_name} ({settings.backoff_max:g} >= {limit:g})"
        )
    if settings.backoff_base > settings.backoff_max:
        raise ConfigurationError(
            "RUBRIX_TELEMETRY_BACKOFF_BASE must not exceed RUBRIX_TELEMETRY_BACKOFF_MAX "
            f"({settings.backoff_base:g} > {settings.backoff_max:g})"
        )
    return settings


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """kombu transport options shared by the server's publisher and the workers: the broker's
    own, with RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS over them (Sentinel's master_name, ...)."""
    from telemetry_core.brokers import broker_for

    return {**broker_for(settings).transport_options(), **settings.extra_transport_options}


def masked_url(url: str) -> str:
    """The URL with any password replaced by ***, for logs and status output; each of a
    list of URLs separated by ';' (kombu's failover list, Sentinel's nodes) too."""
    if ";" in url:
        return ";".join(masked_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def without_password(text: str, url: str) -> str:
    """`text` on one line, with every password of the URL (or of each URL of a ';' list:
    kombu's failover list, Sentinel's nodes) masked: for an error's text in a log line."""
    for part in url.split(";"):
        password = _password_of(part)
        if password:
            text = text.replace(password, "***")
    return " ".join(text.split())  # one line, whatever the library wrote


def _password_of(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:  # a URL urllib cannot split holds no password it could find either
        return None


def error_text(error: BaseException, url: str) -> str:
    """An error as operators are told it: its class and its message, password masked."""
    text = without_password(str(error), url)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
