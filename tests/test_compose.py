"""docker-compose.yml, as `docker-compose config` renders it: valid, every command a real
entry point of this project, and one opt-out for server and workers alike.

There is no Docker engine here; `config` needs none.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from telemetry_core.settings import load_settings
from telemetry_ops.cli import build_parser
from tests.support import REPO_ROOT, child_environment

COMPOSE = shutil.which("docker-compose")
pytestmark = pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed (.ci/run installs it)")

PROJECT_SERVICES = {"rubrix", "worker", "flower", "collector", "metrics"}
PROFILES = {"collector": ["audit"], "metrics": ["monitoring"], "prometheus": ["monitoring"]}
TELEMETRY_SERVICES = {"rubrix", "worker"}


def _yaml_to_json(text: str) -> Any:
    """Parses YAML with PyYAML: this interpreter's if it has it, else docker-compose's own
    (the Debian package and pip's both depend on it; this project does not)."""
    try:
        import yaml

        return yaml.safe_load(text)
    except ImportError:
        interpreter = Path(COMPOSE).read_text(errors="replace").splitlines()[0].removeprefix("#!").split()
        to_json = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
        done = subprocess.run([*interpreter, "-c", to_json], input=text, capture_output=True, text=True, check=True)
        return json.loads(done.stdout)


def compose_config(tmp_path: Path, env_file: str = "", profile: str | None = None,
                   **env: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose [--profile P] config` with only `env` in the environment and `env_file`
    as `.env`, so that neither the caller's shell nor a `.env` in the checkout changes the result."""
    dotenv = tmp_path / "test.env"
    dotenv.write_text(env_file)
    return subprocess.run([COMPOSE, "--env-file", str(dotenv), *(["--profile", profile] if profile else []), "config"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env})


def rendered(tmp_path: Path, env_file: str = "", profile: str | None = None, **env: str) -> dict[str, Any]:
    env.setdefault("FLOWER_BASIC_AUTH", "operator:pw")
    done = compose_config(tmp_path, env_file, profile, **env)
    assert done.returncode == 0, done.stderr
    return _yaml_to_json(done.stdout)


@pytest.fixture
def services(tmp_path) -> dict[str, Any]:
    return rendered(tmp_path)["services"]


def test_stack_has_its_services_and_the_audit_collector_and_monitoring_behind_profiles(services):
    assert set(services) == {"redis", "elasticsearch", "rubrix", "worker", "flower", *PROFILES}
    assert {name: service["profiles"] for name, service in services.items() if "profiles" in service} == PROFILES


def _check_celery_command(argv: list[str]) -> None:
    assert argv[:3] == ["celery", "-A", "tasks"], argv
    # `--help` after the real arguments: Celery loads the app named by -A, finds the
    # sub-command and rejects unknown options, then prints help instead of running.
    done = subprocess.run([sys.executable, "-m", "celery", *argv[1:], "--help"], cwd=REPO_ROOT,
                          env=child_environment(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{shlex.join(argv)}: {done.stderr or done.stdout}"
    if argv[3] == "flower":
        from flower.options import options  # Flower hands these to tornado, which Celery does not check

        unknown = [arg for arg in argv[4:] if arg.startswith("--") and arg[2:].split("=")[0] not in options]
        assert not unknown, f"not Flower options: {unknown}"


def _check_cli_command(argv: list[str]) -> None:
    assert argv[0] == "rubrix-telemetry", argv
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{shlex.join(argv)}` is not a valid rubrix-telemetry command")


def test_every_command_is_a_real_entry_point_of_this_project(services):
    commands = {name: services[name]["command"] for name in PROJECT_SERVICES}
    health = services["worker"]["healthcheck"]["test"]
    assert health[0] == "CMD-SHELL"
    # Compose hands `$$` to the shell as `$`: the node name is celery@$HOSTNAME at run time.
    commands["worker healthcheck"] = shlex.split(health[1].replace("$$HOSTNAME", "worker-host"))
    for argv in commands.values():
        (_check_celery_command if argv[0] == "celery" else _check_cli_command)(argv)

    assert commands["worker"][3:] == ["worker", "-Q", "telemetry", "-E", "-l", "INFO"]
    assert commands["worker healthcheck"][3:7] == ["inspect", "ping", "-d", "celery@worker-host"]
    assert commands["rubrix"][1:2] == ["server"] and commands["collector"][1:2] == ["collector"]


@pytest.mark.parametrize("source", ["environment", ".env"])
def test_opt_out_reaches_server_and_worker(tmp_path, source):
    opt_out = {"RUBRIX_ENABLE_TELEMETRY": "0"}
    config = (rendered(tmp_path, **opt_out) if source == "environment"
              else rendered(tmp_path, env_file="RUBRIX_ENABLE_TELEMETRY=0\n"))
    for name in TELEMETRY_SERVICES | {"flower"}:
        settings = load_settings(config["services"][name]["environment"])
        assert (settings.enabled, settings.decided_by) == (False, "RUBRIX_ENABLE_TELEMETRY"), name


def test_key_and_endpoint_pass_to_server_and_worker_and_defaults_stay_in_settings(tmp_path):
    config = rendered(tmp_path, RUBRIX_TELEMETRY_KEY="wk-123", RUBRIX_TELEMETRY_ENDPOINT="http://collector:6970")
    defaults = rendered(tmp_path)
    for name in TELEMETRY_SERVICES:
        settings = load_settings(config["services"][name]["environment"])
        assert (settings.write_key, settings.endpoint) == ("wk-123", "http://collector:6970")
        assert settings.broker_url == "redis://redis:6379/0"
        unset = load_settings(defaults["services"][name]["environment"])
        assert (unset.enabled, unset.decided_by, unset.write_key) == (True, "default", None)
        assert unset.endpoint == "https://api.segment.io"


def test_redis_persists_on_a_volume_and_is_not_published(services):
    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(volume.startswith("redis-data:/data") for volume in redis["volumes"])
    assert "ports" not in redis


def test_worker_restarts_and_keeps_its_installation_id_on_a_volume(services):
    worker = services["worker"]
    assert worker["restart"] in ("always", "unless-stopped", "on-failure")
    data_dir = load_settings(worker["environment"]).data_dir
    assert any(Path(volume.split(":")[1]) == data_dir for volume in worker["volumes"]), worker["volumes"]


def test_flower_needs_a_password_and_listens_on_loopback_only(tmp_path, services):
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "operator:pw"
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555/tcp"]
    refused = compose_config(tmp_path)
    assert refused.returncode != 0 and "FLOWER_BASIC_AUTH" in refused.stderr


def test_rubrix_uses_elasticsearch_7_and_listens_on_6900(services):
    assert services["elasticsearch"]["image"].rsplit(":", 1)[1].startswith("7.")
    assert services["rubrix"]["environment"]["RUBRIX_ELASTICSEARCH"] == "http://elasticsearch:9200"
    assert services["rubrix"]["ports"] == [{"published": 6900, "target": 6900}]


def test_monitoring_profile_scrapes_the_exporter_and_flower_and_loads_the_rules(tmp_path):
    services = rendered(tmp_path, profile="monitoring")["services"]
    prometheus, exporter = services["prometheus"], services["metrics"]
    assert prometheus["ports"] == ["127.0.0.1:9090:9090/tcp"] and "ports" not in exporter
    mounts = {volume.split(":")[1]: Path(volume.split(":")[0]) for volume in prometheus["volumes"]}
    config_file = next(arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file="))
    assert mounts[config_file] == REPO_ROOT / "monitoring" / "prometheus.yml"
    config = _yaml_to_json(mounts[config_file].read_text())
    assert [mounts[rules] for rules in config["rule_files"]] == [REPO_ROOT / "monitoring" / "alerts.yml"]

    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    argv = exporter["command"]
    assert argv[:2] == ["rubrix-telemetry", "metrics"]
    assert targets["rubrix-telemetry"] == [f"metrics:{argv[argv.index('--port') + 1]}"]
    assert targets["flower"] == ["flower:5555"]  # /metrics, Prometheus' default path
    # The exporter asks the broker the workers consume, for the queue they consume.
    asked, consumed = load_settings(exporter["environment"]), load_settings(services["worker"]["environment"])
    assert (asked.broker_url, asked.queue) == (consumed.broker_url, consumed.queue)
