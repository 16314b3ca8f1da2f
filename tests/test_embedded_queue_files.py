"""The embedded queue's files (telemetry_core/brokers/embedded.py): a consumer never takes a message
still being written, and a file in the broker folder the worker cannot open does not stop it.

Figures in docs/reliability.md, "Lost or silently dropped events on the embedded queue".
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from telemetry_core.brokers.embedded import ORPHAN_SWEEP_INTERVAL
from telemetry_core.settings import broker_transport_options, load_settings
from tests.support import (REPO_ROOT, WorkerProcess, assert_each_delivered_once_after_dedup, child_environment,
                           publish_events, wait_until)

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
from telemetry_core.settings import broker_transport_options, load_settings

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
    caplog.set_level(logging.WARNING, logger="telemetry_core.brokers.embedded")
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


# The worker runs as root (the tests do) without the capabilities that let root open and move
# any file: so, like any other user of the deployment, it is refused another user's 0600 file.
# Under umask 002, the mode of a deployment whose processes share a group.
NOT_ROOTS_FILES = ["sh", "-c", 'umask 002 && exec "$@"', "sh",
                   "setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner",
                   "--inh-caps", "-dac_override,-dac_read_search,-fowner"]
NOBODY = 65534


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv")
def test_a_lock_file_the_worker_cannot_open_is_skipped_with_one_warning_and_the_worker_delivers(tmp_path, collectors):
    data = tmp_path / "data"
    unacked = data / "broker" / "unacked"
    unacked.mkdir(parents=True)
    # Left by another user of the deployment (`status` run as root, a worker in another container):
    # a claim whose lock this worker may not open, and one whose folder it may not move messages out of.
    unopenable = unacked / "1-0600lock.lock"
    os.close(os.open(unopenable, os.O_RDWR | os.O_CREAT, 0o600))
    os.chown(unopenable, NOBODY, NOBODY)
    foreign_lock, foreign_folder = unacked / "2-0755fold.lock", unacked / "2-0755fold"
    os.close(os.open(foreign_lock, os.O_RDWR | os.O_CREAT))
    os.chmod(foreign_lock, 0o666)  # openable: its owner shares it, but not the folder's messages
    foreign_folder.mkdir(mode=0o755)
    (foreign_folder / "1_x.telemetry.msg").write_text("{}")
    for path in (foreign_lock, foreign_folder, foreign_folder / "1_x.telemetry.msg"):
        os.chown(path, NOBODY, NOBODY)

    backend = collectors()
    env = child_environment(RUBRIX_TELEMETRY_BROKER_URL=None, RUBRIX_TELEMETRY_DATA_DIR=str(data),
                            RUBRIX_TELEMETRY_ENDPOINT=backend.url)
    worker = WorkerProcess(env, tmp_path / "worker.log", command_prefix=NOT_ROOTS_FILES)
    try:
        worker.wait_ready()
        events = publish_events(5, QUEUE, embedded_data_dir=data)
        assert backend.wait_for(lambda b: len(b.accepted_messages()) >= 5, timeout=30), (
            f"nothing delivered, worker exit code {worker.process.poll()}: {worker.log()[-300:]}")
        assert_each_delivered_once_after_dedup(events, backend)
        # Two more sweeps (one every 5 s): still up, and still one warning per entry.
        time.sleep(2 * ORPHAN_SWEEP_INTERVAL + 1)
        assert worker.process.poll() is None, worker.log()
        log = worker.log()
        assert "Unrecoverable error" not in log
        assert log.count(f"cannot open {unopenable} (Permission denied)") == 1, log
        assert log.count(f"cannot move messages out of {foreign_folder} (Permission denied)") == 1, log
        # The worker's own claim is made for sharing: its mode is the umask's, not 0600.
        own_lock, = [path for path in unacked.glob("*.lock") if path not in (unopenable, foreign_lock)]
        assert stat.S_IMODE(own_lock.stat().st_mode) == 0o664
        assert stat.S_IMODE(own_lock.with_suffix("").stat().st_mode) == 0o775
    finally:
        worker.stop()
