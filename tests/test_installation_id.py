"""The installation id in a data folder shared by workers in different containers.

Containers sharing a volume often run their worker under the same pid (each container's
first process is pid 1). Here two real processes, each in a pid namespace of its own
(`unshare --pid`: both are pid 1, as in two containers), create the id of one data folder
at the same instant, over and over; each must end up with the id the folder keeps.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tasks.installation_id import FILE_NAME
from tests.support import REPO_ROOT, child_environment

pytestmark = [
    pytest.mark.slow,
    pytest.mark.load,  # 2000 trials of a race: on one Python only
    pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                       reason="needs unshare(1) and root for pid namespaces"),
]

TRIALS = 2000

# One "container": checks it is pid 1, then for each trial meets its peer at a file barrier
# (both spin until both have arrived) and calls the worker's real installation_id() on that
# trial's fresh data folder, writing down what it returned: the id it would send.
_CONTAINER = r"""
import os, sys
from pathlib import Path
from tasks.installation_id import installation_id

root, name, peer, trials = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
assert os.getpid() == 1, os.getpid()
for trial in range(trials):
    folder = root / f"trial-{trial}"
    (root / f"at-{trial}-{name}").touch()
    while not (root / f"at-{trial}-{peer}").exists():
        pass
    (root / f"returned-{trial}-{name}").write_text(installation_id(folder))
"""


def test_two_workers_with_the_same_pid_in_two_containers_send_the_id_their_shared_folder_keeps(tmp_path):
    names = ("a", "b")
    containers = [
        subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _CONTAINER,
                          str(tmp_path), name, peer, str(TRIALS)],
                         cwd=REPO_ROOT, env=child_environment(), stderr=subprocess.PIPE, text=True)
        for name, peer in (names, names[::-1])]
    errors = [container.communicate(timeout=300)[1] for container in containers]
    assert [container.returncode for container in containers] == [0, 0], errors

    disagreements = []
    for trial in range(TRIALS):
        kept = (tmp_path / f"trial-{trial}" / FILE_NAME).read_text().strip()
        returned = {name: (tmp_path / f"returned-{trial}-{name}").read_text() for name in names}
        if set(returned.values()) != {kept}:
            disagreements.append((trial, kept, returned))
    assert not disagreements, f"{len(disagreements)} of {TRIALS} trials, e.g. {disagreements[:3]}"
    assert "Traceback" not in "".join(errors) and "cannot store" not in "".join(errors), errors
    # No draft is left behind.
    assert not [path for path in tmp_path.glob(f"trial-*/.{FILE_NAME}.*")]
