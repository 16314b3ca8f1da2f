"""The worker alongside: on the embedded queue, a server starts the one Celery worker its data folder needs.

Most single-machine installs run only the server. On the embedded queue nothing delivers
then, and `broker/` grows for ever; so every server process that publishes there makes sure
that one real worker (`celery -A tasks worker`, the same app as any other) consumes it, and
that worker stops once no server is left. Who runs, who starts and who stops is decided by
three flock(2) locks in `<data folder>/broker/`, held for a process's life and dropped by the
kernel when it ends, however it ends (SIGKILL included):

- `servers.lock`: every server process that publishes holds LOCK_SH (a forked child inherits
  the descriptor, and the lock with it). A worker alongside that can take LOCK_EX knows no
  server is left, and stops itself with a warm shutdown (SIGTERM): what it holds goes back
  into the queue (the embedded transport renames held messages back), for the next start.
- `workers.lock`: every worker on the embedded queue, the operator's and ours, holds LOCK_SH
  from its start. A server that can take LOCK_EX knows no worker runs.
- `worker-alongside.lock`: the one worker alongside. The server that takes LOCK_EX|LOCK_NB
  spawns the worker with that descriptor (`pass_fds`), so the child holds it for its life,
  and closes its own copy: no second server spawns one meanwhile, nor while it is starting
  (before it holds `workers.lock`), nor while it is stopping.

flock, not the POSIX locks of `embedded.py`: a POSIX lock is the process's and does not pass
to a child, a flock is the open file's and does. Each server looks again every
`CHECK_INTERVAL` seconds (one flock call), so a worker that crashed, an operator's worker
that was stopped, or a worker alongside that was just stopping when a server started is
replaced; a data folder that could not be used at the server's start (a volume mounted late)
gets its worker once it can be. An operator's worker started at the very moment a server
spawns one makes two for a while: harmless, delivery is at least once and the messageIds let
the backend de-duplicate.

The worker runs our app whatever the server's working folder holds (a project's own
`tasks.py` is a common name there, and Celery's `-A tasks` looks in the working folder
first): it runs in the data folder, with the folder our packages came from first on its
PYTHONPATH and the server's working folder left out (`worker_pythonpath`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from telemetry_core.settings import Settings

log = logging.getLogger("telemetry_core.brokers.alongside")

# Set in the environment of a worker a server started: the path of its log file.
ALONGSIDE_LOG_VARIABLE = "RUBRIX_TELEMETRY_ALONGSIDE_LOG"
# How `status` (and Flower) name it.
NODE_NAME = "alongside@%h"
# How often a server looks whether a worker consumes its queue.
CHECK_INTERVAL = 5.0
# How often the worker alongside looks whether a server is left (and at its log's size).
SERVERS_CHECK_INTERVAL = 2.0
# The worker's log (level WARNING: problems only) is cut at this size, the previous part kept
# as `<log>.1`: the two never take more than twice this.
LOG_LIMIT_BYTES = 1_000_000
# Its CPU priority: below the server's, whose requests come first.
NICENESS = 10
# A thread pool: one process (every lock it holds is dropped together when it ends, and no
# pool child outlives it holding them), whose main thread answers `status` while a delivery
# waits on a slow backend (a solo worker would miss it). As many threads as the app's default
# (tasks/celery.py, WORKER_THREADS): the tasks running at once share their POSTs (group commit).
POOL_ARGS = ("--pool", "threads")


def lock_paths(settings: Settings) -> dict[str, Path]:
    root = settings.data_dir / "broker"
    return {name: root / f"{name}.lock" for name in ("servers", "workers", "worker-alongside")}


def log_path(settings: Settings) -> Path:
    return settings.data_dir / "worker-alongside.log"


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0o666, the umask decides: server, workers and status may run as different users.
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)


def _free(fd: int) -> bool:
    """Whether nobody else holds a lock on this file (tested with LOCK_EX|LOCK_NB, released at once)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def worker_alongside_runs(settings: Settings) -> bool:
    """Whether a worker alongside runs, starts or stops on this data folder (it holds its lock)."""
    path = lock_paths(settings)["worker-alongside"]
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # no server ever started one here
    try:
        return not _free(fd)
    finally:
        os.close(fd)


# -- the server's side ---------------------------------------------------------------------

class _ServerSide:
    """One server process's part: its claim on `servers.lock` and its look-outs for a worker.

    Nothing here can fail the server: every step is retried at the next look (the data folder
    may be a volume mounted late, or get its mode fixed later), and a failure is logged once,
    at WARNING, until a look finds a worker consuming again (later failures go to DEBUG)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = lock_paths(settings)
        self.pid = os.getpid()
        self.worker: subprocess.Popen[bytes] | None = None
        # LOCK_SH on `servers.lock` for this process's life, taken at the first look that can:
        # the worker alongside stops once nobody holds it. A forked child inherits the
        # descriptor, and so the lock.
        self._servers_fd: int | None = None
        self._failure_logged = False

    def start_watching(self) -> None:
        threading.Thread(target=self._watch, name="rubrix-telemetry-worker-alongside", daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                self.check()
            except Exception as error:  # noqa: BLE001 (a server must never fail for its worker)
                self._log_failure("cannot start a worker alongside the server (%s: %s); events wait in %s, "
                                  "and the server tries again every %gs", type(error).__name__, error,
                                  self.settings.data_dir / "broker", CHECK_INTERVAL)
            time.sleep(CHECK_INTERVAL)

    def _log_failure(self, message: str, *args: object) -> None:
        """Once at WARNING; again (at DEBUG) until a look finds a worker consuming."""
        level = logging.DEBUG if self._failure_logged else logging.WARNING
        self._failure_logged = True
        log.log(level, "telemetry: " + message, *args)

    def check(self) -> None:
        """Spawns the worker alongside when none consumes the queue and none is being started."""
        if self._servers_fd is None:
            fd = _open_lock(self.paths["servers"])
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except OSError:
                os.close(fd)
                raise
            self._servers_fd = fd
        crashed = False
        if self.worker is not None and self.worker.poll() is not None:
            crashed = self.worker.returncode != 0  # it stops itself (no server left) with 0
            if crashed:
                self._log_failure("the worker alongside exited with code %s (its log: %s); the server starts "
                                  "another every %gs", self.worker.returncode, log_path(self.settings),
                                  CHECK_INTERVAL)
            self.worker = None  # reaped: it stopped or crashed
        alongside_fd = _open_lock(self.paths["worker-alongside"])
        try:
            try:
                fcntl.flock(alongside_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._failure_logged = False
                return  # a worker alongside runs, starts or stops: another look later
            workers_fd = _open_lock(self.paths["workers"])
            try:
                if not _free(workers_fd):
                    self._failure_logged = False
                    return  # a worker consumes the queue (an operator's, or one alongside)
            finally:
                os.close(workers_fd)
            self.worker = _spawn(self.settings, alongside_fd)
            # After a crash, the line above said it (once): no INFO line every CHECK_INTERVAL.
            log.log(logging.DEBUG if crashed else logging.INFO,
                    "telemetry: no worker consumes %s: started one alongside the server (pid %d, log %s)",
                    self.settings.data_dir / "broker", self.worker.pid, log_path(self.settings))
        finally:
            os.close(alongside_fd)  # the child holds the lock through its own copy


def package_root() -> Path:
    """The folder our packages (`telemetry_core`, `tasks`, ...) were imported from: a checkout,
    an editable install's source folder, or site-packages. Not resolved: a symlinked package
    is found where the server found it."""
    return Path(os.path.abspath(__file__)).parents[2]


def _site_folders() -> set[str]:
    import site

    folders = [*site.getsitepackages(), site.getusersitepackages()]
    return {os.path.abspath(folder) for folder in folders}


def worker_pythonpath(server_cwd: str, server_pythonpath: str, root: Path) -> str:
    """PYTHONPATH for the worker alongside: our packages' folder first, then the server's own
    entries (made absolute: the worker runs in another folder) except the server's working
    folder, from which the worker imports nothing (`tasks.py` is a common name there).

    site-packages is not put first (it would come before the standard library, where an old
    backport such as `enum34` would shadow it): the worker's Python finds it there anyway."""
    entries: list[str] = []
    if (root / "tasks" / "__init__.py").is_file() and str(root) not in _site_folders():
        entries.append(str(root))
    for entry in server_pythonpath.split(os.pathsep):
        folder = os.path.abspath(os.path.join(server_cwd, entry)) if entry else server_cwd
        if folder != server_cwd and folder not in entries:
            entries.append(folder)
    return os.pathsep.join(entries)


def _spawn(settings: Settings, alongside_fd: int) -> subprocess.Popen[bytes]:
    path = log_path(settings)
    # Truncated at each start; O_APPEND, so that the worker can cut it while it writes.
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
    nice = shutil.which("nice")
    argv = [*([nice, "-n", str(NICENESS)] if nice else []), sys.executable, "-m", "celery", "-A", "tasks", "worker",
            "-Q", settings.queue, *POOL_ARGS, "--without-mingle", "--without-gossip", "-l", "WARNING",
            "-n", NODE_NAME]
    # Our app whatever the server's working folder holds: the worker runs in the data folder
    # (which holds no module; Celery puts its working folder first on sys.path to find `-A
    # tasks`), its data folder made absolute, and our packages first on its PYTHONPATH.
    data_dir = os.path.abspath(settings.data_dir)
    env = {**os.environ, ALONGSIDE_LOG_VARIABLE: str(path), "RUBRIX_TELEMETRY_DATA_DIR": data_dir,
           "PYTHONPATH": worker_pythonpath(os.getcwd(), os.environ.get("PYTHONPATH", ""), package_root())}
    if not env["PYTHONPATH"]:
        del env["PYTHONPATH"]
    try:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
            # Never the server's listening sockets; only the lock that makes it the one alongside.
            close_fds=True, pass_fds=(alongside_fd,),
            # Its own session: a Ctrl-C or a SIGTERM to the server's process group is not its fate;
            # it stops when the last server has gone.
            start_new_session=True, cwd=data_dir, env=env,
        )
    finally:
        os.close(log_fd)


_server_side: _ServerSide | None = None
_server_side_lock = threading.Lock()


def start_for_server(settings: Settings) -> None:
    """Called from each server process's publisher thread; idempotent, never raises."""
    global _server_side
    if not settings.embedded_worker or not settings.enabled:
        return
    with _server_side_lock:
        if _server_side is not None and _server_side.pid == os.getpid():
            return
        # In a forked child the parent's look-out thread is gone (the inherited lock is kept).
        # Its thread keeps trying (every CHECK_INTERVAL) whatever fails, and logs a failure once.
        try:
            _server_side = _ServerSide(settings)
            _server_side.start_watching()
        except Exception as error:  # noqa: BLE001 (no thread to be had: a server must never fail for its worker)
            log.warning("telemetry: cannot start a worker alongside the server (%s: %s)", type(error).__name__, error)


# -- the worker's side ---------------------------------------------------------------------

_worker_locks: list[int] = []


def hold_for_worker(settings: Settings) -> None:
    """At a worker's start: LOCK_SH on `workers.lock` for its life, so that no server spawns
    another; and, in a worker alongside, the look-out that stops it once no server is left."""
    try:
        fd = _open_lock(lock_paths(settings)["workers"])
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as error:
        log.warning("telemetry: cannot lock %s (%s): a server may start a worker alongside this one",
                    lock_paths(settings)["workers"], error)
        return
    _worker_locks.append(fd)  # never closed: the kernel drops the lock when the process ends
    log_file = os.environ.get(ALONGSIDE_LOG_VARIABLE)
    if log_file:
        threading.Thread(target=_stop_when_no_server_is_left, args=(settings, Path(log_file)),
                         name="rubrix-telemetry-servers-watch", daemon=True).start()


def _stop_when_no_server_is_left(settings: Settings, log_file: Path) -> None:
    servers_fd = _open_lock(lock_paths(settings)["servers"])
    while True:
        time.sleep(SERVERS_CHECK_INTERVAL)
        _bound_log(log_file)
        if _free(servers_fd):
            log.info("telemetry: no server is left on %s: the worker alongside stops (warm shutdown)",
                     settings.data_dir / "broker")
            # Celery's handler, in the main thread: what this worker holds goes back to the queue.
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _bound_log(log_file: Path) -> None:
    """Keeps the worker's log under LOG_LIMIT_BYTES, the previous part as `<log>.1`."""
    try:
        if log_file.stat().st_size <= LOG_LIMIT_BYTES:
            return
        shutil.copyfile(log_file, log_file.with_name(log_file.name + ".1"))
        os.truncate(log_file, 0)  # every writer appends (O_APPEND): they go on at the new end
    except OSError:
        pass  # removed or unwritable: nothing to bound
