"""Server and worker in different environments, as in the compose stack: the server's image
has Rubrix installed and runs another Python; the worker's image has no Rubrix at all.
Every event must carry the SERVER's platform data, which only the server can know.

The server's environment is built once with the newest of pyenv's CPythons (other than
this one) and cached, like the real-Rubrix test's; the worker is this test session's.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest

from telemetry_core.platform_info import platform_info
from tests.support import (HOOK_CLIENT, REPO_ROOT, RUNTIME_DEPENDENCIES, cached_venv, child_environment,
                           pyenv_pythons)

pytestmark = pytest.mark.slow

RUBRIX_VERSION = "0.18.0"


@pytest.fixture(scope="session")
def server_python() -> str:
    here = sys.version_info[:2]
    others = {minor: python for minor, python in pyenv_pythons().items() if minor != here and minor >= (3, 10)}
    if not others:
        pytest.skip("no other CPython from pyenv on this machine")
    python = others[max(others)]
    # The `rubrix` distribution only: the hooks read its version, never import it.
    return str(cached_venv("server-elsewhere", python, [["--no-deps", f"rubrix=={RUBRIX_VERSION}"],
                                                        RUNTIME_DEPENDENCIES]))


def test_events_carry_the_servers_rubrix_and_python_versions_not_the_workers(server_python, pipeline):
    # The worker (this process) has no Rubrix: what it knows of itself would say "unknown".
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("rubrix")
    server_side = json.loads(subprocess.run(
        [server_python, "-c", "import json; from telemetry_core.platform_info import platform_info; "
                              "print(json.dumps(platform_info()))"],
        cwd=REPO_ROOT, env=child_environment(PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True,
        check=True).stdout)
    assert server_side["version"] == RUBRIX_VERSION
    assert server_side["python_version"] != platform_info()["python_version"]

    done = subprocess.run([server_python, "-c", HOOK_CLIENT, "9", "10"], cwd=REPO_ROOT,
                          env=child_environment(PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["flushed"]

    assert pipeline.wait_for(lambda b: len(b.accepted_messages()) >= 9, timeout=30)
    messages = pipeline.accepted_messages()
    assert len(messages) == 9
    for message in messages:
        assert message["context"] == server_side
