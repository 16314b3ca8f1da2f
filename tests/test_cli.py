"""The `rubrix-telemetry` command as a person runs it: help, demo, collector, preview, failures."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

import pytest

from rubrix_hooks.contract import validate_event
from telemetry_ops.cli import build_parser
from tests.support import REPO_ROOT, child_environment, free_port, wait_until

COMMAND = [sys.executable, "-m", "telemetry_ops.cli"]


def run(*args: str, timeout: float = 120, **env: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *args], cwd=REPO_ROOT, env=child_environment(**env),
                          capture_output=True, text=True, timeout=timeout)


def subcommands() -> list[str]:
    return sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


@pytest.mark.parametrize("command", subcommands())
def test_every_command_has_help(command):
    done = run(command, "--help")
    assert done.returncode == 0 and "usage: rubrix-telemetry" in done.stdout


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_prints_what_the_collector_received():
    done = run("demo", "--server", "example", "--port", str(free_port()), RUBRIX_TELEMETRY_BROKER_URL="redis://unused:1/0")
    assert done.returncode == 0, done.stderr
    messages = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(m["event"] for m in messages) == [
        "LogRecordsRequested", "ServerErrorFound", "ServerErrorFound", "ServerErrorFound",
        "UserInfoRequested", "UserInfoRequested"]
    assert "record texts and metadata sent to the server found in them: none" in done.stdout
    assert "customer-complaints-acme" not in "\n".join(line for line in done.stdout.splitlines()
                                                       if line.startswith("{"))


@pytest.mark.slow
def test_demo_with_telemetry_off_sends_nothing():
    done = run("demo", "--server", "example", "--port", str(free_port()), RUBRIX_ENABLE_TELEMETRY="0")
    assert done.returncode == 0, done.stderr
    assert "Telemetry is off (RUBRIX_ENABLE_TELEMETRY): the collector received 0 messages." in done.stdout
    assert "export RUBRIX_ENABLE_TELEMETRY=0" not in done.stdout  # no "telemetry is on" notice


def test_preview_shows_the_switch_platform_and_valid_examples():
    done = run("preview", RUBRIX_TELEMETRY_ENDPOINT="https://collector.example")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["telemetry"] == "on" and shown["endpoint"] == "https://collector.example"
    assert sorted(e["event"] for e in shown["examples"]) == ["LogRecordsRequested", "ServerErrorFound",
                                                            "UserInfoRequested"]
    for example in shown["examples"]:
        validate_event({k: example[k] for k in ("event", "messageId", "timestamp", "properties")})
        assert example["context"] == shown["platform"]
    assert json.loads(run("preview", DO_NOT_TRACK="1").stdout)["decided_by"] == "DO_NOT_TRACK"


@pytest.mark.parametrize("command", [["collector"], ["server", "--example"]])
def test_port_taken_ends_in_one_clear_line(command):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run(*command, "--port", str(port), timeout=30)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("rubrix-telemetry: ")
    assert str(port) in done.stderr and "Traceback" not in done.stderr


def test_server_without_rubrix_says_how_to_install_it():
    pytest.importorskip("uvicorn")
    try:
        import rubrix  # noqa: F401
        pytest.skip("Rubrix is installed in this environment")
    except ImportError:
        pass
    done = run("server", "--port", str(free_port()), timeout=30)
    assert done.returncode == 1
    assert "pip install --no-deps rubrix==0.18.0" in done.stderr and "Traceback" not in done.stderr


def test_collector_appends_every_message_to_its_jsonl_file(tmp_path):
    port = free_port()
    out = tmp_path / "audit.jsonl"
    process = subprocess.Popen([*COMMAND, "collector", "--port", str(port), "--out", str(out)], cwd=REPO_ROOT,
                               env=child_environment(), stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1/batch"

        def post() -> int:
            body = json.dumps({"batch": [{"event": "A"}, {"event": "B"}], "sentAt": "x"}).encode()
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=2) as response:
                    return response.status
            except OSError:
                return 0

        assert wait_until(lambda: post() == 200, timeout=20)
        lines = out.read_text().splitlines()
        assert [json.loads(line)["event"] for line in lines] == ["A", "B"]
    finally:
        process.terminate()
        process.wait(timeout=10)
