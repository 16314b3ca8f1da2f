"""Configuration: defaults, the switch's spellings, and a clear error naming a bad variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rubrix_hooks.settings import ConfigurationError, load_settings, masked_url, telemetry_switch
from tests.support import REPO_ROOT, child_environment


def test_defaults_use_the_embedded_broker_and_segment():
    settings = load_settings({})
    assert settings.enabled and settings.decided_by == "default"
    assert settings.uses_embedded_broker and settings.broker_url_or_default.startswith("filesystem://")
    assert settings.endpoint == "https://api.segment.io" and settings.is_segment
    assert settings.queue == "telemetry" and settings.write_key is None


@pytest.mark.parametrize("value, enabled", [("0", False), ("false", False), ("No", False), ("OFF", False),
                                            ("1", True), ("true", True), ("", True)])
def test_enable_switch_spellings(value, enabled):
    assert telemetry_switch({"RUBRIX_ENABLE_TELEMETRY": value})[0] is enabled


def test_do_not_track_switches_off_and_says_so():
    assert telemetry_switch({"DO_NOT_TRACK": "1"}) == (False, "DO_NOT_TRACK")
    assert telemetry_switch({"DO_NOT_TRACK": "1", "RUBRIX_ENABLE_TELEMETRY": "0"}) == (False, "RUBRIX_ENABLE_TELEMETRY")


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
    [sys.executable, "-m", "tasks.cli", "preview"],
])
def test_bad_value_stops_start_up_with_a_clear_error(command):
    env = child_environment(RUBRIX_TELEMETRY_BUFFER_SIZE="lots")
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "RUBRIX_TELEMETRY_BUFFER_SIZE must be a positive integer, got 'lots'" in done.stderr


def test_masked_url_hides_the_password():
    assert masked_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert masked_url("amqp://user:s3cret@host//") == "amqp://user:***@host//"
    assert masked_url("redis://redis:6379/0") == "redis://redis:6379/0"
