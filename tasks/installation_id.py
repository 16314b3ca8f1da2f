"""The anonymous id of this deployment: random, stable across restarts, one-way, and one for
all the workers of a deployment whichever host or data folder delivers.

Rubrix 0.18 used `uuid.UUID(int=uuid.getnode())`, which is the MAC address in disguise.
Ours is a random UUID: it says nothing about the machine. Where it is kept:
- on Redis (redis://, rediss://, sentinel://), in the broker itself (`telemetry_core.brokers.redis`): the
  first worker to deliver sets it with an atomic set-if-absent, every other worker reads
  it, and Redis's persistence keeps it across restarts. The first value offered is the id
  already in that worker's data folder, so an installation that had one keeps it;
- on the embedded queue, in the data folder: the queue lives there too, so the server and
  its workers share it by construction;
- on RabbitMQ, which keeps no values, as the first message of a durable stream of the vhost
  (`telemetry_core.brokers.rabbitmq.shared_deployment_id`): a worker that finds the stream empty
  appends its data folder's id, and every worker reads the first one;
- in the data folder only, when the broker cannot be asked (it does not answer, it refuses
  the user, or it is a RabbitMQ older than 3.9, which has no streams): one warning, and the
  broker is asked again BROKER_RETRY_PERIOD later; the deliveries in between use the data
  folder's id without asking, so a broker that takes seconds to fail costs that once a period.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from pathlib import Path

from telemetry_core.brokers import broker_for
from telemetry_core.settings import Settings

log = logging.getLogger("tasks.installation_id")
FILE_NAME = "installation-id"


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii").strip()
        return str(uuid.UUID(text))
    except (OSError, ValueError):
        return None


def stored_installation_id(data_dir: Path) -> str | None:
    """The id if one is stored already; never creates it (for `rubrix-telemetry preview`)."""
    return _read(data_dir / FILE_NAME)


@functools.cache
def installation_id(data_dir: Path) -> str:
    path = data_dir / FILE_NAME
    existing = _read(path)
    if existing:
        return existing
    new_id = str(uuid.uuid4())
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        # A draft of this call's own: named by pid, two containers sharing the folder (both
        # pid 1) wrote the same draft, and one linked the other's id while returning its own.
        draft = data_dir / f".{FILE_NAME}.{uuid.uuid4().hex}"
        draft.write_text(new_id + "\n", encoding="ascii")
        try:
            # link() never replaces: when two workers start together, exactly one
            # complete id wins.
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink(missing_ok=True)
        # What the folder keeps, whoever won: every worker sends that one.
        return _read(path) or new_id
    except OSError as error:
        log.warning("telemetry: cannot store the installation id in %s (%s); using one for this process only",
                    data_dir, error.strerror)
        return new_id


# How long after a failed ask the deliveries use the data folder's id without asking: a
# RabbitMQ stream that stays "starting" costs STREAM_START_WAIT (10 s) per ask.
BROKER_RETRY_PERIOD = 60.0

# By (process, broker URL): the broker's answer, kept for the process; or when to ask again.
_deployment_ids: dict[tuple[int, str], str] = {}
_ask_again_at: dict[tuple[int, str], float] = {}
_store_warned = False


def deployment_id(settings: Settings) -> str:
    """The anonymousId every event of this deployment carries (see the module's docstring).

    When the broker cannot be asked, the deliveries of the next BROKER_RETRY_PERIOD seconds use
    the data folder's id without asking; the first failure is a warning, each later one a line
    at INFO (at most one a period).
    """
    global _store_warned
    local = installation_id(settings.data_dir)
    broker = broker_for(settings)
    if not broker.keeps_deployment_id:
        return local
    key = (os.getpid(), settings.broker_url_or_default)
    if key in _deployment_ids:
        return _deployment_ids[key]
    if time.monotonic() < _ask_again_at.get(key, 0.0):
        return local
    try:
        shared = broker.shared_deployment_id(local, timeout=_broker_timeout(settings))
    except Exception as error:  # noqa: BLE001 (the delivery must go on; the id is asked again later)
        _ask_again_at[key] = time.monotonic() + BROKER_RETRY_PERIOD
        # The cause's class only: an error's text may carry the broker URL.
        line = ("telemetry: cannot read the deployment id from the broker (%s); using this data folder's id, "
                "asking again in %gs")
        if _store_warned:
            log.info(line, type(error).__name__, BROKER_RETRY_PERIOD)
        else:
            _store_warned = True
            log.warning(line, type(error).__name__, BROKER_RETRY_PERIOD)
        return local
    _ask_again_at.pop(key, None)
    _deployment_ids[key] = shared
    return shared


def stored_deployment_id(settings: Settings) -> tuple[str | None, str]:
    """The id the workers would send, and where it was read; never creates one (for
    `rubrix-telemetry preview`). With telemetry off, the broker is not asked."""
    local = stored_installation_id(settings.data_dir)
    broker = broker_for(settings)
    if not settings.enabled or not broker.keeps_deployment_id:
        return local, "this data folder"
    try:
        shared = broker.stored_deployment_id(timeout=_broker_timeout(settings))
    except Exception as error:  # noqa: BLE001 (a preview says what it could not read, it does not fail)
        return local, f"this data folder: the broker could not be read ({type(error).__name__})"
    if shared is None:
        return local, "this data folder: the broker has none yet, the first delivery offers this one"
    return shared, "the broker"


def _broker_timeout(settings: Settings) -> float:
    return max(settings.publish_timeout, 2.0)
