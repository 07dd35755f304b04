"""The real `grpcurl` binary against the gRPC server: reflection, health and calls with metadata.

grpcurl exits with 64 + the gRPC status code when a call fails.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from server import app
from tests.conftest import ROOT_KEY, Org

GRPCURL = Path(sys.executable).parent / "grpcurl"
PIPELINE_SERVICE = "cloudact.pipeline.v1.PipelineService"
PROCEDURE_SERVICE = "cloudact.pipeline.v1.ProcedureService"
HEALTH_SERVICE = "grpc.health.v1.Health"
LIST_PIPELINES = f"{PIPELINE_SERVICE}/ListPipelines"
UNAUTHENTICATED = 64 + 16
PERMISSION_DENIED = 64 + 7
NOT_FOUND = 64 + 5


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


async def grpcurl(service: app.Service, *args: str, flags: Sequence[str] = (), wait: float = 60.0) -> Result:
    """`grpcurl -plaintext [flags] 127.0.0.1:port [args]`, without blocking the event loop the server runs
    on; killed if it outlives `wait` seconds."""
    proc = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        "-plaintext",
        "-connect-timeout",
        "10",
        "-max-time",
        "30",
        *flags,
        f"127.0.0.1:{service.port}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), wait)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def ok(result: Result) -> str:
    assert result.returncode == 0, result
    return result.stdout


def test_grpcurl_binary_present() -> None:
    assert GRPCURL.exists()


async def test_list_services(service: app.Service) -> None:
    services = ok(await grpcurl(service, "list")).split()
    for name in (PIPELINE_SERVICE, PROCEDURE_SERVICE, HEALTH_SERVICE):
        assert name in services


async def test_list_methods(service: app.Service) -> None:
    # `list SERVICE` names methods as `package.Service.Method`.
    assert (
        "cloudact.pipeline.v1.PipelineService.ListPipelines"
        in ok(await grpcurl(service, "list", PIPELINE_SERVICE)).split()
    )
    methods = ok(await grpcurl(service, "list", PROCEDURE_SERVICE)).split()
    assert sorted(methods) == sorted(
        f"{PROCEDURE_SERVICE}.{m}"
        for m in ("ListProcedures", "GetProcedure", "SyncProcedures", "DeleteProcedure", "ExecuteMigration")
    )


async def test_describe_service(service: app.Service) -> None:
    text = ok(await grpcurl(service, "describe", PIPELINE_SERVICE))
    assert f"{PIPELINE_SERVICE} is a service" in text
    assert "rpc ListPipelines" in text
    assert ".cloudact.pipeline.v1.ListPipelinesRequest" in text
    assert ".cloudact.pipeline.v1.ListPipelinesResponse" in text


async def test_describe_message(service: app.Service) -> None:
    text = ok(await grpcurl(service, "describe", "cloudact.pipeline.v1.PipelineStep"))
    for field in ("step_id", "ps_type", "repeated string depends_on"):
        assert field in text


def key_of(pipeline: dict[str, str]) -> str:
    return f"{pipeline['provider']}/{pipeline['domain']}/{pipeline['pipeline']}"


async def test_list_pipelines(service: app.Service, acme: Org) -> None:
    result = await grpcurl(service, LIST_PIPELINES, flags=("-H", f"x-api-key: {acme.key.api_key}"))
    body = json.loads(ok(result))
    expected = [c.key for c in service.catalog.all()]
    assert [key_of(p) for p in body["pipelines"]] == expected
    # grpcurl prints the proto field names.
    assert body["total_size"] == len(expected)
    daily = next(p for p in body["pipelines"] if key_of(p) == "demo/usage/daily_usage")
    assert daily["pipeline_id"] == "demo_daily_usage"
    assert [s["step_id"] for s in daily["steps"]] == ["extract", "transform"]
    assert daily["steps"][1]["depends_on"] == ["extract"]
    assert daily["steps"][0]["ps_type"] == "generic.procedure_executor"


async def test_list_pipelines_with_request_body(service: app.Service, acme: Org) -> None:
    flags = ("-H", f"x-api-key: {acme.key.api_key}", "-d", '{"page_size": 1, "provider": "demo"}')
    body = json.loads(ok(await grpcurl(service, LIST_PIPELINES, flags=flags)))
    assert [key_of(p) for p in body["pipelines"]] == ["demo/costs/monthly_cost"]
    assert body["next_page_token"]
    assert body["total_size"] == len([c for c in service.catalog.all() if c.provider == "demo"])


async def test_health_check(service: app.Service) -> None:
    body = json.loads(ok(await grpcurl(service, f"{HEALTH_SERVICE}/Check")))
    assert body == {"status": "SERVING"}
    for name in (PIPELINE_SERVICE, PROCEDURE_SERVICE):
        flags = ("-d", json.dumps({"service": name}))
        assert json.loads(ok(await grpcurl(service, f"{HEALTH_SERVICE}/Check", flags=flags))) == {
            "status": "SERVING"
        }


async def test_health_check_unknown_service(service: app.Service) -> None:
    flags = ("-d", '{"service": "nope.Nope"}')
    result = await grpcurl(service, f"{HEALTH_SERVICE}/Check", flags=flags)
    assert result.returncode == NOT_FOUND, result
    assert "NotFound" in result.stderr


async def test_call_without_key(service: app.Service) -> None:
    result = await grpcurl(service, LIST_PIPELINES)
    assert result.returncode == UNAUTHENTICATED, result
    assert "Unauthenticated" in result.stderr
    assert "missing X-API-Key header" in result.stderr
    assert result.stdout == ""


async def test_call_with_wrong_key(service: app.Service) -> None:
    result = await grpcurl(service, LIST_PIPELINES, flags=("-H", "x-api-key: ca_wrong"))
    assert result.returncode == UNAUTHENTICATED, result
    assert "invalid, revoked or expired API key" in result.stderr


@pytest.mark.parametrize(
    ("method", "header", "reason"),
    [
        (LIST_PIPELINES, f"x-ca-root-key: {ROOT_KEY}", "needs an org API key"),
        (f"{PROCEDURE_SERVICE}/ListProcedures", "x-api-key: ORG", "needs the root key"),
    ],
)
async def test_wrong_kind_of_key(
    service: app.Service, acme: Org, method: str, header: str, reason: str
) -> None:
    header = header.replace("ORG", acme.key.api_key)
    result = await grpcurl(service, method, flags=("-H", header))
    assert result.returncode == PERMISSION_DENIED, result
    assert "PermissionDenied" in result.stderr
    assert reason in result.stderr


async def test_root_calls(service: app.Service) -> None:
    root = ("-H", f"x-ca-root-key: {ROOT_KEY}")
    flags = (*root, "-d", json.dumps({"names": ["normalize_saas_plan_values"]}))
    synced = json.loads(ok(await grpcurl(service, f"{PROCEDURE_SERVICE}/SyncProcedures", flags=flags)))
    assert [r["name"] for r in synced["results"]] == ["normalize_saas_plan_values"]
    assert synced["results"][0]["outcome"] in ("OUTCOME_CREATED", "OUTCOME_UPDATED", "OUTCOME_UNCHANGED")

    body = json.loads(ok(await grpcurl(service, f"{PROCEDURE_SERVICE}/ListProcedures", flags=root)))
    assert body["total_size"] == len(body["procedures"]) >= 1
    assert "normalize_saas_plan_values" in [p["name"] for p in body["procedures"]]
    assert all(p["dataset"] == service.settings.meta_dataset for p in body["procedures"])
