"""A broker kombu knows but rubrix-telemetry has no module for: delivery works, and `status`
says plainly what it cannot report.

kombu's own `filesystem://` transport stands in for `sqs://` and the like (it needs no
service): a real server-side publisher and a real `celery -A tasks worker` share its folders
through `RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS`, and `telemetry_core.brokers.broker_for`
gives it the fallback, `base.Broker`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, child_environment, children_fixture, run_hook_client, status_json, unique_messages

pytestmark = pytest.mark.slow

QUEUE = "telemetry-kombu-fs"


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


def filesystem_broker(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "kombu-fs"
    (folder / "control").mkdir(parents=True)
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder), "control_folder": str(folder / "control")}
    return {"RUBRIX_TELEMETRY_BROKER_URL": "filesystem://",
            "RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS": json.dumps(options),
            "RUBRIX_TELEMETRY_DATA_DIR": str(tmp_path / "data")}


def test_a_kombu_scheme_without_a_module_delivers_and_status_says_what_it_cannot_report(
        tmp_path, children, collectors):
    backend = collectors()
    broker = filesystem_broker(tmp_path)

    report, _ = run_hook_client(child_environment(**broker, RUBRIX_TELEMETRY_QUEUE=QUEUE), 30)
    assert report["stats"]["published"] == 30 and report["stats"]["dropped"] == {}

    children.worker(QUEUE, backend.url, env=broker)
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= 30, 60)
    assert len(backend.accepted_messages()) == 30

    code, document, stderr = status_json(**broker, RUBRIX_TELEMETRY_QUEUE=QUEUE)
    # Said plainly, not guessed: no depth and no backlog figure, the counts from the workers.
    assert document["queue"]["depth"] is None and document["backlog"]["events"] is None, document
    assert "RUBRIX_TELEMETRY_MAX_BACKLOG is not enforced" in document["backlog"]["counted_by"]
    assert document["counts"]["delivered"] == 30, document
    assert [worker["name"] for worker in document["workers"]], document
    assert code == 0, (document, stderr)
    assert "Traceback" not in stderr

    text = subprocess.run([sys.executable, "-m", "telemetry_ops.cli", "status"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=30, env=child_environment(**broker, RUBRIX_TELEMETRY_QUEUE=QUEUE)).stdout
    assert f"queue:      {QUEUE}: depth not reported by filesystem:// brokers" in text, text
    assert "backlog:    counted by nothing: filesystem:// brokers report no queue depth" in text, text
    assert "delivered:  30" in text, text
