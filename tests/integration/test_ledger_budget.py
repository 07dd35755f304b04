"""The ledger's export to BigQuery within its load budget: BigQuery allows a fixed number of load jobs per
table per day, so periodic exports stop when the shared budget (a token bucket in PostgreSQL) is spent;
runs are read from PostgreSQL meanwhile (GetRun, ListPipelineRuns, request-id replay never wait for an
export); a restart adds no load (the budget is in the database, not in the process); what is left stays
in the outbox until an export of any replica writes it, each row once.

The service here has a database of its own on the session's PostgreSQL (its outbox must not be exported
by the session service into another meta dataset) and a budget of 24 loads a day: one export, then none
for an hour.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from grpc import aio
from pydantic import SecretStr

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from server import app
from server.ledger import EVENTS, RUNS
from server.localstack.postgres import Postgres
from server.settings import Settings
from tests.conftest import Org, make_org, scratch_database

PS = pipeline_service_pb2
Stub = pipeline_service_pb2_grpc.PipelineServiceStub


@pytest.fixture
async def paced_settings(settings: Settings, postgres: Postgres) -> AsyncIterator[Settings]:
    async with scratch_database(postgres, "paced") as url:
        yield settings.model_copy(
            update={
                "meta_dataset": f"ledger_paced_{uuid.uuid4().hex[:8]}",
                "ledger_loads_per_day": 24,
                "ledger_flush_seconds": 0.05,
                "database_url": SecretStr(url),
            }
        )


async def _run(stub: Stub, org: Org, i: int, request_id: str = "") -> pipeline_run_pb2.PipelineRun:
    request = PS.RunPipelineRequest(
        org_slug=org.slug,
        provider="engine",
        domain="runs",
        pipeline="quick",
        parameters={"i": str(i)},
        request_id=request_id,
        wait=True,
    )
    response = await stub.RunPipeline(request, metadata=org.metadata, timeout=30)
    assert response.run.state == pipeline_run_pb2.RUN_STATE_COMPLETED, response.run
    return response.run


async def _stored(svc: app.Service, table: str, org: Org) -> Counter[str]:
    ref = svc.warehouse.table_ref(svc.settings.meta_dataset, table)
    rows = await svc.warehouse.query(f"SELECT run_id FROM {ref} WHERE org_slug = @org", {"org": org.slug})
    return Counter(r["run_id"] for r in rows)


async def test_a_spent_budget_defers_exports_and_reads_never_wait_for_them(paced_settings: Settings) -> None:
    svc = await app.start(paced_settings)
    try:
        org = await make_org(svc, "paced")
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            stub = Stub(channel)
            first = await _run(stub, org, 0)
            await asyncio.sleep(0.5)  # the first tick with rows to export spends the budget's one load
            assert await _stored(svc, RUNS, org) == {first.run_id: 1}
            later = [await _run(stub, org, i) for i in range(1, 4)]
            replayed = await _run(stub, org, 4, request_id="paced-request")
            await asyncio.sleep(0.5)  # ten export ticks: the budget has nothing left for this hour
            held_back = await svc.state.unexported()
            assert held_back == 4  # four finished runs (and their events) wait in the outbox
            assert not {r.run_id for r in [*later, replayed]} & set(await _stored(svc, RUNS, org))

            # Reads come from PostgreSQL: the runs are there at once, and reading exports nothing.
            for run in later:
                got = await stub.GetPipelineRun(
                    PS.GetPipelineRunRequest(run_id=run.run_id), metadata=org.metadata
                )
                assert got.run.state == pipeline_run_pb2.RUN_STATE_COMPLETED
            listed = await stub.ListPipelineRuns(
                PS.ListPipelineRunsRequest(page_size=50), metadata=org.metadata
            )
            assert [r.run_id for r in listed.runs] == [r.run_id for r in [first, *later, replayed]][::-1]
            again = await _run(stub, org, 4, request_id="paced-request")
            assert again.run_id == replayed.run_id
            assert await svc.state.unexported() == held_back
    finally:
        await svc.stop()  # stopping exports nothing: the rows stay in the outbox

    # A restart adds no load (the budget lives in the database); an explicit flush writes the rest, once.
    restarted = await app.start(paced_settings)
    try:
        await asyncio.sleep(0.5)
        assert await restarted.state.unexported() == held_back
        assert await restarted.ledger.flush() == held_back
        assert await restarted.state.unexported() == 0
        everyone = [first, *later, replayed]
        assert await _stored(restarted, RUNS, org) == dict.fromkeys((r.run_id for r in everyone), 1)
        events = await _stored(restarted, EVENTS, org)
        assert events == {r.run_id: len(await restarted.state.events(r.run_id)) for r in everyone}
        assert all(n >= 7 for n in events.values()), events  # 3 run transitions, 2 x 2 step ones, attempts
    finally:
        await restarted.stop()
