"""RabbitMQ for the tests: a vhost of a test's own on the machine's broker, or a private node.

Tests never change the machine's RabbitMQ beyond adding and deleting their own vhost. A
test that needs an alarm or a restart starts a node of its own (`RabbitNode`): Debian's
`rabbitmq-server` with its own node name, ports, data, logs and Erlang cookie (in HOME),
all in a temporary folder, driven by `rabbitmqctl -n` under the same HOME.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from urllib.parse import quote
from pathlib import Path

from tests.support import free_port, wait_until

# The machine's broker (guest/guest), and the scripts that run a node as the current user:
# /usr/sbin's wrappers switch to the `rabbitmq` user, whose HOME holds the machine's cookie.
MACHINE_HOST, MACHINE_PORT = "127.0.0.1", 5672
NODE_SCRIPTS = Path("/usr/lib/rabbitmq/bin")


def _script(name: str) -> str:
    path = NODE_SCRIPTS / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: run .ci/run or `apt-get install rabbitmq-server`")
    return found


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def amqp_url(port: int, vhost: str = "/", host: str = "127.0.0.1", user: str = "guest", password: str = "guest") -> str:
    # kombu reads the vhost from the URL's path: the default vhost "/" is spelled "//".
    return f"amqp://{user}:{password}@{host}:{port}/" + ("/" if vhost == "/" else quote(vhost, safe=""))


class MachineVhost:
    """A vhost of one test's own on the machine's RabbitMQ, deleted with `delete()`."""

    def __init__(self, prefix: str = "rubrix-telemetry-test") -> None:
        if not answers(MACHINE_HOST, MACHINE_PORT):
            raise RuntimeError(f"no RabbitMQ answers on {MACHINE_HOST}:{MACHINE_PORT} (.ci/run starts one)")
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.users: list[str] = []
        self._ctl("add_vhost", self.name)
        self._ctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")

    @property
    def url(self) -> str:
        return amqp_url(MACHINE_PORT, self.name)

    def _ctl(self, *args: str) -> str:
        # /usr/sbin/rabbitmqctl: as root it runs as the `rabbitmq` user, with the machine's cookie.
        done = subprocess.run([shutil.which("rabbitmqctl") or "rabbitmqctl", "-q", *args],
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def user_url(self, configure: str, write: str, read: str) -> str:
        """The URL of a new user with these permission regexes on this vhost only (deleted
        with the vhost by `delete()`)."""
        name, password = f"rt-user-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        self._ctl("add_user", name, password)
        self.users.append(name)
        self._ctl("set_permissions", "-p", self.name, name, configure, write, read)
        return amqp_url(MACHINE_PORT, self.name, user=name, password=password)

    def delete(self) -> None:
        for name in self.users:
            self._ctl("delete_user", name)
        self._ctl("delete_vhost", self.name)


class RabbitNode:
    """A RabbitMQ node of a test's own, on free ports, in `folder`; never the machine's."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.name = f"rt{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return amqp_url(self.port)

    def _environment(self) -> dict[str, str]:
        folder = self.folder
        return {**os.environ, "HOME": str(folder), "RABBITMQ_NODENAME": self.name,
                "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"), "RABBITMQ_LOG_BASE": str(folder / "log"),
                "RABBITMQ_PID_FILE": str(folder / "rabbit.pid"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf")}

    def start(self, timeout: float = 60) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "enabled_plugins").write_text("[].\n")
        (self.folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        self.process = subprocess.Popen([_script("rabbitmq-server")], env=self._environment(),
                                        cwd=self.folder, stdout=(self.folder / "server.log").open("ab"),
                                        stderr=subprocess.STDOUT)
        # The AMQP listener opens only once the node has booted.
        if not wait_until(lambda: answers("127.0.0.1", self.port) or self.process.poll() is not None,
                          timeout, interval=0.2) or self.process.poll() is not None:
            raise RuntimeError(f"rabbitmq-server did not start:\n{(self.folder / 'server.log').read_text()}")

    def ctl(self, *args: str) -> str:
        done = subprocess.run([_script("rabbitmqctl"), "-q", "-n", self.name, *args], env=self._environment(),
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def alarm_on(self) -> None:
        """A memory alarm: the node blocks every connection that publishes."""
        self.ctl("set_vm_memory_high_watermark", "absolute", "1MB")
        wait_until(lambda: "memory" in self.ctl("eval", "rabbit_alarm:get_alarms()."), 10, interval=0.2)

    def alarm_off(self) -> None:
        self.ctl("set_vm_memory_high_watermark", "0.4")

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            self.ctl("stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            self.process.kill()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
