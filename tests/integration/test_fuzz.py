"""Property-based fuzzing of every REST route (through the real Envoy) and every RPC (through the stubs
and as raw bytes): hostile path segments, query values, JSON bodies, headers and keys of every kind.

Whatever arrives, the answer is never a 5xx (gRPC: never UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS or
UNIMPLEMENTED), never carries a traceback or a Python class name, and every error is a JSON
google.rpc.Status with one ErrorInfo; the service is healthy afterwards.

Hypothesis runs with a fixed seed (`FUZZ_SEED`) and `FUZZ_EXAMPLES` examples per property (200 by
default, a few seconds each; `make fuzz` runs 3,000; another seed explores other inputs). The examples
run in a thread with its own event loop and clients, because the server under test serves on the test
session's loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import grpc
import pytest
import yarl
from google.api import annotations_pb2
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from server import app
from server.localstack.envoy import Envoy
from tests.conftest import ROOT_KEY, Org

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
SEED = int(os.environ.get("FUZZ_SEED", "20261130"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
SERVICES = app.SERVICES  # every service the server registers
FORBIDDEN_CODES = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNIMPLEMENTED,
}
LEAKS = re.compile(r"Traceback|<class |\b[A-Z][a-zA-Z]+(Error|Exception)\b|File \"/")

# Strings that have broken services like this one, plus names that exist here, so that some requests
# get past validation and reach deeper code.
HOSTILE = [
    "",
    "a",
    "%2F",
    "%00",
    "../",
    "..%2F..%2Fetc%2Fpasswd",
    "%C3",
    "%ff%fe",
    "\x00",
    "\u202e\u0000",
    "😀" * 3,
    "' OR 1=1 --",
    "'; DROP TABLE organizations.org_profiles; --",
    "`project.dataset.table`",
    "{{ 7 * 7 }}",
    "{% for x in range(10**9) %}{% endfor %}",
    "${jndi:ldap://127.0.0.1/x}",
    "<script>alert(1)</script>",
    "\\",
    "a" * 10_000,
    "é" * 5_000,
    "9" * 400,
    "-1",
    "NaN",
    "null",
    "true",
    "2025-01-01",
    "2025-02-30",
    "1825-01-01",
    "9999-12-31",
    "demo",
    "engine",
    "runs",
    "quick",
    "costs",
    "monthly_cost",
    "saas_subscription",
    "normalize_saas_plan_values",
    "organizations",
    "migrations",
    "FAILED",
    "e30",
    "30 2 * * *",
    "*/1 * * * *",
    "America/New_York",
    "engine/runs/nightly",
    "RUN_FAILED",
    "https://hooks.slack.test/x",
]
TEXT = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40))
JSON_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
HEADER_VALUE = st.one_of(
    st.sampled_from(["garbage", "!!!", "1n", "gzip", "a" * 9000, "", "\t", "deflate, evil"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
)
EXTRA_HEADERS = st.dictionaries(
    st.sampled_from(
        [
            "grpc-timeout",
            "grpc-encoding",
            "grpc-accept-encoding",
            "grpc-status",
            "grpc-message",
            "x-api-key-bin",
            "x-anything-bin",
            "content-type",
            "te",
            "x-request-id",
            "x-forwarded-for",
            "x-ca-root-key",
            "x-api-key",
            "content-encoding",
            "transfer-encoding",
        ]
    ),
    HEADER_VALUE,
    max_size=3,
)


@dataclass(frozen=True)
class Route:
    """One REST route of a `google.api.http` annotation."""

    method: str
    template: str
    body: str
    input_fields: tuple[FieldDescriptor, ...]

    @property
    def variables(self) -> list[str]:
        return re.findall(r"\{(\w+)\}", self.template)


def _methods() -> list[MethodDescriptor]:
    pool = descriptor_pool.Default()
    return [m for name in SERVICES for m in pool.FindServiceByName(name).methods]


def _routes() -> list[Route]:
    found = []
    for method in _methods():
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        assert verb is not None, method.full_name
        found.append(Route(verb.upper(), getattr(rule, verb), rule.body, tuple(method.input_type.fields)))
    return found


ROUTES = _routes()
FIELD_NAMES = sorted({f.name for r in ROUTES for f in r.input_fields})


def test_every_rpc_has_a_rest_route() -> None:
    assert len(ROUTES) == len(_methods()) >= 11


@dataclass
class Keys:
    org: Org

    def choose(self, kind: str) -> dict[str, str]:
        return {
            "none": {},
            "org": {"X-API-Key": self.org.key.api_key},
            "root": {"X-CA-Root-Key": ROOT_KEY},
            "both": {"X-API-Key": self.org.key.api_key, "X-CA-Root-Key": ROOT_KEY},
            "wrong": {"X-API-Key": "ca_" + "x" * 43, "X-CA-Root-Key": "wrong"},
            "huge": {"X-API-Key": "k" * 7000},
        }[kind]


KEY_KINDS = st.sampled_from(["none", "org", "root", "both", "wrong", "huge"])


def _segment(value: str, raw: bool) -> str:
    return value if raw else quote(value, safe="")


class Loop:
    """An event loop in its own thread: the examples run there, the server keeps its own loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@contextmanager
def thread_loop() -> Iterator[Loop]:
    loop = Loop()
    try:
        yield loop
    finally:
        loop.close()


def check_rest_answer(status: int, text: str, what: str) -> None:
    assert status < 500, f"{what} -> {status}: {text[:500]}"
    assert not LEAKS.search(text), f"{what} -> {status}: {text[:500]}"
    if status >= 400:
        body = json.loads(text)
        assert isinstance(body["code"], int) and isinstance(body["message"], str), text[:500]
        infos = [d for d in body["details"] if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"]
        assert len(infos) == 1 and infos[0]["reason"], text[:500]
        assert len(text) < 16 * 1024, f"{what}: an error body of {len(text)} bytes"


async def test_fuzz_rest_routes(envoy: Envoy, service: app.Service, acme: Org) -> None:
    keys = Keys(acme)

    def property_test() -> None:
        with thread_loop() as loop:
            session: aiohttp.ClientSession = loop.run(_session(envoy.rest_url))

            @seed(SEED)
            @SETTINGS
            @given(
                route=st.sampled_from(ROUTES),
                segments=st.lists(st.tuples(TEXT, st.booleans()), min_size=4, max_size=4),
                query=st.dictionaries(
                    st.one_of(
                        st.sampled_from(
                            [
                                "page_size",
                                "page_token",
                                "provider",
                                "pipeline",
                                "status",
                                "dry_run",
                                "dataset",
                                "force",
                                "names",
                                "run_id",
                                "wait",
                                "nope",
                            ]
                        ),
                        TEXT,
                    ),
                    TEXT,
                    max_size=3,
                ),
                body=st.one_of(
                    st.none(),
                    st.dictionaries(st.sampled_from(FIELD_NAMES) | TEXT, JSON_VALUE, max_size=4),
                    JSON_VALUE,
                    st.binary(max_size=64),
                ),
                key_kind=KEY_KINDS,
                extra=EXTRA_HEADERS,
            )
            def one(
                route: Route,
                segments: list[tuple[str, bool]],
                query: dict[str, str],
                body: Any,
                key_kind: str,
                extra: dict[str, str],
            ) -> None:
                path = route.template
                for variable, (value, raw) in zip(route.variables, segments, strict=False):
                    path = path.replace("{" + variable + "}", _segment(value, raw))
                if query:
                    path += "?" + "&".join(
                        f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in query.items()
                    )
                headers = {**extra, **keys.choose(key_kind)}
                if isinstance(body, bytes):
                    data: bytes | None = body
                elif body is None:
                    data = None
                else:
                    data = json.dumps(body).encode()
                status, text = loop.run(_rest(session, route.method, path, headers, data))
                check_rest_answer(status, text, f"{route.method} {path[:200]}")

            try:
                one()
            finally:
                loop.run(session.close())

    await asyncio.to_thread(property_test)
    await assert_healthy(service, envoy, acme)


async def _session(base_url: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        base_url=base_url, timeout=aiohttp.ClientTimeout(total=60), skip_auto_headers=("Content-Type",)
    )


async def _rest(
    session: aiohttp.ClientSession, method: str, path: str, headers: dict[str, str], data: bytes | None
) -> tuple[int, str]:
    url = yarl.URL(path, encoded=True)
    try:
        async with session.request(method, url, headers=headers, data=data) as r:
            return r.status, (await r.read()).decode("utf-8", "replace")
    except (aiohttp.ClientResponseError, ValueError) as exc:
        # The client itself refused to send it (a header value it considers invalid): nothing reached
        # the service, which is fine for this property.
        return 0, f"not sent: {exc}"


def _value(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return st.dictionaries(TEXT, TEXT, max_size=6) | st.just({f"k{i}": "v" for i in range(300)})
    if field.message_type is not None and field.is_repeated:  # repeated messages: lists of fuzzed elements
        element = _request_type(field.message_type)
        return st.lists(element, max_size=3) | st.just([GetMessageClass(field.message_type)()] * 150)
    if field.is_repeated:
        return st.lists(TEXT, max_size=5) | st.just(["n"] * 500)
    if field.type == FieldDescriptor.TYPE_STRING:
        return TEXT
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_INT32:
        return st.integers(min_value=-(2**31), max_value=2**31 - 1)
    raise AssertionError(f"no strategy for {field.full_name}")


def _request(method: MethodDescriptor) -> st.SearchStrategy[Message]:
    return _request_type(method.input_type)


def _request_type(message_type: Any) -> st.SearchStrategy[Message]:
    cls = GetMessageClass(message_type)
    fields = {f.name: _value(f) for f in message_type.fields}

    def build(values: dict[str, Any]) -> Message:
        if values.get("wait"):
            values["wait"] = False  # a fuzzed run must not hold the call open for minutes
        message = cls()
        for name, value in values.items():
            target = getattr(message, name)
            if isinstance(value, dict):
                target.update(value)
            elif isinstance(value, list):
                target.extend(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries({}, optional=fields).map(build)


METHODS = _methods()
REQUESTS = st.one_of(*(st.tuples(st.just(m), _request(m)) for m in METHODS))


async def test_fuzz_rpcs(service: app.Service, envoy: Envoy, acme: Org) -> None:
    keys = Keys(acme)
    target = f"127.0.0.1:{service.port}"

    def property_test() -> None:
        with thread_loop() as loop:
            channel: aio.Channel = loop.run(_channel(target))

            @seed(SEED)
            @SETTINGS
            @given(
                call=REQUESTS,
                raw=st.one_of(st.none(), st.binary(max_size=80)),
                key_kind=KEY_KINDS,
            )
            def one(call: tuple[MethodDescriptor, Message], raw: bytes | None, key_kind: str) -> None:
                method, request = call
                metadata = tuple((k.lower(), v) for k, v in keys.choose(key_kind).items())
                payload = raw if raw is not None else request.SerializeToString()
                code, details = loop.run(_rpc(channel, method, payload, metadata))
                what = f"{method.name}({payload[:100]!r})"
                assert code not in FORBIDDEN_CODES, f"{what} -> {code}: {details}"
                assert not LEAKS.search(details or ""), f"{what} -> {code}: {details}"

            try:
                one()
            finally:
                loop.run(channel.close())

    await asyncio.to_thread(property_test)
    await assert_healthy(service, envoy, acme)


async def _channel(target: str) -> aio.Channel:
    return aio.insecure_channel(target)


async def _rpc(
    channel: aio.Channel, method: MethodDescriptor, payload: bytes, metadata: tuple[tuple[str, str], ...]
) -> tuple[grpc.StatusCode, str]:
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            call = stream(payload, metadata=metadata, timeout=3)
            async for _ in call:
                pass
        else:
            unary = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            await unary(payload, metadata=metadata, timeout=20)
    except aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming:
            return grpc.StatusCode.OK, ""  # a watched run that is still running
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def assert_healthy(service: app.Service, envoy: Envoy, org: Org) -> None:
    async with aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with (
        aiohttp.ClientSession(base_url=envoy.rest_url) as session,
        session.get("/api/v1/pipelines", headers={"X-API-Key": org.key.api_key}) as r,
    ):
        assert r.status == 200, await r.text()
        assert (await r.json())["pipelines"]


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
