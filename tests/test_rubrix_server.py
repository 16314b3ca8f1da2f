"""The hooks inside the real Rubrix 0.18 server: what reaches the backend through Redis and a worker.

Rubrix 0.18 cannot share this environment (it pins FastAPI 0.75 and pydantic 1), so the test
builds a separate virtual environment once and caches it (RUBRIX_TELEMETRY_TEST_CACHE, default
~/.cache/rubrix-telemetry-tests). Elasticsearch is replaced by a permissive HTTP stand-in.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.es_standin import ElasticsearchStandIn
from tests.support import (RUNTIME_DEPENDENCIES, REPO_ROOT, cached_venv, child_environment, free_port, pyenv_pythons,
                           wait_until)

REQUIREMENTS = REPO_ROOT / "requirements" / "rubrix-0.18-server.txt"
CANARY = "canary-9d41"

pytestmark = pytest.mark.slow


def rubrix_base_python() -> str:
    """The CPython 3.11 to build Rubrix's environment with, whichever Python runs the tests.

    The requirements file is pinned for 3.11 (scipy 1.17 has no build for 3.10; numpy 1.26 and
    pandas 1.5 none for 3.13): under nox, which runs the suite on the oldest and the newest
    supported Python, the server still runs on 3.11, pyenv's.
    """
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    found = pyenv_pythons().get((3, 11))
    assert found, "Rubrix 0.18's environment needs CPython 3.11, from pyenv when the tests run on another"
    return found


@pytest.fixture(scope="session")
def rubrix_python() -> Path:
    # Rubrix's declared pins do not build on Python 3.11: install it without them, then the
    # server's real requirements. The requirements file's content is part of the cache key.
    return cached_venv("rubrix-0.18", rubrix_base_python(), [
        ["--no-deps", "rubrix==0.18.0"],
        ["-r", str(REQUIREMENTS)],
        RUNTIME_DEPENDENCIES,
    ], fingerprint=REQUIREMENTS.read_text())


def call(url: str, method: str = "GET", body: object = None, key: str | None = "rubrix.apikey") -> int:
    headers = {"Content-Type": "application/json", "User-Agent": "rubrix-client/0.18.0", "Accept-Language": "fr-FR"}
    if key:
        headers["X-Rubrix-Api-Key"] = key
    request = urllib.request.Request(url, method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture
def rubrix_server(rubrix_python, pipeline, tmp_path):
    elasticsearch = ElasticsearchStandIn()
    port = free_port()
    env = child_environment(RUBRIX_ELASTICSEARCH=elasticsearch.url, PYTHONPATH=str(REPO_ROOT))
    log = (tmp_path / "rubrix.log").open("wb")
    server = subprocess.Popen([str(rubrix_python), "-m", "telemetry_ops.cli", "server", "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return server.poll() is not None or call(base + "/api/me") == 200
        except OSError:
            return False

    try:
        assert wait_until(up, timeout=90) and server.poll() is None, (tmp_path / "rubrix.log").read_text()
        yield base, tmp_path / "rubrix.log"
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()
        elasticsearch.stop()


def test_real_rubrix_reports_through_our_hooks_and_leaks_nothing(rubrix_server, pipeline):
    base, log_file = rubrix_server
    records = [{"inputs": {"text": f"{CANARY} patient record {i}"}, "metadata": {"owner": CANARY}} for i in range(3)]
    statuses = {
        "me": call(base + "/api/me"),
        "bulk": call(f"{base}/api/datasets/{CANARY}-dataset/TextClassification:bulk", "POST", {"records": records}),
        "invalid name": call(f"{base}/api/datasets/Bad_{CANARY}/TextClassification:bulk", "POST",
                             {"records": records}),
        "missing": call(f"{base}/api/datasets/{CANARY}-missing"),
        "no key": call(base + "/api/me", key=None),
    }
    assert statuses == {"me": 200, "bulk": 200, "invalid name": 422, "missing": 404, "no key": 401}

    # The start-up check called /api/me once more.
    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 6, timeout=30)
    messages = pipeline.accepted_messages()
    by_event = sorted((m["event"], json.dumps(m["properties"], sort_keys=True)) for m in messages)
    user = {"user-agent": "rubrix-client/0.18.0", "accept-language": "fr-FR"}
    assert by_event == sorted([
        ("LogRecordsRequested", json.dumps({"records": 3, "task": "TextClassification"}, sort_keys=True)),
        ("ServerErrorFound", json.dumps({"code": "rubrix.api.errors::EntityNotFoundError", **user}, sort_keys=True)),
        ("ServerErrorFound", json.dumps({"code": "rubrix.api.errors::UnauthorizedError", **user}, sort_keys=True)),
        ("ServerErrorFound", json.dumps({"code": "rubrix.api.errors::ValidationError", **user}, sort_keys=True)),
        ("UserInfoRequested", json.dumps({"is_default_user": True, **user}, sort_keys=True)),
        ("UserInfoRequested", json.dumps({"is_default_user": True, **user}, sort_keys=True)),
    ])
    # The server's platform data: Rubrix 0.18 is installed where the server runs, not here.
    assert {m["context"]["version"] for m in messages} == {"0.18.0"}
    everything_sent = json.dumps([r.body for r in pipeline.requests])
    assert CANARY not in everything_sent and "patient record" not in everything_sent
    # Rubrix's own notice, with how to switch telemetry off.
    assert "export RUBRIX_ENABLE_TELEMETRY=0" in log_file.read_text()
