"""`status` judges delivery too: a worker whose last attempts fail, or whose events the backend
refuses, makes it unhealthy, with one line naming the endpoint and the cause.

Real prefork workers (deliveries run in pool processes, the answer to `status` comes from the
main process) on an embedded queue of each test's own, and the project's collector.
"""

from __future__ import annotations

import pytest

from tests.support import free_port, publish_events, retries_logged, status_json, wait_until
from tests.test_counts_file import children, embedded  # noqa: F401 (children is a fixture)

pytestmark = pytest.mark.slow

# Prefork (`processes`: Celery takes `--pool prefork` for its own default and gives the app's threads).
PREFORK = ["--pool", "processes", "--concurrency", "1"]
WRITE_KEY = "test-write-key"  # conftest's: never shown


def test_endpoint_unreachable_status_is_unhealthy_naming_it_until_a_delivery_succeeds(children, collectors,
                                                                                      tmp_path):
    data_dir, queue, port = tmp_path / "data", "unreachable", free_port()  # nothing listens there yet
    endpoint = f"http://127.0.0.1:{port}"
    worker = children.worker(queue, endpoint, embedded_data_dir=data_dir, extra_args=PREFORK)
    publish_events(1, queue, embedded_data_dir=data_dir)
    assert wait_until(lambda: len(retries_logged(worker)) >= 2, timeout=30), worker.log()

    code, document, stderr = status_json(**embedded(data_dir, queue))
    assert code == 1 and document["healthy"] is False, (document, stderr)
    [line] = stderr.splitlines()
    assert f"{endpoint}/v1/batch" in line and "Connection refused" in line, line
    [answer] = document["workers"]
    last = answer["last_delivery"]
    assert (last["outcome"], last["endpoint"]) == ("failed", f"{endpoint}/v1/batch"), last
    assert document["counts"]["retried"] >= 2 and document["counts"]["delivered"] == 0
    # The worker's retry line names the endpoint and the cause, not only the exception's class.
    assert "to retry in" in worker.log() and f"cannot connect to {endpoint}/v1/batch: Connection refused" in (
        worker.log()), worker.log()

    # The backend answers again: the next retry delivers, and status is healthy once more.
    backend = collectors(port)
    assert backend.wait_for(lambda b: len(b.accepted_messages()) == 1, timeout=30), worker.log()
    assert wait_until(lambda: status_json(**embedded(data_dir, queue))[0] == 0, timeout=20, interval=0.5)
    code, document, stderr = status_json(**embedded(data_dir, queue))
    assert (code, stderr, document["problems"]) == (0, "", [])
    last = document["workers"][0]["last_delivery"]
    assert (last["outcome"], last["cause"], last["endpoint"]) == ("delivered", None, f"{endpoint}/v1/batch")
    assert WRITE_KEY not in worker.log() + str(document)


def test_endpoint_with_v1_batch_pasted_in_the_refusals_make_status_unhealthy(children, backend, tmp_path):
    data_dir, queue = tmp_path / "data", "pasted-path"
    endpoint = f"{backend.url}/v1/batch"  # the worker adds /v1/batch itself: every POST gets 404
    worker = children.worker(queue, endpoint, embedded_data_dir=data_dir, extra_args=PREFORK)
    publish_events(2, queue, embedded_data_dir=data_dir)
    assert wait_until(lambda: "'HTTP 404': 2" in worker.log(), timeout=30), worker.log()

    code, document, stderr = status_json(**embedded(data_dir, queue))
    assert code == 1 and document["counts"]["dropped"] == {"HTTP 404": 2}, (document, stderr)
    [line] = stderr.splitlines()
    assert f"HTTP 404 from {endpoint}/v1/batch" in line, line
    assert "RUBRIX_TELEMETRY_ENDPOINT" in line  # the hint: it must not end in /v1/batch
    last = document["workers"][0]["last_delivery"]
    assert last["outcome"] == "refused" and last["cause"].startswith(f"HTTP 404 from {endpoint}/v1/batch"), last
    assert backend.accepted_messages() == []
