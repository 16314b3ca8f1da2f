"""The test suite on the oldest and the newest supported CPython: `python3 -m nox` (.ci/run runs it),
without the load tests, which .ci/run's first pass runs on the default Python.

`nox -s tests-3.10` runs one of them; `nox -s tests --force-python 3.9 -- tests/test_faults.py`
runs any pyenv interpreter, for example to check a Python outside the supported range.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

# The newest CPython the suite has passed on; the oldest is requires-python's lower bound.
NEWEST_SUPPORTED = "3.13"
SUPPORTED = nox.project.python_versions(nox.project.load_toml("pyproject.toml"), max_version=NEWEST_SUPPORTED)

nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = True  # a Python we cannot find is a failure, not a skip


def _put_pyenv_interpreters_on_path() -> None:
    """Puts each pyenv CPython's bin folder first on PATH (the newest patch of each minor).

    pyenv's shims answer `python3.10` only for the version pyenv has selected; nox looks
    interpreters up by that name, so it needs the versions' own folders.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tests.support import pyenv_pythons  # standard library only: no project install needed

    folders = [str(Path(python).parent) for _, python in sorted(pyenv_pythons().items(), reverse=True)]
    os.environ["PATH"] = os.pathsep.join([*folders, os.environ.get("PATH", "")])


_put_pyenv_interpreters_on_path()


@nox.session(python=[SUPPORTED[0], SUPPORTED[-1]])
def tests(session: nox.Session) -> None:
    """The whole suite (or the pytest arguments after `--`) in a fresh virtualenv."""
    session.install("-e", ".[test]")
    session.run("python", "-c", "import sys, celery, kombu; "
                "print('Python', sys.version.split()[0], 'celery', celery.__version__, 'kombu', kombu.__version__)")
    # The load tests (marker `load`: minutes of traffic each) run once, on the default Python
    # (.ci/run's first pass); here only when asked for with pytest arguments.
    session.run("python", "-m", "pytest", *(session.posargs or ["-m", "not load"]))
