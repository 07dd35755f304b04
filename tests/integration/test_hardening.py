"""Hostile input through the real Envoy and over gRPC: every bad request is a clean 4xx with a
google.rpc.Status (never a 5xx, never a Python class name, never an unbounded echo), and no caller's bad
request breaks another org's calls on the shared upstream connection."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import aiohttp
import grpc
import pytest
from grpc import aio

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from server import app
from server.orgs import Plan
from tests.conftest import ROOT_HEADERS, Org, make_org
from tests.integration.rpc_errors import error_info

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
RS = pipeline_run_pb2
PS = pipeline_service_pb2
MAX_ERROR_BODY = 8 * 1024  # what any error body may weigh, whatever the input


async def status_body(response: aiohttp.ClientResponse, http_status: int, reason: str) -> dict[str, Any]:
    """A JSON google.rpc.Status with this HTTP status and ErrorInfo reason, small and free of internals."""
    text = await response.text()
    assert response.status == http_status, text
    assert response.content_type == "application/json"
    assert len(text) < MAX_ERROR_BODY, len(text)
    for leak in ("Traceback", "<class", "Error'>", "DecodeError", "Exception"):
        assert leak not in text, text
    body: dict[str, Any] = json.loads(text)
    infos = [d for d in body["details"] if d["@type"] == ERROR_INFO]
    assert len(infos) == 1, body
    assert infos[0]["reason"] == reason, body
    assert infos[0]["domain"] == "cloudact.io"
    return body


def violations(body: dict[str, Any]) -> list[dict[str, str]]:
    found = [d for d in body["details"] if d["@type"] == BAD_REQUEST]
    assert len(found) == 1, body
    result: list[dict[str, str]] = found[0]["field_violations"]
    return result


ROOMY = Plan(daily_limit=10_000, monthly_limit=100_000, concurrent_limit=50, requests_per_minute=10_000)


@pytest.fixture(scope="module")
async def roomy(service: app.Service) -> Org:
    """An org whose quotas never get in the way of these tests (acme's are shared with other modules)."""
    return await make_org(service, "roomy", plan=ROOMY)


def run_url(org: Org, pipeline: str = "engine/runs/quick") -> str:
    return f"/api/v1/pipelines/run/{org.slug}/{pipeline}"


# --- bytes that are not UTF-8 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/api/v1/procedures/%C3", "/api/v1/procedures/a%ff%fe", "/api/v1/pipelines/runs/%C3%28"]
)
async def test_invalid_utf8_in_a_path_segment(http: aiohttp.ClientSession, acme: Org, path: str) -> None:
    headers = {**ROOT_HEADERS, **acme.headers}
    async with http.get(path, headers=headers) as r:
        body = await status_body(r, 400, "MALFORMED_REQUEST")
    assert body["code"] == 3 and "UTF-8" in body["message"]


async def test_invalid_utf8_in_a_query_value_and_a_json_string(
    http: aiohttp.ClientSession, acme: Org
) -> None:
    async with http.get("/api/v1/pipelines/runs?page_token=%ff%fe", headers=acme.headers) as r:
        await status_body(r, 400, "MALFORMED_REQUEST")
    raw = b'{"request_id": "\xc3\x28"}'
    headers = {**acme.headers, "Content-Type": "application/json"}
    async with http.post(run_url(acme), headers=headers, data=raw) as r:
        assert r.status == 400, await r.text()


async def test_invalid_utf8_over_grpc_is_invalid_argument(channel: aio.Channel, acme: Org) -> None:
    """A gRPC client sending raw bytes where a string belongs: INVALID_ARGUMENT, not UNKNOWN."""
    raw_call = channel.unary_unary(
        "/cloudact.pipeline.v1.PipelineService/GetPipelineRun",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(aio.AioRpcError) as caught:
        await raw_call(b"\x0a\x02\xc3\x28", metadata=acme.metadata, timeout=10)  # field 1 = b"\xc3("
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "MALFORMED_REQUEST"
    assert "class" not in (caught.value.details() or "")
    with pytest.raises(aio.AioRpcError) as caught:
        await raw_call(b"\x0a\xff\xff\xff", metadata=acme.metadata, timeout=10)  # corrupt wire format
    assert error_info(caught.value).reason == "MALFORMED_REQUEST"


# --- values of the wrong shape ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"parameters": {"a": {"b": 1}}}, ""),
        ({"parameters": {"a": 1}}, "parameters"),
        ({"parameters": ["a"]}, "parameters"),
        ({"date": 5}, "date"),
        ({"wait": "yes please"}, "wait"),
        ({"force_refresh": {"x": 1}}, "force_refresh"),
    ],
)
async def test_json_value_of_the_wrong_shape(
    http: aiohttp.ClientSession, acme: Org, body: dict[str, Any], field: str
) -> None:
    async with http.post(run_url(acme), headers=acme.headers, json=body) as r:
        text = await r.text()
        assert r.status == 400, text
        assert "Wire format" not in text and "<class" not in text
        parsed = json.loads(text)
    assert parsed["code"] == 3
    assert field in parsed["message"]


# --- transport headers through the REST door ---------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        {"grpc-timeout": "garbage"},
        {"grpc-encoding": "evil"},
        {"grpc-accept-encoding": "evil"},
        {"x-api-key-bin": "!!!"},
        {"grpc-status-details-bin": "???"},
        {"grpc-timeout": "1n"},
    ],
)
async def test_client_grpc_and_binary_headers_are_dropped(
    http: aiohttp.ClientSession, acme: Org, header: dict[str, str]
) -> None:
    async with http.get("/api/v1/pipelines", headers={**acme.headers, **header}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["pipelines"]


async def test_oversized_headers_are_431_with_a_status(http: aiohttp.ClientSession, acme: Org) -> None:
    for size in (10_000, 16_000):
        async with http.get("/api/v1/pipelines", headers={**acme.headers, "x-big": "a" * size}) as r:
            body = await status_body(r, 431, "HEADERS_TOO_LARGE")
        assert "x-api-key" not in body["message"]


async def test_grpc_over_http1_is_refused(http: aiohttp.ClientSession, acme: Org) -> None:
    async with http.post(
        "/cloudact.pipeline.v1.PipelineService/ListPipelines",
        headers={**acme.headers, "content-type": "application/grpc"},
        data=b"\x00\x00\x00\x00\x00",
    ) as r:
        body = await status_body(r, 415, "GRPC_NEEDS_HTTP2")
    assert "HTTP/2" in body["message"]


# --- bounded input and bounded echoes ----------------------------------------------------------------------


async def test_thousands_of_parameters_are_refused_with_a_small_error(
    http: aiohttp.ClientSession, acme: Org
) -> None:
    parameters = {f"Bad Key {i}": "v" * 50 for i in range(2000)}
    async with http.post(run_url(acme), headers=acme.headers, json={"parameters": parameters}) as r:
        body = await status_body(r, 400, "REQUEST_TOO_LARGE")
    assert violations(body) == [
        {"field": "parameters", "description": "at most 50 entries (got 2000)", "reason": ""}
    ]


async def test_long_values_are_counted_not_echoed(http: aiohttp.ClientSession, acme: Org) -> None:
    long_date = "9" * 30_000
    async with http.post(run_url(acme), headers=acme.headers, json={"date": long_date}) as r:
        body = await status_body(r, 400, "REQUEST_TOO_LARGE")
    assert violations(body)[0]["field"] == "date"
    assert "99999" not in json.dumps(body)

    names = [f"name_{i}" for i in range(1500)]
    async with http.post("/api/v1/procedures/sync", headers=ROOT_HEADERS, json={"names": names}) as r:
        body = await status_body(r, 400, "REQUEST_TOO_LARGE")
    assert violations(body)[0]["description"] == "at most 200 entries (got 1500)"

    run_id = "a" * 7000
    async with http.get(f"/api/v1/pipelines/runs/{run_id}", headers=acme.headers) as r:
        body = await status_body(r, 400, "REQUEST_TOO_LARGE")
    assert "aaaaaaaa" not in json.dumps(body)


async def test_many_bad_values_give_a_bounded_list_of_violations(
    http: aiohttp.ClientSession, acme: Org
) -> None:
    parameters = {f"Bad{i}": "x" for i in range(49)}
    async with http.post(run_url(acme), headers=acme.headers, json={"parameters": parameters}) as r:
        body = await status_body(r, 400, "INVALID_ARGUMENT")
    shown = violations(body)
    assert len(shown) == 21  # 20 and a last one that counts the rest
    assert shown[-1] == {"field": "*", "description": "29 more not shown", "reason": ""}


async def test_unknown_run_is_404_with_its_bounded_id(http: aiohttp.ClientSession, acme: Org) -> None:
    run_id = "f" * 64
    async with http.get(f"/api/v1/pipelines/runs/{run_id}", headers=acme.headers) as r:
        body = await status_body(r, 404, "RUN_NOT_FOUND")
    assert len(body["message"]) < 200


async def test_envoy_echoes_are_clipped(http: aiohttp.ClientSession, acme: Org) -> None:
    async with http.get(f"/api/v1/pipelines?{'q' * 6000}=1", headers=acme.headers) as r:
        body = await status_body(r, 400, "MALFORMED_REQUEST")
    assert len(body["message"]) < 300 and body["message"].endswith("…")
    wait = 'é\\"<' * 3000
    async with http.post(run_url(acme), headers=acme.headers, data=f'{{"wait": "{wait}"}}') as r:
        body = await status_body(r, 400, "MALFORMED_REQUEST")
    assert len(body["message"]) < 300


# --- page tokens ------------------------------------------------------------------------------------------


def token(after: object) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "forged",
    [
        token("0001-01-01T00:00:00+23:59|x"),
        token("0001-01-01T00:00:00+23:59|" + "0" * 32),
        token("2025-01-01T00:00:00|" + "0" * 32),  # naive
        token("2025-01-01T00:00:00+02:00|" + "0" * 32),  # not UTC
        token("9999-12-31T23:59:59+00:00|../../etc"),
        token("nonsense"),
        token(12),
        token(["a"]),
        "%%%",
        "e30",
    ],
)
async def test_forged_run_page_tokens_are_400(
    http: aiohttp.ClientSession,
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub,
    roomy: Org,
    forged: str,
) -> None:
    # A run in flight, so the comparison with live runs happens too.
    await pipelines.RunPipeline(
        PS.RunPipelineRequest(
            org_slug=roomy.slug,
            provider="engine",
            domain="runs",
            pipeline="sleepy",
            parameters={"sleep": "1", "n": uuid.uuid4().hex},
        ),
        metadata=roomy.metadata,
    )
    async with http.get("/api/v1/pipelines/runs", params={"page_token": forged}, headers=roomy.headers) as r:
        await status_body(r, 400, "INVALID_PAGE_TOKEN")


async def test_a_real_run_page_token_still_works(http: aiohttp.ClientSession, roomy: Org) -> None:
    async with http.get("/api/v1/pipelines/runs", params={"page_size": "1"}, headers=roomy.headers) as r:
        first = await r.json()
        assert r.status == 200, first
    assert first["next_page_token"]
    params = {"page_size": "1", "page_token": first["next_page_token"]}
    async with http.get("/api/v1/pipelines/runs", params=params, headers=roomy.headers) as r:
        second = await r.json()
        assert r.status == 200, second
    assert second["runs"][0]["run_id"] != first["runs"][0]["run_id"]


# --- one run-window validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"parameters": {"start_date": "1825-01-01", "end_date": "2025-01-01"}}, {"start_date", "end_date"}),
        ({"parameters": {"date": "2999-01-01"}}, {"date"}),
        ({"parameters": {"start_date": "2025-01-01"}}, {"end_date"}),
        ({"parameters": {"date": "yesterday"}}, {"date"}),
        ({"parameters": {"start_date": "2025-01-02", "end_date": "2025-01-01"}}, {"start_date", "end_date"}),
        ({"date": "2025-01-01", "parameters": {"date": "2025-01-02"}}, {"parameters[date]"}),
        ({"start_date": "1825-01-01", "end_date": "2025-01-01"}, {"start_date", "end_date"}),
    ],
)
async def test_every_way_of_setting_the_window_is_validated(
    http: aiohttp.ClientSession, acme: Org, body: dict[str, Any], fields: set[str]
) -> None:
    async with http.post(run_url(acme), headers=acme.headers, json=body) as r:
        parsed = await status_body(r, 400, "INVALID_ARGUMENT")
    assert {v["field"] for v in violations(parsed)} == fields


async def test_a_window_given_as_parameters_is_the_run_window(
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub, roomy: Org
) -> None:
    run = (
        await pipelines.RunPipeline(
            PS.RunPipelineRequest(
                org_slug=roomy.slug,
                provider="engine",
                domain="runs",
                pipeline="quick",
                parameters={"start_date": "2025-01-01", "end_date": "2025-01-31", "label": uuid.uuid4().hex},
                wait=True,
            ),
            metadata=roomy.metadata,
            timeout=60,
        )
    ).run
    assert run.state == RS.RUN_STATE_COMPLETED, run
    assert (run.parameters["start_date"], run.parameters["end_date"]) == ("2025-01-01", "2025-01-31")


# --- no caller breaks another's calls ----------------------------------------------------------------------


def worst_requests(attacker: Org) -> list[tuple[str, str, dict[str, str], bytes]]:
    """The heaviest hostile requests of this module, as (method, path, headers, body)."""
    json_headers = {**attacker.headers, "Content-Type": "application/json"}
    many = json.dumps({"parameters": {f"Bad Key {i}": "v" * 500 for i in range(2000)}}).encode()
    bad_keys = json.dumps({"parameters": {f"Bad{i}": "x" * 1000 for i in range(50)}}).encode()
    return [
        ("POST", run_url(attacker), json_headers, many),
        ("POST", run_url(attacker), json_headers, bad_keys),
        ("POST", run_url(attacker), json_headers, json.dumps({"date": "1" * 500_000}).encode()),
        ("GET", "/api/v1/pipelines/runs/" + "a" * 7000, attacker.headers, b""),
        ("GET", "/api/v1/procedures/%C3", {**attacker.headers, **ROOT_HEADERS}, b""),
        ("GET", "/api/v1/pipelines", {**attacker.headers, "grpc-timeout": "garbage", "x-a-bin": "!!"}, b""),
        (
            "POST",
            "/api/v1/procedures/sync",
            {**ROOT_HEADERS, "Content-Type": "application/json"},
            json.dumps({"names": ["n" * 1000] * 1500}).encode(),
        ),
        ("POST", run_url(attacker), json_headers, b'{"parameters": {"a": {"b": 1}}}'),
    ]


async def test_org_b_is_unharmed_by_org_a_worst_requests(
    http: aiohttp.ClientSession, service: app.Service, acme: Org
) -> None:
    """Org A floods the gateway with its worst requests while org B runs pipelines with `wait` through
    the same Envoy (one worker, so one shared HTTP/2 connection to the server): B sees only 2xx, A only
    4xx."""
    victim = await make_org(service, "victim", plan=ROOMY)
    attacks = worst_requests(acme)
    stop = time.monotonic() + 8
    attacker_statuses: list[int] = []
    victim_statuses: list[tuple[int, str]] = []

    async def attacker(lane: int) -> None:
        i = lane
        while time.monotonic() < stop:
            method, path, headers, data = attacks[i % len(attacks)]
            i += 1
            async with http.request(method, path, headers=headers, data=data or None) as r:
                await r.read()
                attacker_statuses.append(r.status)

    async def victim_calls(lane: int) -> None:
        n = 0
        while time.monotonic() < stop:
            n += 1
            body = {"parameters": {"sleep": "0.3", "n": f"{lane}-{n}"}, "wait": True}
            async with http.post(
                run_url(victim, "engine/runs/sleepy"), headers=victim.headers, json=body
            ) as r:
                victim_statuses.append((r.status, (await r.text())[:300]))

    await asyncio.gather(victim_calls(1), victim_calls(2), *(attacker(lane) for lane in range(6)))
    assert victim_statuses and all(status == 200 for status, _ in victim_statuses), victim_statuses
    assert len(victim_statuses) >= 4
    assert attacker_statuses and all(400 <= s < 500 or s == 200 for s in attacker_statuses), sorted(
        set(attacker_statuses)
    )
    assert any(s >= 400 for s in attacker_statuses)
    async with http.get("/api/v1/pipelines", headers=victim.headers) as r:
        assert r.status == 200
