"""Configuration: defaults, the switch's spellings, and a clear error naming a bad variable."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from telemetry_core.brokers.embedded import broker_folders as embedded_broker_folders
from telemetry_core.settings import (ConfigurationError, broker_transport_options, load_settings, masked_url,
                                     telemetry_switch)
from tests.support import REPO_ROOT, child_environment


def test_defaults_use_the_embedded_broker_and_segment():
    settings = load_settings({})
    assert settings.enabled and settings.decided_by == "default"
    assert settings.broker_url is None and settings.broker_url_or_default.startswith("embedded://")
    assert settings.endpoint == "https://api.segment.io" and settings.is_segment
    assert settings.queue == "telemetry" and settings.write_key is None


@pytest.mark.parametrize("value, enabled", [("0", False), ("false", False), ("No", False), ("OFF", False),
                                            ("f", False), (" n ", False), ("1", True), ("true", True),
                                            ("t", True), ("Y", True), ("", True), ("maybe", False)])
def test_enable_switch_spellings(value, enabled):
    assert telemetry_switch({"RUBRIX_ENABLE_TELEMETRY": value}).enabled is enabled


def test_do_not_track_switches_off_and_says_so():
    assert telemetry_switch({"DO_NOT_TRACK": "1"})[:2] == (False, "DO_NOT_TRACK")
    assert telemetry_switch({"DO_NOT_TRACK": "y"})[:2] == (False, "DO_NOT_TRACK")
    assert telemetry_switch({"DO_NOT_TRACK": "1", "RUBRIX_ENABLE_TELEMETRY": "0"})[:2] == (False,
                                                                                        "RUBRIX_ENABLE_TELEMETRY")
    assert telemetry_switch({"DO_NOT_TRACK": "0"}) == (True, "default", None)


def test_a_value_neither_true_nor_false_is_off_with_an_error_naming_it():
    switch = telemetry_switch({"RUBRIX_ENABLE_TELEMETRY": "disabled"})
    assert switch.enabled is False and switch.decided_by == "RUBRIX_ENABLE_TELEMETRY"
    assert "RUBRIX_ENABLE_TELEMETRY='disabled'" in switch.error and "OFF" in switch.error


@pytest.mark.parametrize("name, value", [
    ("RUBRIX_TELEMETRY_BUFFER_SIZE", "lots"),
    ("RUBRIX_TELEMETRY_BUFFER_SIZE", "0"),
    ("RUBRIX_TELEMETRY_FLUSH_INTERVAL", "-1"),
    ("RUBRIX_TELEMETRY_ENDPOINT", "ftp://example"),
    ("RUBRIX_TELEMETRY_BROKER_URL", "localhost:6379"),
    ("RUBRIX_TELEMETRY_QUEUE", "tele metry"),
    ("RUBRIX_TELEMETRY_VISIBILITY_TIMEOUT", "nan"),
    ("RUBRIX_TELEMETRY_QUEUE_TYPE", "stream"),
    ("RUBRIX_TELEMETRY_CONSUMER_TIMEOUT", "0"),
])
def test_bad_value_names_the_variable(name, value):
    with pytest.raises(ConfigurationError, match=name):
        load_settings({name: value})


def test_backoff_must_stay_below_the_visibility_timeout():
    with pytest.raises(ConfigurationError, match="RUBRIX_TELEMETRY_BACKOFF_MAX"):
        load_settings({"RUBRIX_TELEMETRY_BACKOFF_MAX": "100", "RUBRIX_TELEMETRY_VISIBILITY_TIMEOUT": "60"})


AMQP = {"RUBRIX_TELEMETRY_BROKER_URL": "amqp://guest:guest@rabbitmq:5672//"}


def test_backoff_must_stay_below_rabbitmqs_consumer_timeout():
    with pytest.raises(ConfigurationError) as refused:
        load_settings({**AMQP, "RUBRIX_TELEMETRY_BACKOFF_MAX": "1800"})
    assert str(refused.value) == ("RUBRIX_TELEMETRY_BACKOFF_MAX must be below RUBRIX_TELEMETRY_CONSUMER_TIMEOUT "
                                  "(1800 >= 1800)")
    # A broker's own limit only: Redis's visibility timeout does not bound a RabbitMQ retry.
    settings = load_settings({**AMQP, "RUBRIX_TELEMETRY_BACKOFF_MAX": "100", "RUBRIX_TELEMETRY_VISIBILITY_TIMEOUT": "60",
                              "RUBRIX_TELEMETRY_CONSUMER_TIMEOUT": "3600"})
    assert (settings.backoff_max, settings.consumer_timeout) == (100, 3600)


def test_queue_type_defaults_to_classic_and_quorum_needs_rabbitmq():
    assert load_settings({}).queue_type == "classic"
    assert load_settings({**AMQP, "RUBRIX_TELEMETRY_QUEUE_TYPE": "Quorum"}).queue_type == "quorum"
    with pytest.raises(ConfigurationError, match="RUBRIX_TELEMETRY_QUEUE_TYPE=quorum needs a RabbitMQ broker"):
        load_settings({"RUBRIX_TELEMETRY_BROKER_URL": "redis://redis:6379/0", "RUBRIX_TELEMETRY_QUEUE_TYPE": "quorum"})


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "telemetry"],
    [sys.executable, "-c", "import rubrix_hooks.telemetry"],
    [sys.executable, "-m", "telemetry_ops.cli", "preview"],
])
def test_bad_value_stops_start_up_with_a_clear_error(command):
    env = child_environment(RUBRIX_TELEMETRY_BUFFER_SIZE="lots")
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "RUBRIX_TELEMETRY_BUFFER_SIZE must be a positive integer, got 'lots'" in done.stderr


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://h:6380/0?ssl_cert_reqs=required",
                                 "sentinel://h:26379", "amqp://guest@h//", "amqps://h//", "pyamqp://h//",
                                 "sqs://", "sqla+postgresql://u@h/db", "redis+socket:///run/redis.sock",
                                 "redis+socket:///run/redis.sock?virtual_host=3", "filesystem://localhost//",
                                 "memory://"])
def test_every_broker_scheme_kombu_knows_is_accepted(url):
    # Sentinel needs its master's name as well (tested below).
    options = {"RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS": '{"master_name": "mymaster"}'}
    assert load_settings({"RUBRIX_TELEMETRY_BROKER_URL": url, **options}).broker_url == url


def test_transport_options_are_merged_over_ours_on_every_broker():
    settings = load_settings({"RUBRIX_TELEMETRY_BROKER_URL": "sentinel://h1:26379;sentinel://h2:26379",
                              "RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS":
                                  '{"master_name": "mymaster", "socket_timeout": 9, "global_keyprefix": "rt:"}'})
    options = broker_transport_options(settings)
    assert (options["master_name"], options["socket_timeout"], options["global_keyprefix"]) == ("mymaster", 9, "rt:")
    assert options["visibility_timeout"] == settings.visibility_timeout  # ours stay where not overridden


@pytest.mark.parametrize("value, says", [
    ("{master_name: mymaster}", "Expecting property name enclosed in double quotes"),
    ('["master_name", "mymaster"]', "got a JSON list"),
    ('"mymaster"', "got a JSON str"),
])
def test_transport_options_that_are_not_a_json_object_are_refused(value, says):
    with pytest.raises(ConfigurationError, match=re.escape(
            'RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS must be a JSON object such as {"master_name": "mymaster"}')
            + ".*" + re.escape(says)):
        load_settings({"RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS": value})


def test_sentinel_without_master_name_and_a_second_visibility_timeout_are_refused():
    with pytest.raises(ConfigurationError, match="sentinel:// RUBRIX_TELEMETRY_BROKER_URL needs the master's name"):
        load_settings({"RUBRIX_TELEMETRY_BROKER_URL": "sentinel://h:26379"})
    with pytest.raises(ConfigurationError, match="use RUBRIX_TELEMETRY_VISIBILITY_TIMEOUT"):
        load_settings({"RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS": '{"visibility_timeout": 99999}'})


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "telemetry"],
    [sys.executable, "-m", "telemetry_ops.cli", "status"],
])
def test_bad_transport_options_stop_the_start_with_one_line(command):
    # The value is never echoed: it may carry a Sentinel password.
    env = child_environment(RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS='{"sentinel_kwargs": {"password": "s3cret"}')
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "RUBRIX_TELEMETRY_BROKER_TRANSPORT_OPTIONS must be a JSON object" in done.stderr
    assert "s3cret" not in done.stderr and "Traceback" not in done.stderr


def test_the_embedded_queues_url_means_the_default():
    settings = load_settings({"RUBRIX_TELEMETRY_BROKER_URL": "embedded://localhost//"})
    assert settings.broker_url is None and settings.broker_url_or_default == "embedded://localhost//"


@pytest.mark.parametrize("url", ["foo://x", "redis-cluster://h:7000", "http://h:6379/0"])
def test_an_unknown_broker_scheme_is_a_configuration_error_naming_it(url):
    scheme = url.split("://")[0]
    with pytest.raises(ConfigurationError, match=f"RUBRIX_TELEMETRY_BROKER_URL has an unknown broker scheme "
                                                 f"'{re.escape(scheme)}://'"):
        load_settings({"RUBRIX_TELEMETRY_BROKER_URL": url})


def test_reading_the_embedded_queue_folders_creates_nothing(tmp_path):
    settings = load_settings({"RUBRIX_TELEMETRY_DATA_DIR": str(tmp_path / "data")})
    folders = embedded_broker_folders(settings)
    assert folders["queue"] == tmp_path / "data" / "broker" / "queue" and not (tmp_path / "data").exists()
    broker_transport_options(settings)  # what a server or worker uses to connect: creates them
    assert all(folder.is_dir() for folder in folders.values())


def test_masked_url_hides_the_password():
    assert masked_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert masked_url("amqp://user:s3cret@host//") == "amqp://user:***@host//"
    assert masked_url("redis://redis:6379/0") == "redis://redis:6379/0"
    assert masked_url("sentinel://:pw1@h1:26379;sentinel://:pw1@h2:26379") == \
        "sentinel://:***@h1:26379;sentinel://:***@h2:26379"


def test_compose_passes_an_empty_switch_when_unset_and_empty_means_on():
    import re

    from telemetry_core.settings import telemetry_switch
    from tests.support import REPO_ROOT

    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    # `${VAR:-}`: the containers get VAR='' when the shell and .env leave it unset.
    assert re.search(r"RUBRIX_ENABLE_TELEMETRY: \$\{RUBRIX_ENABLE_TELEMETRY:-\}", compose)
    switch = telemetry_switch({"RUBRIX_ENABLE_TELEMETRY": "", "DO_NOT_TRACK": ""})
    assert (switch.enabled, switch.decided_by, switch.error) == (True, "default", None)
    readme = (REPO_ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `RUBRIX_ENABLE_TELEMETRY`"))
    assert "empty" in row and "compose" in row


def test_redis_on_a_unix_socket_takes_its_database_from_virtual_host_as_kombu_does():
    from telemetry_core.brokers import broker_for
    from telemetry_core.brokers.redis import RedisBroker

    settings = load_settings({"RUBRIX_TELEMETRY_BROKER_URL": "redis+socket:///run/redis.sock"})
    assert isinstance(broker_for(settings), RedisBroker)
    with pytest.raises(ConfigurationError, match=r"the Redis database is a number \(0, 1, ...\), not 'x'"):
        load_settings({"RUBRIX_TELEMETRY_BROKER_URL": "redis+socket:///run/redis.sock?virtual_host=x"})


@pytest.mark.parametrize("value", ["http://user:s3cret@collector:6970", "ftp://user:s3cret@collector"])
def test_an_endpoint_with_a_password_is_refused_without_echoing_it(value):
    with pytest.raises(ConfigurationError, match="RUBRIX_TELEMETRY_ENDPOINT") as refused:
        load_settings({"RUBRIX_TELEMETRY_ENDPOINT": value})
    assert "s3cret" not in str(refused.value) and "user:***@collector" in str(refused.value)
