"""Helpers of the run tests: requests, polling for states, cleanup. Over the gRPC stub."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from tests.conftest import Org

PS = pipeline_service_pb2
RS = pipeline_run_pb2
Stub = pipeline_service_pb2_grpc.PipelineServiceStub

TERMINAL = (RS.RUN_STATE_COMPLETED, RS.RUN_STATE_FAILED, RS.RUN_STATE_TIMEOUT, RS.RUN_STATE_CANCELLED)


def run_request(
    org: Org, pipeline: str = "quick", params: dict[str, str] | None = None, **fields: Any
) -> PS.RunPipelineRequest:
    return PS.RunPipelineRequest(
        org_slug=org.slug,
        provider="engine",
        domain="runs",
        pipeline=pipeline,
        parameters=params or {},
        **fields,
    )


async def start(
    stub: Stub, org: Org, pipeline: str = "quick", params: dict[str, str] | None = None, **fields: Any
) -> RS.PipelineRun:
    """RunPipeline over gRPC; the accepted (or, with wait=True, the finished) run."""
    response = await stub.RunPipeline(
        run_request(org, pipeline, params, **fields), metadata=org.metadata, timeout=30
    )
    return response.run


async def get(stub: Stub, org: Org, run_id: str) -> RS.PipelineRun:
    return (await stub.GetPipelineRun(PS.GetPipelineRunRequest(run_id=run_id), metadata=org.metadata)).run


async def wait_state(stub: Stub, org: Org, run_id: str, state: int, within: float = 10) -> RS.PipelineRun:
    """Poll until the run is in `state`."""
    async with asyncio.timeout(within):
        while True:
            run = await get(stub, org, run_id)
            if run.state == state:
                return run
            assert run.state not in TERMINAL or state in TERMINAL, run
            await asyncio.sleep(0.02)


async def cancel(stub: Stub, org: Org, run_id: str) -> RS.PipelineRun:
    request = PS.CancelPipelineRunRequest(run_id=run_id)
    return (await stub.CancelPipelineRun(request, metadata=org.metadata)).run


async def cancel_and_wait(stub: Stub, org: Org, run_ids: Sequence[str]) -> None:
    """Cleanup: cancel the runs (active or not) and wait until each has ended."""
    for run_id in run_ids:
        await cancel(stub, org, run_id)
    for run_id in run_ids:
        await wait_terminal(stub, org, run_id, timeout=10)


async def wait_terminal(stub: Stub, org: Org, run_id: str, timeout: float = 30) -> RS.PipelineRun:
    """Poll until the run has ended."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        run = await get(stub, org, run_id)
        if run.state in TERMINAL:
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} did not end")
