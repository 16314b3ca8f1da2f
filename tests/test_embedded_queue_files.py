"""The embedded queue's files (rubrix_hooks/embedded_queue.py): a consumer never takes a message
still being written, and a file in the broker folder the worker cannot open does not stop it.

Figures in docs/reliability.md, "Lost or silently dropped events on the embedded queue".
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from kombu import Connection

from rubrix_hooks.settings import broker_transport_options, load_settings
from tests.support import REPO_ROOT, child_environment, wait_until

QUEUE = "telemetry"


def _connection(data_dir: Path) -> Connection:
    """A kombu connection to the embedded queue in `data_dir`, configured as server and workers are."""
    settings = replace(load_settings(), broker_url=None, data_dir=data_dir)
    return Connection(settings.broker_url_or_default, transport_options=broker_transport_options(settings))


# A server process publishing `count` task-sized messages (~60 KB, as a task of 500 events)
# to the embedded queue in the data folder of its environment, through kombu as the publisher does.
PUBLISHER = r"""
import sys
from dataclasses import replace
from kombu import Connection
from rubrix_hooks.settings import broker_transport_options, load_settings

settings = replace(load_settings(), broker_url=None)
with Connection(settings.broker_url_or_default, transport_options=broker_transport_options(settings)) as connection:
    queue = connection.SimpleQueue(sys.argv[1])
    for n in range(int(sys.argv[2])):
        queue.put({"n": n, "padding": "x" * 60_000})
print("published", sys.argv[2])
"""


def test_a_consumer_polling_while_messages_are_published_takes_every_message_whole(tmp_path, caplog):
    # The steady state: a worker that keeps up lists the queue folder while a server writes to it.
    count = 300
    data = tmp_path / "data"
    received: list[dict[str, Any]] = []
    caplog.set_level(logging.WARNING, logger="rubrix_hooks.embedded_queue")
    with _connection(data) as connection:
        queue = connection.SimpleQueue(QUEUE)  # declared and bound before the publisher starts
        channel = queue.channel
        publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, QUEUE, str(count)], cwd=REPO_ROOT,
                                     env=child_environment(RUBRIX_TELEMETRY_BROKER_URL=None,
                                                           RUBRIX_TELEMETRY_DATA_DIR=str(data)),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def drained() -> bool:
            # basic_get: the consumer's own poll, without the pause between two empty polls, so
            # it lists the folder as often as a worker that keeps up with the server does.
            finished = publisher.poll() is not None  # before the get: a last Empty then means all is taken
            message = channel.basic_get(QUEUE)
            if message is None:
                return finished
            received.append(message.payload)
            message.ack()
            return False

        assert wait_until(drained, timeout=120, interval=0), "the publisher did not finish in 120 s"
        queue.close()
    out, err = publisher.communicate()
    assert publisher.returncode == 0 and out.strip() == f"published {count}", err

    taken = sorted(payload["n"] for payload in received)
    lost = sorted(set(range(count)) - set(taken))
    warnings = [record.getMessage() for record in caplog.records]
    assert not lost, f"{len(lost)} of {count} messages lost (taken before they were whole): {warnings[:2]}"
    assert taken == list(range(count)), "a message was taken twice"
    assert all(payload["padding"] == "x" * 60_000 for payload in received)
    assert not warnings
    assert _queue_files(data) == []


def _queue_files(data_dir: Path) -> list[str]:
    return sorted(path.name for path in (data_dir / "broker" / "queue").iterdir())
