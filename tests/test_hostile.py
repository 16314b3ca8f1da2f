"""Hostile input: nothing leaks, nothing breaks.

Property tests (hypothesis) drive the hooks, the example server and the ASGI middleware
with arbitrary dataset names, records, metadata, user names, headers and error objects,
planting a canary wherever the contract says data must not go. All examples are fired
first; the backend is checked once: no canary anywhere, every message inside the contract.
"""

from __future__ import annotations

import asyncio
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rubrix_hooks import flush, stats, track_bulk, track_error, track_login
from rubrix_hooks.publisher import SERVER_INVALID_PREFIX, SERVER_REASONS
from telemetry_core.contract import EVENT_KEYS, RUBRIX_TASKS, validate_event
from telemetry_core import message
from telemetry_core.platform_info import PLATFORM_KEYS, platform_info
from tests.support import unique_messages, wait_until

CANARY = "CANARY-9c41"  # '-' can never be part of an error code, so no valid code carries it
MESSAGE_KEYS = {"type", "event", "anonymousId", "messageId", "timestamp", "properties", "context"}
EXAMPLES = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))


def canaried(inner: st.SearchStrategy[str] = st.text(max_size=40)) -> st.SearchStrategy[str]:
    return st.tuples(inner, inner).map(lambda parts: parts[0] + CANARY + parts[1])


# What a client may legitimately send in the two reported headers: anything, but no canary
# (their cleaned value is reported by design).
header_values = st.one_of(st.none(), st.text(max_size=600), st.binary(max_size=600), st.integers(),
                          st.lists(st.text(max_size=5), max_size=3)).filter(lambda v: CANARY not in str(v))
secret_headers = st.dictionaries(st.sampled_from(["cookie", "authorization", "x-rubrix-api-key", "referer",
                                                  "x-forwarded-for", "x-real-ip", "host"]), canaried(), max_size=4)


class Headers(dict):
    """A request's headers; `get` may be asked for names in any case."""

    def get(self, name, default=None):
        return super().get(name.lower(), default)


class FakeRequest:
    def __init__(self, headers) -> None:
        self.headers = headers


class BrokenHeaders:
    def get(self, name, default=None):
        raise RuntimeError(CANARY)


requests = st.one_of(
    st.builds(lambda secrets, agent, language: FakeRequest(Headers({**secrets, "user-agent": agent,
                                                                    "accept-language": language})),
              secret_headers, header_values, header_values),
    st.just(FakeRequest(BrokenHeaders())), st.just(FakeRequest(None)), st.just(None), st.just(object()))


class NamedUser(str):
    """A user name; the hook may compare it, never send it."""


usernames = st.one_of(st.just("rubrix"), canaried(), canaried().map(NamedUser), st.none(), st.integers())
tasks = st.one_of(st.sampled_from(sorted(RUBRIX_TASKS)), canaried(), st.none(), st.integers())
record_counts = st.one_of(st.integers(min_value=-5, max_value=2**60), st.booleans(), canaried(),
                          st.floats(allow_nan=True), st.none())
error_codes = st.one_of(st.from_regex(r"rubrix\.api\.errors::[A-Z][A-Za-z]{0,30}", fullmatch=True),
                        canaried(), st.text(max_size=300), st.none(), st.integers())


class HostileError(Exception):
    """An error whose every part but `code` carries the canary."""

    def __init__(self, code: object, payload: str) -> None:
        super().__init__(payload, {"metadata": payload})
        self.code = code
        self.params = {"name": payload, "records": [payload]}
        self.payload = payload

    def __str__(self) -> str:
        return self.payload

    def __repr__(self) -> str:
        return f"HostileError({self.payload!r})"


class CodeRaises(Exception):
    reason = CANARY  # a hostile exception from reading `code`

    @property
    def code(self):
        raise self


errors = st.one_of(st.builds(HostileError, error_codes, canaried()), st.just(CodeRaises()),
                   canaried(), st.none())


def fire(*hooks) -> None:
    async def run() -> None:
        for hook in hooks:
            result = await hook
            assert result is None

    asyncio.run(run())


def run_hook_examples(task_values: st.SearchStrategy = tasks) -> int:
    """Fires the hooks with hostile arguments; returns how many calls were made."""
    calls = 0

    @EXAMPLES
    @given(request=requests, username=usernames, task=task_values, records=record_counts, error=errors)
    def examples(request, username, task, records, error) -> None:
        nonlocal calls
        fire(track_login(request, username=username), track_bulk(task, records), track_error(error, request))
        calls += 3

    examples()
    return calls


# -- the example server and the middleware, over ASGI -------------------------------------------

dataset_names = st.one_of(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,30}", fullmatch=True), canaried(),
                          canaried(st.text(alphabet=string.ascii_lowercase + "-_", max_size=20)))
metadata = st.dictionaries(canaried(), st.one_of(canaried(), st.integers(), st.none()), max_size=3)
records = st.lists(st.fixed_dictionaries({"text": canaried(), "metadata": metadata, "id": canaried()}), max_size=4)
raw_header_values = st.binary(max_size=400).filter(lambda v: CANARY.encode() not in v)


def asgi_headers(secrets: dict[str, str], agent: bytes, language: bytes, api_key: bool) -> list[tuple[bytes, bytes]]:
    headers = [(name.encode(), value.encode("utf-8", "surrogatepass")) for name, value in secrets.items()]
    headers += [(b"user-agent", agent), (b"accept-language", language)]
    if api_key:
        headers.append((b"x-rubrix-api-key", b"rubrix.apikey"))
    return headers


async def asgi_call(app, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> int:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode("utf-8", "surrogatepass"),
             "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 6900)}
    chunks = [{"type": "http.request", "body": body, "more_body": False}]
    statuses: list[int] = []

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return statuses[0]


http_calls = st.tuples(
    st.sampled_from(["me", "bulk", "dataset"]), dataset_names,
    st.one_of(st.sampled_from(sorted(RUBRIX_TASKS)), canaried(st.text(alphabet=string.ascii_letters, max_size=9))),
    records, secret_headers, raw_header_values, raw_header_values, st.booleans(), canaried())


def run_http_examples(app) -> int:
    """Sends hostile requests to an ASGI app; returns how many were answered."""
    answered = 0

    @EXAMPLES
    @given(call=http_calls)
    def examples(call) -> None:
        nonlocal answered
        route, name, task, body_records, secrets, agent, language, api_key, user = call
        headers = asgi_headers(secrets, agent, language, api_key) + [(b"x-user", user.encode("utf-8", "surrogatepass"))]
        if route == "me":
            request = ("GET", "/api/me", b"")
        elif route == "bulk":
            request = ("POST", f"/api/datasets/{name}/{task}:bulk", json.dumps({"records": body_records}).encode())
        else:
            request = ("GET", f"/api/datasets/{name}", b"")
        status = asyncio.run(asgi_call(app, *request[:2], headers, request[2]))
        assert status < 500, (call, status)
        answered += 1

    examples()
    return answered


def middleware_app():
    """A Rubrix-shaped app without hooks of its own, observed by TelemetryMiddleware."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from rubrix_hooks import TelemetryMiddleware

    async def me(request):
        return JSONResponse({"username": request.headers.get("x-user"), "api_key": CANARY})

    async def bulk(request):
        payload = await request.json()
        if "x-rubrix-api-key" not in request.headers:
            return JSONResponse({"detail": {"code": "rubrix.api.errors::UnauthorizedError",
                                            "params": {"name": request.path_params["name"]}}}, status_code=401)
        return JSONResponse({"dataset": request.path_params["name"], "processed": len(payload["records"]),
                             "failed": 0, "records": payload["records"]})

    async def dataset(request):
        name = request.path_params["name"]
        return JSONResponse({"detail": {"code": f"rubrix.api.errors::{CANARY}" if "x" in name else
                                        "rubrix.api.errors::EntityNotFoundError",
                                        "params": {"name": name, "message": CANARY}}}, status_code=404)

    app = Starlette(routes=[Route("/api/me", me), Route("/api/datasets/{name}/{task}:bulk", bulk, methods=["POST"]),
                            Route("/api/datasets/{name}", dataset)])
    app.add_middleware(TelemetryMiddleware)
    return app


def assert_inside_the_contract(backend) -> list[dict]:
    raw = json.dumps([{"headers": r.headers, "body": r.body} for r in backend.requests], ensure_ascii=False)
    assert CANARY not in raw
    messages = backend.accepted_messages()
    for delivered in messages:  # not `message`: that is the module of the task message format
        assert set(delivered) == MESSAGE_KEYS and delivered["type"] == "track"
        event = {key: delivered[key] for key in EVENT_KEYS}
        assert validate_event(event) == event
        assert set(delivered["context"]) == set(PLATFORM_KEYS) and delivered["context"] == platform_info()
    return messages


def counting_worker_drops():
    """A function returning the events the workers dropped since now, by reason (tasks/counters.py)."""
    from telemetry_core.settings import load_settings
    from tasks import counters

    settings_ = load_settings()
    before = counters.read_counts(settings_)["dropped"]

    def dropped_since() -> dict[str, int]:
        # The worker's drops only: the server adds its own to the same counts, under its reasons.
        now = {reason: n for reason, n in counters.read_counts(settings_)["dropped"].items()
               if reason not in SERVER_REASONS and not reason.startswith(SERVER_INVALID_PREFIX)}
        return {reason: n - before.get(reason, 0) for reason, n in now.items() if n > before.get(reason, 0)}

    return dropped_since


def test_hooks_example_server_and_middleware_never_leak_and_stay_in_the_contract(pipeline):
    from rubrix_hooks.example_app import app as example_app

    worker_counts = counting_worker_drops()
    published_before = stats()["published"]
    # Here also str subclasses that claim to equal anything: the hook must reduce them to
    # an exact str or drop them, and the worker's re-validation stops whatever gets past.
    hook_calls = run_hook_examples(st.one_of(tasks, canaried().map(EqualsEverything)))
    example_requests = run_http_examples(example_app)
    middleware_requests = run_http_examples(middleware_app())
    assert flush(10)
    published = stats()["published"] - published_before

    # The worker delivers each event or drops it (the str subclasses): wait until all are accounted for.
    def accounted() -> int:
        return len(unique_messages(pipeline.accepted_messages())) + sum(worker_counts().values())

    assert wait_until(lambda: accounted() >= published, timeout=30)
    messages = assert_inside_the_contract(pipeline)
    assert accounted() == published
    assert set(worker_counts()) <= {"invalid: task is not a Rubrix task"}
    # Every call that is inside the contract produced its event: the hooks did not
    # silently stop (each example has one valid-or-not login, bulk and error).
    assert published >= 1 and hook_calls >= 3 and example_requests >= 1 and middleware_requests >= 1
    print(f"hostile hooks: {hook_calls} hook calls, {example_requests} example-server and "
          f"{middleware_requests} middleware requests -> {published} events, all inside the contract")


# -- the hook -> broker boundary: what leaves the server process ----------------------------------

@pytest.fixture
def captured(monkeypatch):
    """The hooks' publisher with a sender that keeps each task message's kwargs, encoded as Celery would."""
    from kombu.utils.json import dumps

    from rubrix_hooks import telemetry
    from rubrix_hooks.publisher import Publisher

    batches: list[str] = []
    publisher = Publisher(telemetry.settings, make_sender=lambda: lambda kwargs: batches.append(dumps(kwargs)))
    monkeypatch.setattr(telemetry, "_publisher", publisher)
    yield batches
    publisher.close(1)


def test_hooks_hand_the_broker_nothing_outside_the_contract(captured):
    calls = run_hook_examples()
    assert flush(5)
    assert calls and captured
    handed = "".join(captured)
    assert CANARY not in handed
    for batch in captured:
        received = message.read([], json.loads(batch))
        assert received.format == 2 and not received.dropped and received.platform == platform_info()
        for event in received.events:
            assert validate_event(event) == event


class EqualsEverything(str):
    """A str that compares equal to anything: passes `in RUBRIX_TASKS` while carrying other text."""

    def __eq__(self, other):
        return True

    def __hash__(self):
        return hash("TextClassification")


def test_str_subclass_task_does_not_carry_its_text_to_the_broker(captured):
    fire(track_bulk(EqualsEverything(CANARY), 1))
    assert flush(5)
    assert CANARY not in "".join(captured)


class UnhashableReason(Exception):
    reason = ["not", "hashable"]

    @property
    def code(self):
        raise self


def test_hook_never_raises_whatever_the_error_object_does(captured):
    fire(track_error(UnhashableReason(), FakeRequest(Headers())))
