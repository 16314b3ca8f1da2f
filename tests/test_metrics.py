"""`rubrix-telemetry metrics` scraped by a real Prometheus (Debian's `prometheus`, on a port and
a data folder of its own), and the exporter's answer when the broker does not answer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from telemetry_core.counts import DROP_REASON_LABELS, drop_reason_label
from telemetry_ops.status import CHECKS_BUDGET
from tests.support import (REPO_ROOT, ServerProcess, SilentBroker, child_environment, children_fixture, free_port,
                           http_request, run_hook_client, scripted, status_json, stop_process,
                           wait_until)

PROMETHEUS = shutil.which("prometheus")
ALERTS = REPO_ROOT / "monitoring" / "alerts.yml"
PASSWORD = "s3cret"


@pytest.fixture
def children(tmp_path):
    yield from children_fixture(tmp_path)


class Prometheus:
    """Debian's `prometheus` on a free port with a data folder and a configuration of its own:
    it scrapes `target` every second and loads monitoring/alerts.yml."""

    def __init__(self, folder: Path, target: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(ALERTS)],
                  "scrape_configs": [{"job_name": "rubrix-telemetry", "static_configs": [{"targets": [target]}]}]}
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._log = (folder / "prometheus.log").open("wb")
        self.log_file = folder / "prometheus.log"
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self._log, stderr=subprocess.STDOUT)
        if not wait_until(lambda: self.process.poll() is not None or self._ready(), timeout=60, interval=0.2) \
                or self.process.poll() is not None:
            raise RuntimeError(f"prometheus did not start:\n{self.log_file.read_text(errors='replace')}")

    def _ready(self) -> bool:
        try:
            return http_request(self.port, "GET", "/-/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def api(self, path: str, **query: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            document = json.load(response)
        assert document["status"] == "success", document
        return document["data"]

    def values(self, query: str) -> dict[str, float]:
        """The query's current values, by `reason` label ("" for a series without one)."""
        return {sample["metric"].get("reason", ""): float(sample["value"][1])
                for sample in self.api("query", query=query)["result"]}

    def stop(self) -> None:
        stop_process(self.process, timeout=30)
        self._log.close()


@pytest.fixture
def prometheus_for(tmp_path) -> Iterator:
    if PROMETHEUS is None:
        pytest.fail("prometheus is not installed: run .ci/run or `apt-get install prometheus`")
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        started.append(Prometheus(tmp_path / "prometheus", target))
        return started[-1]

    yield start
    for server in started:
        server.stop()
        assert server.process.poll() is not None  # nothing left running


def start_exporter(children, tmp_path: Path, **env: str | None) -> ServerProcess:
    port = free_port()
    exporter = ServerProcess([sys.executable, "-m", "telemetry_ops.cli", "metrics", "--port", str(port)],
                             child_environment(**env), tmp_path / f"metrics-{port}.log", port)
    children.started.append(exporter)
    exporter.wait_ready(timeout=60)
    return exporter


@pytest.mark.slow
def test_prometheus_scrapes_the_deployments_counts_and_workers(redis_server, collectors, children, prometheus_for,
                                                                tmp_path):
    redis.Redis(host="127.0.0.1", port=redis_server.port, db=14).flushdb()  # counts of this test's own
    deployment: dict[str, str | None] = {"RUBRIX_TELEMETRY_BROKER_URL": f"redis://127.0.0.1:{redis_server.port}/14",
                                         "RUBRIX_TELEMETRY_QUEUE": f"metrics-{uuid.uuid4().hex[:8]}"}
    backend = collectors(responder=scripted([400]))  # the first batch is refused, then all accepted
    worker = children.worker(deployment["RUBRIX_TELEMETRY_QUEUE"], backend.url,
                             deployment["RUBRIX_TELEMETRY_BROKER_URL"])
    exporter = start_exporter(children, tmp_path, **deployment)
    prometheus = prometheus_for(f"127.0.0.1:{exporter.port}")

    loaded = {rule["name"] for group in prometheus.api("rules")["groups"] for rule in group["rules"]}
    assert loaded == {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
                      for rule in group["rules"]}
    assert wait_until(lambda: prometheus.values("rubrix_telemetry_workers_up") == {"": 1.0}, 30), exporter.log()

    report, _ = run_hook_client(child_environment(**deployment), count=1)
    assert report["flushed"] and backend.wait_for(lambda b: [r.status for r in b.requests] == [400], 20), worker.log()
    report, _ = run_hook_client(child_environment(**deployment), count=5)
    assert report["flushed"] and backend.wait_for(lambda b: len(b.accepted_messages()) == 5, 20), worker.log()

    delivered = wait_until(lambda: prometheus.values("rubrix_telemetry_events_delivered_total") == {"": 5.0}, 30)
    assert delivered, prometheus.values("rubrix_telemetry_events_delivered_total")
    assert len(backend.accepted_messages()) == 5
    dropped = prometheus.values("rubrix_telemetry_events_dropped_total")
    assert set(dropped) == set(DROP_REASON_LABELS)  # a fixed set, every one present
    assert {reason: n for reason, n in dropped.items() if n} == {"refused": 1.0}  # the 400
    assert prometheus.values("rubrix_telemetry_broker_up") == {"": 1.0}
    assert prometheus.values("rubrix_telemetry_last_delivery_timestamp_seconds")[""] > time.time() - 120

    # The deployment's counts, as `status` shows them, whichever exporter serves them and
    # whenever it started: none is counted in an exporter's memory.
    assert status_json(**deployment)[1]["counts"] == {"delivered": 5, "retried": 0, "dropped": {"HTTP 400": 1}}
    late = start_exporter(children, tmp_path, **deployment)
    _, _, body = http_request(late.port, "GET", "/metrics")
    served = {(sample.name, sample.labels.get("reason")): sample.value
              for family in text_string_to_metric_families(body.decode()) for sample in family.samples}
    assert (served[("rubrix_telemetry_events_delivered_total", None)],
            served[("rubrix_telemetry_events_dropped_total", "refused")]) == (5.0, 1.0)
    assert b"test-write-key" not in body and b"redis://" not in body
    # What waits, in events and in Redis's bytes (all delivered: nothing), against both limits.
    assert (served[("rubrix_telemetry_backlog_limit_events", None)],
            served[("rubrix_telemetry_backlog_limit_bytes", None)]) == (100_000, 40 << 20)
    assert 0 <= served[("rubrix_telemetry_backlog_bytes", None)] < 2_000, served

    figures = {name: prometheus.values(query)[""] for name, query in {
        "scrapes": 'count_over_time(up{job="rubrix-telemetry"}[1h])',
        "failed": 'count_over_time(up{job="rubrix-telemetry"}[1h]) - sum_over_time(up{job="rubrix-telemetry"}[1h])',
        "median s": 'quantile_over_time(0.5, scrape_duration_seconds{job="rubrix-telemetry"}[1h])',
        "slowest s": 'max_over_time(scrape_duration_seconds{job="rubrix-telemetry"}[1h])'}.items()}
    print(f"scrapes with a 1 s timeout: {figures}")

    worker.stop()
    assert wait_until(lambda: prometheus.values("rubrix_telemetry_workers_up") == {"": 0.0}, 30)


@pytest.mark.parametrize("broker", ["silent", "refusing"])
def test_a_scrape_with_the_broker_down_answers_within_its_bound(broker, children, tmp_path):
    silent = SilentBroker()
    port = silent.port if broker == "silent" else free_port()  # accepts and never answers, or refuses
    try:
        exporter = start_exporter(children, tmp_path,
                                  RUBRIX_TELEMETRY_BROKER_URL=f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
        for announced, bound in (("2", 2.0), (None, CHECKS_BUDGET)):  # Prometheus' scrape timeout, or none
            headers = {"X-Prometheus-Scrape-Timeout-Seconds": announced} if announced else {}
            started = time.monotonic()
            status, _, body = http_request(exporter.port, "GET", "/metrics", headers=headers, timeout=30)
            took = time.monotonic() - started
            assert status == 200 and took < bound, (took, body)
            print(f"scrape, {broker} broker, scrape timeout {announced or 'not announced'}: {took:.2f} s")
            text = body.decode()
            assert "rubrix_telemetry_broker_up 0.0" in text and "rubrix_telemetry_workers_up 0.0" in text
            # Counts that cannot be read are left out: a 0 would read as a counter reset.
            assert "rubrix_telemetry_events_delivered_total" not in text
            assert PASSWORD not in text
        exporter.stop()
        assert "does not answer" in exporter.log() and PASSWORD not in exporter.log()
    finally:
        silent.close()


def test_drop_reasons_map_to_a_small_fixed_set():
    reasons = {
        "HTTP 400": "refused", "HTTP 404": "refused",
        "invalid: records must be an int >= 0": "invalid", "invalid in the server: task is not a Rubrix task": "invalid",
        "not a list of events": "invalid",
        "unknown message format 7": "rejected", "rejected message (ContentDisallowed)": "rejected",
        "rejected message (unregistered task)": "rejected",
        "telemetry off (DO_NOT_TRACK)": "telemetry_off", "RUBRIX_TELEMETRY_KEY not set": "no_write_key",
        "message over 32 KB": "too_large", "gave up after 86400s (HTTP 503)": "expired", "expired": "expired",
        "unexpected error (KeyError)": "error", "hook_error": "error",
        "buffer_full": "buffer_full", "shutdown_timeout": "shutdown_timeout", "backlog_full": "backlog",
        "a reason from a newer release": "other", "": "other",
    }
    assert {reason: drop_reason_label(reason) for reason in reasons} == reasons
    assert set(reasons.values()) == set(DROP_REASON_LABELS)  # every label is one a reason reaches


def test_without_prometheus_client_the_command_says_which_extra_to_install():
    without = ("import sys; sys.modules['prometheus_client'] = None; "
               "from telemetry_ops.cli import main; sys.exit(main(['metrics', '--port', '0']))")
    done = subprocess.run([sys.executable, "-c", without], cwd=REPO_ROOT, env=child_environment(),
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (1, 'rubrix-telemetry: prometheus_client is not installed: '
                                                 'pip install "rubrix-telemetry[metrics]"\n')
