"""`Guard`: every method of a registered servicer is guarded, a method without a policy cannot be
registered, and the guard (not the servicer) answers unauthenticated and cross-org calls.

A real grpc.aio server on 127.0.0.1 with a small servicer; the key store is a dict behind the
`Authenticator`'s lookup function (its only seam)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
import pytest
from grpc import aio

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from server.api.guard import Guard, org_principal
from server.app import PIPELINE_SERVICE, POLICIES
from server.auth import Authenticator
from server.orgs import OrgContext, hash_key
from tests.integration.rpc_errors import error_info

KEY = "ca_guard_key_" + "g" * 32
ORG = OrgContext(
    org_slug="acme",
    org_api_key_id="key-1",
    dataset="acme_local",
    scopes=frozenset({"pipelines:read", "pipelines:run"}),
    daily_limit=10,
    monthly_limit=100,
    concurrent_limit=5,
    requests_per_minute=60,
)


class Servicer(pipeline_service_pb2_grpc.PipelineServiceServicer):
    """Answers with the caller's org, as the guard set it; counts the calls that got through."""

    def __init__(self) -> None:
        self.calls = 0

    async def RunPipeline(
        self, request: pipeline_service_pb2.RunPipelineRequest, context: aio.ServicerContext[Any, Any]
    ) -> pipeline_service_pb2.RunPipelineResponse:
        self.calls += 1
        run = pipeline_run_pb2.PipelineRun(org_slug=org_principal().org_slug, pipeline=request.pipeline)
        return pipeline_service_pb2.RunPipelineResponse(run=run)


async def _lookup(key_hash: str, now: datetime) -> OrgContext | None:
    return ORG if key_hash == hash_key(KEY) else None


def _guard(policies: dict[str, Any]) -> Guard:
    return Guard(
        Authenticator(root_key="r" * 40, lookup=_lookup, ttl=10.0, failures_per_minute=1000), policies
    )


@pytest.fixture
async def served() -> AsyncIterator[tuple[pipeline_service_pb2_grpc.PipelineServiceStub, Servicer]]:
    server = aio.server()
    servicer = Servicer()
    _guard(POLICIES).register(
        server, pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server, servicer
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pipeline_service_pb2_grpc.PipelineServiceStub(channel), servicer
    finally:
        await server.stop(0)


def _request(org: str = "acme") -> pipeline_service_pb2.RunPipelineRequest:
    return pipeline_service_pb2.RunPipelineRequest(org_slug=org, provider="p", domain="d", pipeline="x")


async def test_a_method_without_a_policy_cannot_be_registered() -> None:
    server = aio.server()
    policies = {m: p for m, p in POLICIES.items() if m != f"/{PIPELINE_SERVICE}/CancelPipelineRun"}
    with pytest.raises(LookupError, match="CancelPipelineRun has no access policy"):
        _guard(policies).register(
            server, pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server, Servicer()
        )
    await server.stop(0)


async def test_the_guard_lets_the_right_key_through(
    served: tuple[pipeline_service_pb2_grpc.PipelineServiceStub, Servicer],
) -> None:
    stub, servicer = served
    for _ in range(3):  # the handler is built once; every call is guarded the same way
        response = await stub.RunPipeline(_request(), metadata=(("x-api-key", KEY),), timeout=10)
        assert response.run.org_slug == "acme"
    assert servicer.calls == 3


@pytest.mark.parametrize(
    ("metadata", "org", "code", "reason"),
    [
        ((), "acme", grpc.StatusCode.UNAUTHENTICATED, "API_KEY_MISSING"),
        (
            (("x-api-key", "ca_wrong_" + "w" * 32),),
            "acme",
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_INVALID",
        ),
        ((("x-api-key", KEY),), "globex", grpc.StatusCode.PERMISSION_DENIED, "ORG_MISMATCH"),
    ],
)
async def test_the_guard_refuses_before_the_servicer_runs(
    served: tuple[pipeline_service_pb2_grpc.PipelineServiceStub, Servicer],
    metadata: tuple[tuple[str, str], ...],
    org: str,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    stub, servicer = served
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.RunPipeline(_request(org), metadata=metadata, timeout=10)
    assert caught.value.code() == code
    assert error_info(caught.value).reason == reason
    assert servicer.calls == 0


async def test_every_method_is_guarded_even_one_the_servicer_lacks(
    served: tuple[pipeline_service_pb2_grpc.PipelineServiceStub, Servicer],
) -> None:
    stub, _ = served
    with pytest.raises(aio.AioRpcError) as caught:
        await stub.GetPipelineRun(pipeline_service_pb2.GetPipelineRunRequest(run_id="r"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "API_KEY_MISSING"
