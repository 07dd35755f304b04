"""The ledger's load budget: BigQuery allows a fixed number of load jobs per table per day, so periodic
flushes stop when the budget is spent, finished runs stay readable from memory meanwhile (GetRun,
ListPipelineRuns, request-id replay), and closing the service writes everything regardless.

A second service on the session emulator with its own meta dataset (its start-up recovery must not
touch the session service's runs) and a budget of 24 loads a day: one flush, then none for an hour."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from grpc import aio

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from server import app
from server.ledger import RUNS, LoadBudget
from server.settings import Settings
from tests.conftest import Org, make_org

PS = pipeline_service_pb2
Stub = pipeline_service_pb2_grpc.PipelineServiceStub


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_starts_with_one_holds_an_hour_and_refills_at_its_daily_rate() -> None:
    clock = Clock()
    budget = LoadBudget(48, clock)  # 2 an hour, one every 30 minutes
    assert [budget.take() for _ in range(2)] == [True, False]
    clock.now += 29 * 60
    assert not budget.take()
    clock.now += 60
    assert budget.take() and not budget.take()
    clock.now += 10 * 3600  # idle for long: never more than an hour's worth
    assert [budget.take() for _ in range(3)] == [True, True, False]


def test_loads_that_must_happen_are_counted_against_later_ones() -> None:
    clock = Clock()
    budget = LoadBudget(48, clock)
    assert budget.take()
    budget.spend()  # a close or a recovery flush with nothing left: the budget goes into debt
    assert not budget.take()
    clock.now += 30 * 60
    assert not budget.take()  # the first refill pays the debt
    clock.now += 30 * 60
    assert budget.take()


def test_a_budget_of_zero_is_no_limit() -> None:
    budget = LoadBudget(0, Clock())
    assert all(budget.take() for _ in range(10_000))


@pytest.fixture
async def paced(settings: Settings) -> AsyncIterator[tuple[app.Service, Stub, Org]]:
    meta = f"ledger_paced_{uuid.uuid4().hex[:8]}"
    svc = await app.start(
        settings.model_copy(
            update={"meta_dataset": meta, "ledger_loads_per_day": 24, "ledger_flush_seconds": 0.05}
        )
    )
    try:
        org = await make_org(svc, "paced")
        async with aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            yield svc, Stub(channel), org
    finally:
        await svc.stop()


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


async def _stored_run_ids(svc: app.Service, org: Org) -> set[str]:
    table = svc.warehouse.table_ref(svc.settings.meta_dataset, RUNS)
    rows = await svc.warehouse.query(f"SELECT run_id FROM {table} WHERE org_slug = @org", {"org": org.slug})
    return {r["run_id"] for r in rows}


async def test_a_spent_budget_defers_writes_and_memory_answers_meanwhile(
    paced: tuple[app.Service, Stub, Org],
) -> None:
    svc, stub, org = paced
    first = await _run(stub, org, 0)
    await asyncio.sleep(0.3)  # the first tick with rows to write spends the budget's one load
    later = [await _run(stub, org, i) for i in range(1, 4)]
    replayed = await _run(stub, org, 4, request_id="paced-request")
    await asyncio.sleep(0.5)  # ten flush ticks: the budget has nothing left for this hour
    held_back = svc.runs._ledger.pending
    assert held_back >= 4 * 6  # four runs' events and rows at least
    assert not {r.run_id for r in [*later, replayed]} & await _stored_run_ids(svc, org)

    # Reads come from memory: the runs are there, and listing writes nothing.
    for run in later:
        got = await stub.GetPipelineRun(PS.GetPipelineRunRequest(run_id=run.run_id), metadata=org.metadata)
        assert got.run.state == pipeline_run_pb2.RUN_STATE_COMPLETED
    listed = await stub.ListPipelineRuns(PS.ListPipelineRunsRequest(page_size=50), metadata=org.metadata)
    assert [r.run_id for r in listed.runs] == [
        r.run_id for r in sorted([first, *later, replayed], key=lambda r: r.create_time.ToNanoseconds())
    ][::-1]
    again = await _run(stub, org, 4, request_id="paced-request")
    assert again.run_id == replayed.run_id
    assert svc.runs._ledger.pending == held_back  # nothing was written to answer those

    # Closing writes what the budget held back.
    await svc.runs.close()
    assert {r.run_id for r in [first, *later, replayed]} <= await _stored_run_ids(svc, org)
