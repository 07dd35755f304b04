"""The REST gateway (Envoy's gRPC-JSON transcoder): request validation, error bodies, JSON naming, paging."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from google.protobuf import json_format

from cloudact.pipeline.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc
from server import app
from tests.conftest import ROOT_HEADERS, Org

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
MIGRATION = "normalize_saas_plan_values"
GRPC_HEADERS = ("grpc-status", "grpc-message", "grpc-accept-encoding")

EXPECTED_STEPS = {
    "demo/costs/monthly_cost": [
        {"step_id": "convert", "ps_type": "generic.procedure_executor", "depends_on": []}
    ],
    "demo/usage/daily_usage": [
        {"step_id": "extract", "ps_type": "generic.procedure_executor", "depends_on": []},
        {"step_id": "transform", "ps_type": "generic.procedure_executor", "depends_on": ["extract"]},
    ],
}


def no_grpc_headers(response: aiohttp.ClientResponse) -> None:
    for name in GRPC_HEADERS:
        assert name not in response.headers, dict(response.headers)


GATEWAY_REASONS = {400: (3, "MALFORMED_REQUEST"), 404: (5, "ROUTE_NOT_FOUND"), 413: (3, "REQUEST_TOO_LARGE")}


async def gateway_error(response: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """An error Envoy produced itself (no RPC ran): a google.rpc.Status JSON body like the service's,
    with the gRPC code and one ErrorInfo whose reason names the gateway's complaint."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    code, reason = GATEWAY_REASONS[status]
    assert body["code"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    assert body["details"] == [{"@type": ERROR_INFO, "reason": reason, "domain": "cloudact.io"}]
    assert "x-local-reply" not in response.headers
    no_grpc_headers(response)
    return body


async def rpc_error(response: aiohttp.ClientResponse, status: int, code: int, reason: str) -> dict[str, Any]:
    """An error the service returned: google.rpc.Status JSON with one ErrorInfo."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["code"] == code
    infos = [d for d in body["details"] if d["@type"] == ERROR_INFO]
    assert len(infos) == 1, body
    assert infos[0]["reason"] == reason
    assert infos[0]["domain"] == "cloudact.io"
    no_grpc_headers(response)
    return body


async def sync(http: aiohttp.ClientSession, body: object) -> dict[str, Any]:
    async with http.post("/api/v1/procedures/sync", headers=ROOT_HEADERS, json=body) as r:
        result = await r.json()
        assert r.status == 200, result
        no_grpc_headers(r)
    return result


# --- requests Envoy rejects itself ----------------------------------------------------------------------


async def test_bad_json_body(http: aiohttp.ClientSession) -> None:
    headers = {**ROOT_HEADERS, "Content-Type": "application/json"}
    async with http.post("/api/v1/procedures/sync", headers=headers, data=b'{"force":') as r:
        await gateway_error(r, 400)


async def test_bad_json_body_without_credentials_is_still_400(http: aiohttp.ClientSession) -> None:
    """Transcoding fails before any RPC, so the request never reaches authentication."""
    async with http.post(
        "/api/v1/procedures/sync", headers={"Content-Type": "application/json"}, data=b"[1, 2"
    ) as r:
        await gateway_error(r, 400)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nope"),
        ("GET", "/api/v2/pipelines"),
        ("GET", "/api/v1/pipelines/monthly_cost"),
        ("DELETE", "/api/v1/pipelines"),
        ("POST", "/api/v1/pipelines"),
        ("PUT", "/api/v1/procedures/sync"),
    ],
)
async def test_unknown_route(http: aiohttp.ClientSession, acme: Org, method: str, path: str) -> None:
    async with http.request(method, path, headers={**acme.headers, **ROOT_HEADERS}) as r:
        body = await gateway_error(r, 404)
    assert path in body["message"]


async def test_unknown_query_parameter(http: aiohttp.ClientSession, acme: Org) -> None:
    async with http.get("/api/v1/pipelines?nope=1", headers=acme.headers) as r:
        body = await gateway_error(r, 400)
    assert "nope" in body["message"]


@pytest.mark.parametrize("value", ["abc", "1.5", "99999999999"])
async def test_bad_query_value(http: aiohttp.ClientSession, acme: Org, value: str) -> None:
    async with http.get("/api/v1/pipelines", params={"page_size": value}, headers=acme.headers) as r:
        body = await gateway_error(r, 400)
    assert "page_size" in body["message"]


async def test_body_may_not_override_path_parameter(http: aiohttp.ClientSession, acme: Org) -> None:
    async with http.post(
        f"/api/v1/migrations/{MIGRATION}/execute",
        headers=ROOT_HEADERS,
        json={"name": "other", "dataset": acme.dataset, "dry_run": True},
    ) as r:
        body = await gateway_error(r, 400)
    assert MIGRATION in body["message"]
    assert "other" in body["message"]


async def test_oversized_body(http: aiohttp.ClientSession) -> None:
    big = json.dumps({"names": ["x" * (2 * 1024 * 1024)]}).encode()
    headers = {**ROOT_HEADERS, "Content-Type": "application/json"}
    async with http.post("/api/v1/procedures/sync", headers=headers, data=big) as r:
        await gateway_error(r, 413)


# --- requests that reach the service --------------------------------------------------------------------


async def test_unknown_body_field_is_dropped(http: aiohttp.ClientSession) -> None:
    """Envoy's transcoder ignores unknown JSON body fields (unlike unknown query parameters): the call
    runs as if the body were `{}`. After a first sync, a second one therefore changes nothing."""
    baseline = await sync(http, {})
    assert baseline["failed"] == 0, baseline
    names = [r["name"] for r in baseline["results"]]
    assert MIGRATION in names

    result = await sync(http, {"nope": 1})
    assert [r["name"] for r in result["results"]] == names
    assert {r["outcome"] for r in result["results"]} == {"OUTCOME_UNCHANGED"}
    assert (result["created"], result["updated"], result["failed"]) == (0, 0, 0)
    assert result["unchanged"] == len(names)

    # The same with a known field next to the unknown one: the known field still counts.
    forced = await sync(http, {"nope": 1, "force": True, "names": [MIGRATION]})
    assert [(r["name"], r["outcome"]) for r in forced["results"]] == [(MIGRATION, "OUTCOME_UPDATED")]


async def test_service_error_is_google_rpc_status(http: aiohttp.ClientSession) -> None:
    """A 404 from the service differs from Envoy's 404: google.rpc code 5 and an ErrorInfo."""
    async with http.get("/api/v1/procedures/sp_does_not_exist", headers=ROOT_HEADERS) as r:
        body = await rpc_error(r, 404, 5, "PROCEDURE_NOT_FOUND")
    assert body["details"][0]["metadata"] == {"name": "sp_does_not_exist"}


async def test_sync_unknown_name_has_field_violation(http: aiohttp.ClientSession) -> None:
    async with http.post("/api/v1/procedures/sync", headers=ROOT_HEADERS, json={"names": ["nope"]}) as r:
        body = await rpc_error(r, 400, 3, "PROCEDURE_FILE_NOT_FOUND")
    bad = [d for d in body["details"] if d["@type"] == BAD_REQUEST]
    assert [v["field"] for v in bad[0]["field_violations"]] == ["names[0]"]


async def test_no_grpc_headers_in_responses(http: aiohttp.ClientSession, acme: Org) -> None:
    async with http.get("/api/v1/pipelines", headers=acme.headers) as r:
        assert r.status == 200
        no_grpc_headers(r)
        assert r.content_type == "application/json"
    async with http.get("/api/v1/pipelines") as r:
        assert r.status == 401
        no_grpc_headers(r)


# --- response shape and paging ---------------------------------------------------------------------------


def key_of(pipeline: dict[str, Any]) -> str:
    return f"{pipeline['provider']}/{pipeline['domain']}/{pipeline['pipeline']}"


def catalog_keys(service: app.Service, provider: str = "") -> list[str]:
    """The pipeline keys the service serves, in its order (the test configs under tests/data/configs)."""
    return [c.key for c in service.catalog.all() if not provider or c.provider == provider]


async def test_snake_case_keys(http: aiohttp.ClientSession, service: app.Service, acme: Org) -> None:
    async with http.get("/api/v1/pipelines", headers=acme.headers) as r:
        text = await r.text()
        assert r.status == 200, text
    body = json.loads(text)
    assert set(body) == {"pipelines", "next_page_token", "total_size"}
    # Primitive fields are printed even when empty.
    assert body["next_page_token"] == ""
    assert body["total_size"] == len(catalog_keys(service)) == len(body["pipelines"])
    for pipeline in body["pipelines"]:
        assert set(pipeline) == {
            "provider",
            "domain",
            "pipeline",
            "pipeline_id",
            "display_name",
            "description",
            "version",
            "steps",
        }
        for step in pipeline["steps"]:
            assert set(step) == {"step_id", "ps_type", "depends_on"}
    for camel in ("nextPageToken", "totalSize", "pipelineId", "displayName", "stepId", "psType", "dependsOn"):
        assert camel not in text


async def test_org_key_lists_pipelines_with_steps(
    http: aiohttp.ClientSession,
    service: app.Service,
    globex: Org,
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub,
) -> None:
    async with http.get("/api/v1/pipelines", headers=globex.headers) as r:
        body = await r.json()
        assert r.status == 200, body
    assert [key_of(p) for p in body["pipelines"]] == catalog_keys(service)
    by_key = {key_of(p): p for p in body["pipelines"]}
    for name, steps in EXPECTED_STEPS.items():
        assert by_key[name]["steps"] == steps
    daily = by_key["demo/usage/daily_usage"]
    assert (daily["pipeline_id"], daily["display_name"], daily["version"]) == (
        "demo_daily_usage",
        "Demo daily usage",
        "2",
    )
    assert daily["description"] == "Test config listed by ListPipelines."
    monthly = by_key["demo/costs/monthly_cost"]
    assert (monthly["pipeline_id"], monthly["description"]) == ("demo_monthly_cost", "")

    # REST returns exactly what the gRPC API returns.
    direct = await pipelines.ListPipelines(
        pipeline_service_pb2.ListPipelinesRequest(), metadata=globex.metadata
    )
    as_json = json_format.MessageToDict(
        direct, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    assert body == as_json


async def test_provider_filter(http: aiohttp.ClientSession, service: app.Service, acme: Org) -> None:
    async with http.get("/api/v1/pipelines", params={"provider": "demo"}, headers=acme.headers) as r:
        body = await r.json()
    assert [key_of(p) for p in body["pipelines"]] == catalog_keys(service, "demo")
    assert {p["provider"] for p in body["pipelines"]} == {"demo"}
    assert body["total_size"] == len(body["pipelines"]) >= 2
    async with http.get("/api/v1/pipelines", params={"provider": "nope"}, headers=acme.headers) as r:
        body = await r.json()
    assert body == {"pipelines": [], "next_page_token": "", "total_size": 0}


async def test_paging_walks_all_pipelines(
    http: aiohttp.ClientSession, service: app.Service, acme: Org
) -> None:
    expected = catalog_keys(service)
    seen: list[str] = []
    tokens: set[str] = set()
    token = ""
    for _ in range(len(expected) + 1):
        params = {"page_size": "1", **({"page_token": token} if token else {})}
        async with http.get("/api/v1/pipelines", params=params, headers=acme.headers) as r:
            body = await r.json()
            assert r.status == 200, body
        assert len(body["pipelines"]) == 1
        assert body["total_size"] == len(expected)
        seen.append(key_of(body["pipelines"][0]))
        token = body["next_page_token"]
        if not token:
            break
        assert token not in tokens
        tokens.add(token)
    assert token == ""
    assert seen == expected
    assert {"demo/costs/monthly_cost", "demo/usage/daily_usage"} <= set(seen)


async def test_paging_with_provider_filter(
    http: aiohttp.ClientSession, service: app.Service, acme: Org
) -> None:
    params = {"page_size": "1", "provider": "demo"}
    async with http.get("/api/v1/pipelines", params=params, headers=acme.headers) as r:
        first = await r.json()
    params["page_token"] = first["next_page_token"]
    async with http.get("/api/v1/pipelines", params=params, headers=acme.headers) as r:
        second = await r.json()
    assert [key_of(first["pipelines"][0]), key_of(second["pipelines"][0])] == catalog_keys(service, "demo")[
        :2
    ]


async def test_garbage_page_token(http: aiohttp.ClientSession, acme: Org) -> None:
    for garbage in ("garbage!!", "bm90IGpzb24", "e30"):  # not base64, not JSON, JSON without `after`
        async with http.get("/api/v1/pipelines", params={"page_token": garbage}, headers=acme.headers) as r:
            body = await rpc_error(r, 400, 3, "INVALID_PAGE_TOKEN")
        assert body["message"] == "invalid page token"
        bad = [d for d in body["details"] if d["@type"] == BAD_REQUEST]
        assert len(bad) == 1, body
        violations = bad[0]["field_violations"]
        assert [v["field"] for v in violations] == ["page_token"]
        assert violations[0]["description"]


async def test_negative_page_size(http: aiohttp.ClientSession, acme: Org) -> None:
    async with http.get("/api/v1/pipelines", params={"page_size": "-1"}, headers=acme.headers) as r:
        body = await rpc_error(r, 400, 3, "INVALID_ARGUMENT")
    bad = [d for d in body["details"] if d["@type"] == BAD_REQUEST]
    assert [v["field"] for v in bad[0]["field_violations"]] == ["page_size"]
