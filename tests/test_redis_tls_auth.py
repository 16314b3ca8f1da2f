"""Redis over TLS (a CA and certificates the test makes with openssl) and Redis with a
password or an ACL user: every URL spelling Celery documents behaves the same for delivery
(hooks -> broker -> worker -> collector), `status` (answers, depth, counts) and the counts."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from telemetry_ops.collector import Collector
from tests.support import (REPO_ROOT, RedisServer, WorkerProcess, child_environment, free_port, run_hook_client,
                           unique_messages, wait_until)

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-default"
ACL_USER, ACL_PASSWORD = "telemetry", "s3cret-acl"


def openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


@dataclass
class Certificates:
    folder: Path

    def path(self, name: str) -> str:
        return str(self.folder / name)

    @classmethod
    def make(cls, folder: Path) -> "Certificates":
        """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it."""
        folder.mkdir(parents=True, exist_ok=True)
        openssl(folder, "req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", "ca.key", "-out", "ca.crt",
                "-days", "2", "-subj", "/CN=rubrix-telemetry test CA",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        # Python 3.13 verifies strictly (VERIFY_X509_STRICT): the CA must state its key usage,
        # and a leaf certificate must name its issuer's key and say it is no CA.
        leaf = "basicConstraints=CA:FALSE\nauthorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
        (folder / "server.ext").write_text(leaf + "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        (folder / "client.ext").write_text(leaf + "extendedKeyUsage=clientAuth\n")
        for name in ("server", "client"):
            openssl(folder, "req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", f"{name}.key",
                    "-out", f"{name}.csr", "-subj", f"/CN={name}")
            openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                    "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
        return cls(folder)


def tls_server(certs: Certificates, folder: Path, mutual: bool) -> RedisServer:
    port = free_port()
    client_cert = {"ssl_certfile": certs.path("client.crt"), "ssl_keyfile": certs.path("client.key")} if mutual else {}
    return RedisServer(port, folder, appendonly=False, extra_args=[
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", certs.path("server.crt"),
        "--tls-key-file", certs.path("server.key"), "--tls-ca-cert-file", certs.path("ca.crt"),
        "--tls-auth-clients", "yes" if mutual else "no"],
        client_options={"ssl": True, "ssl_ca_certs": certs.path("ca.crt"), **client_cert})


@dataclass
class Servers:
    certs: Certificates
    tls: RedisServer
    mutual_tls: RedisServer
    password: RedisServer


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[Servers]:
    folder = tmp_path_factory.mktemp("redis-tls")
    certs = Certificates.make(folder / "certs")
    password = RedisServer(free_port(), folder / "password", appendonly=False, extra_args=[
        "--requirepass", PASSWORD, "--user", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all"],
        client_options={"password": PASSWORD})
    group = Servers(certs, tls_server(certs, folder / "tls", mutual=False),
                    tls_server(certs, folder / "mutual-tls", mutual=True), password)
    started: list[RedisServer] = []
    try:
        for server in (group.tls, group.mutual_tls, group.password):
            server.start()
            started.append(server)
        yield group
    finally:
        for server in started:
            server.stop()


def broker_url(servers: Servers, spelling: str, db: int) -> str:
    """The broker URL of a spelling, on a database of its own (so its counts are its own)."""
    ca = f"ssl_ca_certs={servers.certs.path('ca.crt')}"
    client = f"ssl_certfile={servers.certs.path('client.crt')}&ssl_keyfile={servers.certs.path('client.key')}"
    tls, mutual = f"rediss://127.0.0.1:{servers.tls.port}/{db}", f"rediss://127.0.0.1:{servers.mutual_tls.port}/{db}"
    return {
        "ssl_cert_reqs=required": f"{tls}?ssl_cert_reqs=required&{ca}",
        "ssl_cert_reqs=CERT_REQUIRED": f"{tls}?ssl_cert_reqs=CERT_REQUIRED&{ca}",
        "ssl_cert_reqs=optional": f"{tls}?ssl_cert_reqs=optional&{ca}",
        "ssl_cert_reqs=none": f"{tls}?ssl_cert_reqs=none",
        "mutual TLS": f"{mutual}?ssl_cert_reqs=required&{ca}&{client}",
        "password": f"redis://:{PASSWORD}@127.0.0.1:{servers.password.port}/{db}",
        "ACL user": f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{servers.password.port}/{db}",
    }[spelling]


SPELLINGS = ["ssl_cert_reqs=required", "ssl_cert_reqs=CERT_REQUIRED", "ssl_cert_reqs=optional",
             "ssl_cert_reqs=none", "mutual TLS", "password", "ACL user"]


def status_json(url: str) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run([sys.executable, "-m", "telemetry_ops.cli", "status", "--json"], cwd=REPO_ROOT,
                          env=child_environment(RUBRIX_TELEMETRY_BROKER_URL=url), capture_output=True, text=True,
                          timeout=30)
    return done.returncode, json.loads(done.stdout), done.stdout + done.stderr


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_delivery_status_and_counts_behave_the_same_on_every_spelling(servers, spelling, tmp_path):
    url = broker_url(servers, spelling, db=SPELLINGS.index(spelling) + 1)
    collector = Collector().start()
    env = child_environment(RUBRIX_TELEMETRY_BROKER_URL=url, RUBRIX_TELEMETRY_ENDPOINT=collector.url)
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        report, _ = run_hook_client(env, count=6)
        assert report["flushed"] and report["stats"]["dropped"] == {}, report
        assert wait_until(lambda: len(unique_messages(collector.accepted_messages())) == 6, timeout=20), worker.log()

        def status_counted() -> tuple[int, dict[str, Any], str] | None:
            code, document, output = status_json(url)
            return (code, document, output) if (document["counts"] or {}).get("delivered") == 6 else None

        # The worker counts each delivery just after it: status may ask a moment before.
        answer = wait_until(status_counted, timeout=15, interval=0.2) or status_json(url)
        code, document, output = answer
        assert document["broker"]["answers"] is True, output
        assert (document["queue"]["depth"], document["queue"]["unacked"]) == (0, 0), output
        assert document["counts"] == {"delivered": 6, "retried": 0, "dropped": {}}, output
        assert code == 0 and len(document["workers"]) == 1, output
        for secret in (PASSWORD, ACL_PASSWORD):
            assert secret not in output
    finally:
        worker.stop()
        collector.stop()


@pytest.mark.parametrize("spelling, url_of, says", [
    # CERT_REQUIRED is honoured: without the CA, the server's certificate is refused.
    ("required, no CA", lambda s: f"rediss://127.0.0.1:{s.tls.port}/0?ssl_cert_reqs=required",
     "certificate verify failed"),
    ("mutual TLS, no client certificate", lambda s: f"rediss://127.0.0.1:{s.mutual_tls.port}/0?ssl_cert_reqs=required"
                                                    f"&ssl_ca_certs={s.certs.path('ca.crt')}", ""),
    ("wrong password", lambda s: f"redis://{ACL_USER}:wrong@127.0.0.1:{s.password.port}/0", "invalid"),
])
def test_status_refused_by_the_broker_says_so_within_five_seconds(servers, spelling, url_of, says):
    url = url_of(servers)
    code, document, output = status_json(url)
    assert code == 1 and document["broker"]["answers"] is False, output
    assert says in document["broker"]["error"] and "wrong" not in output.replace("wrong password", ""), output
