"""Every authentication failure mode, over REST through Envoy and over the generated gRPC stubs.

REST failures must come back as the HTTP code Envoy derives from the gRPC code, with a JSON
`google.rpc.Status` body carrying exactly one `ErrorInfo` (domain `cloudact.io`); gRPC failures carry the
same `ErrorInfo` in the `grpc-status-details-bin` trailer.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudact.pipeline.v1 import (
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    procedure_service_pb2,
    procedure_service_pb2_grpc,
)
from server import app
from server.localstack.envoy import Envoy
from server.settings import Settings
from tests.conftest import ROOT_HEADERS, ROOT_KEY, ROOT_METADATA, Org, make_org
from tests.integration.rpc_errors import DOMAIN, error_info, status_of

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
MIGRATION = "normalize_saas_plan_values"
# A well-formed key (same shape as issued keys) that was never issued.
UNKNOWN_KEY = "ca_" + "A" * 43
# A channel option that keeps grpc from sharing the TCP connection of other channels to the same address.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]

HTTP_OF = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
}


# --- helpers -------------------------------------------------------------------------------------------


async def rest_error(
    response: aiohttp.ClientResponse, http_status: int, code: grpc.StatusCode, reason: str
) -> dict[str, Any]:
    """Check a REST error response; return its one ErrorInfo detail."""
    body = await response.json(content_type=None)
    assert response.status == http_status, body
    assert response.content_type == "application/json"
    assert body["code"] == code.value[0], body
    assert isinstance(body["message"], str)
    assert body["message"]
    infos = [d for d in body["details"] if d["@type"] == ERROR_INFO]
    assert len(infos) == 1, body
    info = infos[0]
    assert info["reason"] == reason, body
    assert info["domain"] == DOMAIN
    assert "grpc-status" not in response.headers
    assert "grpc-message" not in response.headers
    return info


async def grpc_error(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> status_pb2.Status:
    """Await a call that must fail with `code` and an ErrorInfo with `reason`; return the status."""
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    status = status_of(caught.value)
    assert error_info(status).reason == reason
    return status


def list_pipelines(
    stub: pipeline_service_pb2_grpc.PipelineServiceStub,
    metadata: tuple[tuple[str, str], ...],
) -> Awaitable[pipeline_service_pb2.ListPipelinesResponse]:
    return stub.ListPipelines(pipeline_service_pb2.ListPipelinesRequest(), metadata=metadata, timeout=30)


def list_procedures(
    stub: procedure_service_pb2_grpc.ProcedureServiceStub, metadata: tuple[tuple[str, str], ...]
) -> Awaitable[procedure_service_pb2.ListProceduresResponse]:
    return stub.ListProcedures(procedure_service_pb2.ListProceduresRequest(), metadata=metadata, timeout=30)


async def assert_lists(
    stub: pipeline_service_pb2_grpc.PipelineServiceStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    """The call succeeds and returns the test configs."""
    response = await list_pipelines(stub, metadata)
    names = [p.pipeline for p in response.pipelines]
    assert {"monthly_cost", "daily_usage"} <= set(names)
    assert response.total_size == len(names)


# --- the failure table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One credential failure: which API, which headers, what must come back."""

    root_method: bool
    headers: Callable[[Org], dict[str, str]]
    code: grpc.StatusCode
    reason: str
    metadata: dict[str, str] | None = None

    @property
    def path(self) -> str:
        return "/api/v1/procedures" if self.root_method else "/api/v1/pipelines"


UNAUTH = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED

CASES = {
    "org_no_key": Case(False, lambda org: {}, UNAUTH, "API_KEY_MISSING", {"header": "X-API-Key"}),
    "org_unknown_key": Case(False, lambda org: {"X-API-Key": UNKNOWN_KEY}, UNAUTH, "API_KEY_INVALID"),
    "org_garbage_key": Case(False, lambda org: {"X-API-Key": "not-a-key"}, UNAUTH, "API_KEY_INVALID"),
    "org_key_truncated": Case(
        False, lambda org: {"X-API-Key": org.key.api_key[:-1]}, UNAUTH, "API_KEY_INVALID"
    ),
    "org_key_as_root_key": Case(
        False, lambda org: {"X-CA-Root-Key": org.key.api_key}, DENIED, "ORG_KEY_REQUIRED"
    ),
    "org_root_key_only": Case(False, lambda org: dict(ROOT_HEADERS), DENIED, "ORG_KEY_REQUIRED"),
    "root_org_key_only": Case(True, lambda org: org.headers, DENIED, "ROOT_KEY_REQUIRED"),
    "root_no_key": Case(True, lambda org: {}, UNAUTH, "ROOT_KEY_MISSING", {"header": "X-CA-Root-Key"}),
    "root_wrong_key": Case(True, lambda org: {"X-CA-Root-Key": "wrong"}, UNAUTH, "ROOT_KEY_INVALID"),
    "root_key_prefix": Case(True, lambda org: {"X-CA-Root-Key": ROOT_KEY[:-1]}, UNAUTH, "ROOT_KEY_INVALID"),
    "root_key_extended": Case(
        True, lambda org: {"X-CA-Root-Key": ROOT_KEY + "x"}, UNAUTH, "ROOT_KEY_INVALID"
    ),
    "root_key_upper": Case(True, lambda org: {"X-CA-Root-Key": ROOT_KEY.upper()}, UNAUTH, "ROOT_KEY_INVALID"),
    "root_wrong_key_with_org_key": Case(
        True, lambda org: {**org.headers, "X-CA-Root-Key": "wrong"}, UNAUTH, "ROOT_KEY_INVALID"
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_rest_auth_failure(http: aiohttp.ClientSession, acme: Org, case: Case) -> None:
    async with http.get(case.path, headers=case.headers(acme)) as r:
        info = await rest_error(r, HTTP_OF[case.code], case.code, case.reason)
    assert info["metadata"] == (case.metadata or {})


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_grpc_auth_failure(
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub,
    procedures: procedure_service_pb2_grpc.ProcedureServiceStub,
    acme: Org,
    case: Case,
) -> None:
    metadata = tuple((k.lower(), v) for k, v in case.headers(acme).items())
    call = list_procedures(procedures, metadata) if case.root_method else list_pipelines(pipelines, metadata)
    status = await grpc_error(call, case.code, case.reason)
    assert dict(error_info(status).metadata) == (case.metadata or {})
    assert len(status.details) == 1


async def test_valid_credentials_pass(
    http: aiohttp.ClientSession,
    acme: Org,
    globex: Org,
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub,
    procedures: procedure_service_pb2_grpc.ProcedureServiceStub,
) -> None:
    """The control group of the table above: the right key on each kind of method works."""
    for org in (acme, globex):
        async with http.get("/api/v1/pipelines", headers=org.headers) as r:
            assert r.status == 200, await r.text()
        await assert_lists(pipelines, org.metadata)
    async with http.get("/api/v1/procedures", headers=ROOT_HEADERS) as r:
        assert r.status == 200, await r.text()
    await list_procedures(procedures, ROOT_METADATA)
    # Both headers: each method picks the credential it needs.
    both = {**acme.headers, **ROOT_HEADERS}
    for path in ("/api/v1/pipelines", "/api/v1/procedures"):
        async with http.get(path, headers=both) as r:
            assert r.status == 200, await r.text()


# --- keys whose state changes --------------------------------------------------------------------------


async def test_revoked_key(
    service: app.Service,
    http: aiohttp.ClientSession,
    acme: Org,
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub,
) -> None:
    key = await service.orgs.create_key(acme.slug)
    headers, metadata = {"X-API-Key": key.api_key}, (("x-api-key", key.api_key),)
    async with http.get("/api/v1/pipelines", headers=headers) as r:
        assert r.status == 200, await r.text()
    await assert_lists(pipelines, metadata)

    await service.orgs.revoke_key(key.org_api_key_id)
    await asyncio.sleep(service.settings.auth_cache_ttl_seconds + 0.3)

    async with http.get("/api/v1/pipelines", headers=headers) as r:
        await rest_error(r, 401, UNAUTH, "API_KEY_INVALID")
    await grpc_error(list_pipelines(pipelines, metadata), UNAUTH, "API_KEY_INVALID")
    # The org's other keys are untouched.
    await assert_lists(pipelines, acme.metadata)


async def test_expired_key(
    service: app.Service,
    http: aiohttp.ClientSession,
    acme: Org,
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub,
) -> None:
    now = datetime.now(UTC)
    expired = await service.orgs.create_key(acme.slug, expires_at=now - timedelta(hours=1))
    live = await service.orgs.create_key(acme.slug, expires_at=now + timedelta(hours=1))

    async with http.get("/api/v1/pipelines", headers={"X-API-Key": expired.api_key}) as r:
        await rest_error(r, 401, UNAUTH, "API_KEY_INVALID")
    await grpc_error(list_pipelines(pipelines, (("x-api-key", expired.api_key),)), UNAUTH, "API_KEY_INVALID")

    async with http.get("/api/v1/pipelines", headers={"X-API-Key": live.api_key}) as r:
        assert r.status == 200, await r.text()
    await assert_lists(pipelines, (("x-api-key", live.api_key),))


async def test_key_without_scope(
    service: app.Service,
    http: aiohttp.ClientSession,
    globex: Org,
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub,
) -> None:
    key = await service.orgs.create_key(globex.slug, scopes=("pipelines:run",))
    async with http.get("/api/v1/pipelines", headers={"X-API-Key": key.api_key}) as r:
        info = await rest_error(r, 403, DENIED, "SCOPE_MISSING")
    assert info["metadata"] == {"scope": "pipelines:read"}
    status = await grpc_error(
        list_pipelines(pipelines, (("x-api-key", key.api_key),)), DENIED, "SCOPE_MISSING"
    )
    assert dict(error_info(status).metadata) == {"scope": "pipelines:read"}
    assert "pipelines:read" in status.message

    reader = await service.orgs.create_key(globex.slug, scopes=("pipelines:read",))
    await assert_lists(pipelines, (("x-api-key", reader.api_key),))


# --- throttling ----------------------------------------------------------------------------------------


def retry_seconds(status: status_pb2.Status) -> int:
    """The RetryInfo delay of a status (exactly one RetryInfo detail)."""
    retries = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(retries) == 1, status
    retry = error_details_pb2.RetryInfo()
    assert retries[0].Unpack(retry)
    return retry.retry_delay.seconds


async def test_throttle_after_failures_grpc(settings: Settings, acme: Org) -> None:
    svc = await app.start(settings.model_copy(update={"auth_failures_per_minute": 3}))
    try:
        address = f"127.0.0.1:{svc.port}"
        async with aio.insecure_channel(address, options=OWN_CONNECTION) as channel:
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            # Refusals of valid credentials (PERMISSION_DENIED) are not failed authentications.
            for _ in range(5):
                await grpc_error(list_pipelines(stub, ROOT_METADATA), DENIED, "ORG_KEY_REQUIRED")
            for _ in range(3):
                await grpc_error(
                    list_pipelines(stub, (("x-api-key", UNKNOWN_KEY),)), UNAUTH, "API_KEY_INVALID"
                )
            status = await grpc_error(
                list_pipelines(stub, (("x-api-key", UNKNOWN_KEY),)),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "AUTH_THROTTLED",
            )
            assert 1 <= retry_seconds(status) <= 60
            assert len(status.details) == 2
            # While throttled, even a valid key from this client is refused.
            await grpc_error(
                list_pipelines(stub, acme.metadata), grpc.StatusCode.RESOURCE_EXHAUSTED, "AUTH_THROTTLED"
            )
        # A new connection (new source port) is the same client.
        async with aio.insecure_channel(address, options=OWN_CONNECTION) as channel:
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            await grpc_error(
                list_pipelines(stub, (("x-api-key", UNKNOWN_KEY),)),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "AUTH_THROTTLED",
            )
            # Public methods are not throttled.
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await svc.stop()


async def test_throttle_through_envoy_ignores_spoofed_forwarded_for(
    settings: Settings, tmp_path: Path
) -> None:
    """Envoy appends the address it saw to X-Forwarded-For; what the caller put before it is not trusted,
    so rotating a fake X-Forwarded-For does not escape the throttle."""
    svc = await app.start(settings.model_copy(update={"auth_failures_per_minute": 3}))
    proxy: Envoy | None = None
    try:
        proxy = await asyncio.to_thread(Envoy, grpc_port=svc.port, work_dir=tmp_path / "envoy")
        async with aiohttp.ClientSession(base_url=proxy.rest_url) as http:
            for i in range(3):
                headers = {"X-API-Key": UNKNOWN_KEY, "X-Forwarded-For": f"198.51.100.{i}"}
                async with http.get("/api/v1/pipelines", headers=headers) as r:
                    await rest_error(r, 401, UNAUTH, "API_KEY_INVALID")
            headers = {"X-API-Key": UNKNOWN_KEY, "X-Forwarded-For": "198.51.100.99"}
            async with http.get("/api/v1/pipelines", headers=headers) as r:
                await rest_error(r, 429, grpc.StatusCode.RESOURCE_EXHAUSTED, "AUTH_THROTTLED")
                body = await r.json()
            retries = [d for d in body["details"] if d["@type"] == RETRY_INFO]
            assert len(retries) == 1, body
            assert re.fullmatch(r"\d+s", retries[0]["retry_delay"]), retries
            assert 1 <= int(retries[0]["retry_delay"][:-1]) <= 60
    finally:
        if proxy is not None:
            await asyncio.to_thread(proxy.stop)
        await svc.stop()


# --- unexpected errors ---------------------------------------------------------------------------------


async def test_unexpected_error_is_internal_without_python_details(
    service: app.Service,
    http: aiohttp.ClientSession,
    procedures: procedure_service_pb2_grpc.ProcedureServiceStub,
) -> None:
    """A corrupt `migration_history` row (result_rows is not JSON) makes ExecuteMigration fail with an
    exception no code path expects; the caller gets INTERNAL with the request id and nothing else."""
    await procedures.SyncProcedures(
        procedure_service_pb2.SyncProceduresRequest(names=[MIGRATION]), metadata=ROOT_METADATA, timeout=60
    )
    deployed = await procedures.GetProcedure(
        procedure_service_pb2.GetProcedureRequest(name=MIGRATION), metadata=ROOT_METADATA, timeout=30
    )
    assert deployed.procedure.checksum
    dataset = (await make_org(service, "corrupt")).dataset
    # An "earlier application" of the deployed version, so ExecuteMigration reads it instead of running.
    history = service.warehouse.table_ref(service.settings.meta_dataset, "migration_history")
    await service.warehouse.query(
        f"INSERT INTO {history} (execution_id, migration_name, dataset, checksum, dry_run, executed_by, "
        "executed_at, result_rows) VALUES (@id, @n, @d, @c, FALSE, 'test', @at, '{not json')",
        {
            "id": uuid.uuid4().hex,
            "n": MIGRATION,
            "d": dataset,
            "c": deployed.procedure.checksum,
            "at": datetime.now(UTC),
        },
    )
    request_id = f"test-{uuid.uuid4().hex}"
    request = procedure_service_pb2.ExecuteMigrationRequest(name=MIGRATION, dataset=dataset)
    status = await grpc_error(
        procedures.ExecuteMigration(
            request, metadata=(*ROOT_METADATA, ("x-request-id", request_id)), timeout=60
        ),
        grpc.StatusCode.INTERNAL,
        "INTERNAL",
    )
    assert status.message == f"internal error (request id {request_id})"
    assert dict(error_info(status).metadata) == {"request_id": request_id}
    assert len(status.details) == 1

    async with http.post(
        f"/api/v1/migrations/{MIGRATION}/execute", headers=ROOT_HEADERS, json={"dataset": dataset}
    ) as r:
        info = await rest_error(r, 500, grpc.StatusCode.INTERNAL, "INTERNAL")
        text = await r.text()
    assert info["metadata"]["request_id"]
    assert f"internal error (request id {info['metadata']['request_id']})" in text
    for leak in ("Traceback", "JSONDecodeError", "Expecting", "json", ".py", "line "):
        assert leak not in text
