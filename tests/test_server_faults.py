"""Faults on the server's side, with the example server in real uvicorn/gunicorn processes.

The server runs `rt_fault_app` (tests/support.py): the example server, plus the serving
process id on every response and GET /_stats with that process's hook counters. Its
events go through Redis to a `celery -A tasks worker` child and on to a collector.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from telemetry_core.contract import MAX_HEADER_LENGTH
from rubrix_hooks.example_app import API_KEY
from telemetry_ops.collector import Collector
from tests.support import (WRAPPED_APP_MODULE, Children, RedisServer, child_environment, children_fixture,
                           free_port, http_request, raw_http_status, unique_messages, wait_until)

pytestmark = pytest.mark.slow

QUEUE = "faults-server"
AUTH = {"X-Rubrix-Api-Key": API_KEY}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def uvicorn_argv(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "uvicorn", f"{WRAPPED_APP_MODULE}:app", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "info", *extra]


def server_env(**settings: str) -> dict[str, str]:
    return child_environment(**{f"RUBRIX_TELEMETRY_{name.upper()}": value for name, value in settings.items()})


def get_me(port: int, count: int, threads: int = 8) -> list[tuple[int, str | None, float]]:
    """`count` GET /api/me, each on a new connection: (status, serving pid, seconds)."""
    def one(_: int) -> tuple[int, str | None, float]:
        started = time.perf_counter()
        status, headers, _ = http_request(port, "GET", "/api/me", AUTH)
        return status, headers.get("x-served-by"), time.perf_counter() - started

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))


def server_stats(port: int) -> dict:
    return json.loads(http_request(port, "GET", "/_stats")[2])


def received_unique(backend: Collector, count: int, timeout: float = 45) -> dict[str, dict]:
    assert backend.wait_for(lambda b: len(unique_messages(b.accepted_messages())) >= count, timeout), (
        f"expected {count} events, the backend has {len(unique_messages(backend.accepted_messages()))}")
    return unique_messages(backend.accepted_messages())


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    """A worker on this module's queue, delivering to this module's collector."""
    group = Children(tmp_path_factory.mktemp("server-faults"))
    collector = Collector().start()
    group.worker(QUEUE, collector.url)
    yield group, collector
    group.stop_all()
    collector.stop()


@pytest.fixture
def sink(stack) -> Collector:
    stack[1].requests.clear()
    return stack[1]


@pytest.fixture
def children(redis_server, tmp_path):
    yield from children_fixture(tmp_path)


@pytest.fixture(scope="module")
def two_uvicorn_workers(stack):
    """`uvicorn --workers 2`, accepting megabyte headers (h11's own limit is 16 KB)."""
    port = free_port()
    server = stack[0].server(uvicorn_argv(port, "--workers", "2", "--h11-max-incomplete-event-size", str(4 << 20)),
                             port, server_env(queue=QUEUE))
    return server


def requests_until_every_child_served(port: int, children: int) -> list[tuple[int, str | None, float]]:
    answers: list[tuple[int, str | None, float]] = []

    def every_child_served() -> bool:
        answers.extend(get_me(port, 40))
        return len({pid for _, pid, _ in answers}) >= children

    assert wait_until(every_child_served, timeout=60, interval=0), f"served by {set(p for _, p, _ in answers)}"
    assert {status for status, _, _ in answers} == {200}
    return answers


def test_uvicorn_with_two_workers_every_childs_events_arrive(two_uvicorn_workers, sink):
    answers = requests_until_every_child_served(two_uvicorn_workers.port, 2)
    events = received_unique(sink, len(answers))
    assert len(events) == len(answers)
    assert {m["event"] for m in events.values()} == {"UserInfoRequested"}
    assert len(sink.accepted_messages()) == len(answers), "a child sent an event twice"
    print(f"uvicorn --workers 2: {len(answers)} requests over {len({p for _, p, _ in answers})} children, "
          f"{len(events)} events delivered")


def test_gunicorn_preload_forked_children_send_their_events(stack, sink):
    # The master fires one event at import, so its publisher thread exists before the fork:
    # the trap that loses every event of Segment's and PostHog's clients.
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "--preload", "-k", "uvicorn.workers.UvicornWorker", "-w", "2",
            "-b", f"127.0.0.1:{port}", "--graceful-timeout", "5", f"{WRAPPED_APP_MODULE}:app"]
    server = stack[0].server(argv, port, server_env(queue=QUEUE) | {"RT_FIRE_AT_IMPORT": "1"})
    try:
        answers = requests_until_every_child_served(port, 2)
        events = received_unique(sink, len(answers) + 1)
        by_event = [m["event"] for m in events.values()]
        assert by_event.count("UserInfoRequested") == len(answers)
        assert by_event.count("LogRecordsRequested") == 1, "the master's own event, sent once, not by each child"
        assert len(sink.accepted_messages()) == len(answers) + 1
        print(f"gunicorn --preload -w 2: {len(answers)} requests, {len(events)} events delivered")
    finally:
        server.stop()


def test_broker_unreachable_requests_succeed_events_beyond_buffer_counted_then_flow_again(children, tmp_path):
    redis = RedisServer(port=free_port(), folder=tmp_path / "redis")  # not started yet: unreachable
    queue, buffer_size, sent = "faults-broker-down", 50, 150
    port = free_port()
    children.server(uvicorn_argv(port), port, server_env(queue=queue, broker_url=redis.url,
                                                         buffer_size=str(buffer_size)))
    try:
        down = get_me(port, sent, threads=1)
        assert {status for status, _, _ in down} == {200}
        stats = server_stats(port)
        assert stats["published"] == 0
        assert stats["dropped"] == {"buffer_full": sent - stats["pending"]}
        # The buffer, plus at most one task's worth of events held by the publisher thread.
        assert buffer_size <= stats["pending"] <= buffer_size + 20

        redis.start()
        backend = Collector().start()
        try:
            children.worker(queue, backend.url, broker_url=redis.url)
            held = stats["pending"]
            # The publisher retries on its own (its pause grows while the broker is down, up to 30 s).
            assert len(received_unique(backend, held)) == held
            assert wait_until(lambda: server_stats(port)["pending"] == 0, timeout=10)
            after = get_me(port, 20, threads=1)
            events = received_unique(backend, held + 20)
            assert len(events) == held + 20 and len(backend.accepted_messages()) == held + 20
            final = server_stats(port)
            assert final["published"] == held + 20 and final["dropped"] == {"buffer_full": sent - held}

            up = get_me(port, sent, threads=1)
        finally:
            backend.stop()
    finally:
        redis.stop()
    median_down = statistics.median(seconds for _, _, seconds in down)
    median_up = statistics.median(seconds for _, _, seconds in up + after)
    # No added latency worth measuring: a hook that waited on the broker would cost its
    # connect timeout (0.5 s here) on every request.
    assert median_down < 3 * median_up + 0.05, (median_down, median_up)
    print(f"broker down: {sent} requests ok, {held} held, {sent - held} dropped (buffer_full); "
          f"after it returned {held + 20} delivered; median latency down/up "
          f"{median_down * 1000:.2f}/{median_up * 1000:.2f} ms = {median_down / median_up:.2f}")


@pytest.mark.parametrize("server_kind, broker", [
    pytest.param("uvicorn", "up"),
    pytest.param("uvicorn", "down"),
    pytest.param("gunicorn", "up"),
])
def test_sigterm_flushes_buffered_events_within_the_shutdown_timeout(children, stack, sink, server_kind, broker):
    port, shutdown_timeout, sent = free_port(), 3.0, 30
    broker_url = None if broker == "up" else f"redis://127.0.0.1:{free_port()}/0"
    env = server_env(queue=QUEUE, flush_interval="60", shutdown_timeout=str(shutdown_timeout),
                     **({"broker_url": broker_url} if broker_url else {}))
    argv = uvicorn_argv(port) if server_kind == "uvicorn" else [
        sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "1",
        "-b", f"127.0.0.1:{port}", "--graceful-timeout", "20", f"{WRAPPED_APP_MODULE}:app"]
    server = children.server(argv, port, env)
    assert {status for status, _, _ in get_me(port, sent)} == {200}
    assert server_stats(port)["pending"] == sent  # the flush interval has not come yet

    took = server.stop()
    # uvicorn >= 0.29 ends by re-raising the SIGTERM it caught: -15 is its normal exit.
    assert server.process.returncode in (0, -15), server.log()
    assert took < shutdown_timeout + 10, took
    if broker == "up":
        assert len(received_unique(sink, sent, timeout=10)) == sent
    else:
        assert took >= shutdown_timeout - 0.5
        assert f"{sent} events could not reach the broker before exit and were dropped" in server.log()
    print(f"SIGTERM to {server_kind} with the broker {broker}: exited in {took:.2f}s "
          f"(shutdown timeout {shutdown_timeout:g}s)")


FORK_DURING_FIRST_PUBLISH = """
import asyncio, os, sys
import rubrix_hooks
asyncio.run(rubrix_hooks.track_bulk("Text2Text", 0))
while "kombu.transport.redis" not in sys.modules:  # the publisher thread is importing Celery now
    pass
pid = os.fork()
if pid == 0:
    asyncio.run(rubrix_hooks.track_bulk("Text2Text", 1))
    os._exit(0 if rubrix_hooks.flush(5) else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status) or (0 if rubrix_hooks.flush(5) else 4))
"""


def test_fork_during_the_publishers_first_publish_loses_nothing(redis_server):
    queue = "faults-fork-race"
    run = subprocess.run([sys.executable, "-c", FORK_DURING_FIRST_PUBLISH], env=server_env(queue=queue),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert redis_server.client().llen(queue) == 2  # the parent's task message and the child's


def raw_me(user_agent: bytes, accept_language: bytes) -> bytes:
    return (b"GET /api/me HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"X-Rubrix-Api-Key: " + API_KEY.encode() + b"\r\n"
            b"User-Agent: " + user_agent + b"\r\nAccept-Language: " + accept_language + b"\r\n\r\n")


# (user-agent sent, accept-language sent, what the event may carry: UA, accept-language)
HEADER_CASES = {
    "megabyte user-agent": (b"A" * (1 << 20), b"case-1", "A" * MAX_HEADER_LENGTH, "case-1"),
    "tab and C1 controls": (b"Mozilla/5.0\t(X11)\x85\x9f", b"case-2", "Mozilla/5.0(X11)", "case-2"),
    "invalid UTF-8": (b"\xff\xfe\xc3( agent", b"case-3", "\xff\xfe\xc3( agent", "case-3"),
    "megabyte of controls": (b"ok", b"case-4" + b"\x85" * (1 << 20), "ok", "case-4"),
    "only controls": (b"\x80\x81\x9f", b"case-5", None, "case-5"),
    "DEL": (b"bad\x7fagent", b"case-7", "badagent", "case-7"),
    "escape": (b"bad\x1bagent", b"case-8", "badagent", "case-8"),
}
# The HTTP parser refuses these itself (400) before the application sees them.
REFUSED_BY_PARSER = {"NUL": b"bad\x00agent", "bare CR": b"bad\ragent"}


def test_oversized_and_malformed_headers_are_cleaned_never_an_error(two_uvicorn_workers, sink):
    port = two_uvicorn_workers.port
    for name, (agent, language, _, _) in HEADER_CASES.items():
        assert raw_http_status(port, raw_me(agent, language)) == 200, name
    for name, agent in REFUSED_BY_PARSER.items():
        assert raw_http_status(port, raw_me(agent, b"refused")) in (400, None), name
    assert raw_http_status(port, raw_me(b"after", b"case-6")) == 200

    events = received_unique(sink, len(HEADER_CASES) + 1)
    by_language = {m["properties"]["accept-language"]: m["properties"] for m in events.values()}
    for name, (_, _, agent, language) in HEADER_CASES.items():
        assert by_language[language]["user-agent"] == agent, name
    for properties in by_language.values():
        for value in (properties["user-agent"], properties["accept-language"]):
            assert value is None or (len(value) <= MAX_HEADER_LENGTH and not _CONTROL.search(value))
    assert "refused" not in by_language
    assert "Traceback" not in two_uvicorn_workers.log()
