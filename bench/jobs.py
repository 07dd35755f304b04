"""Warehouse jobs issued per run, read from `BigQueryWarehouse.jobs_started`.

Isolated runs: the ledger is flushed, one run is made with `wait=True`, the ledger is flushed again; the
jobs counted while the call was in flight (auth lookups, request-id replays) and those of the flush (the
ledger's load jobs) are reported apart. One run per flush is the worst case for the batched ledger; under
load many runs share a flush (see the throughput cells).
"""

from __future__ import annotations

import statistics
import uuid
from dataclasses import dataclass

from grpc import aio

from bench.stack import drain
from cloudact.pipeline.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc
from server import app


@dataclass
class JobsPerRun:
    """Jobs per isolated run (medians; `max_total` the worst run)."""

    label: str
    runs: int
    call_jobs: float
    ledger_jobs: float
    total: float
    max_total: int


async def measure(
    service: app.Service,
    org_slug: str,
    api_key: str,
    *,
    label: str,
    pipeline: tuple[str, str, str],
    runs: int = 5,
    request_id: bool = False,
) -> JobsPerRun:
    """`runs` isolated runs of `pipeline` (provider, domain, pipeline)."""
    provider, domain, name = pipeline
    wh = service.warehouse
    calls: list[int] = []
    ledgers: list[int] = []
    async with aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        for _ in range(runs):
            await drain(service, 5.0)
            before = wh.jobs_started
            request = pipeline_service_pb2.RunPipelineRequest(
                org_slug=org_slug,
                provider=provider,
                domain=domain,
                pipeline=name,
                parameters={"i": f"jobs-{uuid.uuid4().hex}"},
                wait=True,
                request_id=uuid.uuid4().hex if request_id else "",
            )
            await stub.RunPipeline(request, metadata=(("x-api-key", api_key),), timeout=120)
            during = wh.jobs_started
            await drain(service, 5.0)
            calls.append(during - before)
            ledgers.append(wh.jobs_started - during)
    totals = [c + ledger for c, ledger in zip(calls, ledgers, strict=True)]
    return JobsPerRun(
        label,
        runs,
        statistics.median(calls),
        statistics.median(ledgers),
        statistics.median(totals),
        max(totals),
    )
