"""The layout docs/architecture.md describes, kept true: who imports whom, and where brokers are named."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

from tests.support import REPO_ROOT

SIDES = ("rubrix_hooks", "tasks", "telemetry_ops")
CORE = "telemetry_core"
BROKERS = REPO_ROOT / CORE / "brokers"
# An identifier that names a particular broker (comments and strings do not count).
BROKER_NAME = re.compile(r"amqp|rabbit|redis|sentinel|embedded", re.IGNORECASE)


def product_modules() -> list[Path]:
    return sorted(path for package in (CORE, *SIDES) for path in (REPO_ROOT / package).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_the_core_imports_none_of_the_sides():
    offenders = {str(path.relative_to(REPO_ROOT)): sorted(imported_packages(path) & set(SIDES))
                 for path in (REPO_ROOT / CORE).rglob("*.py")}
    assert {name: sides for name, sides in offenders.items() if sides} == {}


def test_the_server_side_imports_neither_the_workers_nor_the_operators_code():
    offenders = {str(path.relative_to(REPO_ROOT)): sorted(imported_packages(path) & {"tasks", "telemetry_ops"})
                 for path in (REPO_ROOT / "rubrix_hooks").rglob("*.py")}
    assert {name: sides for name, sides in offenders.items() if sides} == {}


def test_outside_the_broker_package_only_the_settings_name_a_broker():
    named: dict[str, list[str]] = {}
    for path in product_modules():
        if BROKERS in path.parents:
            continue
        tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
        names = sorted({token.string for token in tokens if token.type == tokenize.NAME
                        and BROKER_NAME.search(token.string)})
        if names:
            named[str(path.relative_to(REPO_ROOT))] = names
    assert set(named) <= {f"{CORE}/settings.py"}, named
