"""The life of a pipeline run end to end: watch, cancel, duplicates, request ids, quotas, tenancy, path and
date validation, listing, the ledger, many concurrent runs and the metrics. Over the gRPC stub and, where
it matters, REST through Envoy; against the real emulator, no mocks. Tests that count or limit runs use
fresh orgs so they cannot see each other's runs."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Iterable
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from server import app
from server.orgs import Plan
from tests.conftest import Org, make_org
from tests.integration.rpc_errors import error_info, one_detail, status_of
from tests.integration.runs import (
    cancel,
    cancel_and_wait,
    get,
    run_request,
    start,
    wait_state,
    wait_terminal,
)
from tests.integration.test_runs import run_rest

PS = pipeline_service_pb2
RS = pipeline_run_pb2
Stub = pipeline_service_pb2_grpc.PipelineServiceStub

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
QUICK = "engine/runs/quick"
SLEEPY = "engine/runs/sleepy"
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


# --- helpers --------------------------------------------------------------------------------------------


async def plan_org(service: app.Service, prefix: str, **limits: int) -> Org:
    """A fresh org whose subscription has the given limits (the rest from `Plan`'s defaults)."""
    return await make_org(service, prefix, plan=Plan(**limits))


async def rpc_failure(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> aio.AioRpcError:
    """Await a call that must fail with `code` and ErrorInfo `reason`; return the error."""
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value
    info = error_info(caught.value)
    assert info.reason == reason and info.domain == "cloudact.io", info
    return caught.value


def retry_info(error: aio.AioRpcError) -> error_details_pb2.RetryInfo:
    return one_detail(status_of(error), error_details_pb2.RetryInfo)


def rest_details(body: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [d for d in body.get("details", []) if d["@type"] == kind]


def rest_reason(body: dict[str, Any]) -> str:
    infos = rest_details(body, ERROR_INFO)
    assert len(infos) == 1, body
    assert infos[0]["domain"] == "cloudact.io"
    return str(infos[0]["reason"])


def rest_violations(body: dict[str, Any]) -> set[str]:
    return {v["field"] for d in rest_details(body, BAD_REQUEST) for v in d["field_violations"]}


async def list_all(stub: Stub, org: Org, page_size: int = 2, **filters: str) -> list[RS.PipelineRun]:
    runs: list[RS.PipelineRun] = []
    token = ""
    for _ in range(100):
        page = await stub.ListPipelineRuns(
            PS.ListPipelineRunsRequest(page_size=page_size, page_token=token, **filters),
            metadata=org.metadata,
        )
        runs += page.runs
        token = page.next_page_token
        if not token:
            return runs
    raise AssertionError("paging did not end")


async def watch(stub: Stub, org: Org, run_id: str, within: float = 15) -> list[RS.RunEvent]:
    """Every event of a WatchPipelineRun stream, until the server ends it."""
    events = []
    async with asyncio.timeout(within):
        async for message in stub.WatchPipelineRun(
            PS.WatchPipelineRunRequest(run_id=run_id), metadata=org.metadata
        ):
            events.append(message.event)
    return events


# --- 1. watch -------------------------------------------------------------------------------------------


async def test_watch_streams_every_event_until_the_run_completes(
    pipelines: Stub, service: app.Service
) -> None:
    org = await make_org(service, "watch")
    run = await start(pipelines, org, "sleepy", {"sleep": "0.5"})
    events = await watch(pipelines, org, run.run_id)

    assert all(e.run_id == run.run_id for e in events)
    run_level = [e.run_state for e in events if not e.step_id]
    assert run_level == [RS.RUN_STATE_PENDING, RS.RUN_STATE_RUNNING, RS.RUN_STATE_COMPLETED], events
    assert events[0].run_state == RS.RUN_STATE_PENDING and not events[0].step_id
    assert events[1].run_state == RS.RUN_STATE_RUNNING and not events[1].step_id
    steps = [(e.step_id, e.step_state) for e in events if e.step_id]
    assert steps == [
        ("nap", RS.STEP_STATE_RUNNING),
        ("nap", RS.STEP_STATE_SUCCEEDED),
        ("after", RS.STEP_STATE_RUNNING),
        ("after", RS.STEP_STATE_SUCCEEDED),
    ], events
    assert all(e.run_state == RS.RUN_STATE_RUNNING and not e.HasField("run") for e in events if e.step_id)
    assert all(e.attempt == 1 for e in events if e.step_id)

    last = events[-1]
    assert last.run_state == RS.RUN_STATE_COMPLETED and not last.step_id and last.HasField("run")
    assert last.run.state == RS.RUN_STATE_COMPLETED and last.run.run_id == run.run_id
    assert {s.step_id: s.state for s in last.run.steps} == {
        "nap": RS.STEP_STATE_SUCCEEDED,
        "after": RS.STEP_STATE_SUCCEEDED,
    }
    nap = next(s for s in last.run.steps if s.step_id == "nap")
    assert nap.duration_ms >= 450, nap
    times = [e.time.ToDatetime() for e in events]
    assert times == sorted(times)

    # Watching the finished run: its history again, ending with the final event, and the stream ends.
    again = await watch(pipelines, org, run.run_id, within=5)
    assert again[-1].run_state == RS.RUN_STATE_COMPLETED and again[-1].run.state == RS.RUN_STATE_COMPLETED
    assert [(e.run_state, e.step_id, e.step_state) for e in again] == [
        (e.run_state, e.step_id, e.step_state) for e in events
    ]


async def test_watch_over_rest_is_a_json_array_ending_with_completed(
    http: aiohttp.ClientSession, pipelines: Stub, service: app.Service
) -> None:
    org = await make_org(service, "watchrest")
    run = await start(pipelines, org, "sleepy", {"sleep": "0.3"})
    async with (
        asyncio.timeout(15),
        http.get(f"/api/v1/pipelines/runs/{run.run_id}/events", headers=org.headers) as r,
    ):
        assert r.status == 200, await r.text()
        body = await r.json(content_type=None)
    assert isinstance(body, list) and len(body) == 7, body
    assert all(set(item) == {"event"} for item in body), body
    assert body[0]["event"]["run_state"] == "RUN_STATE_PENDING"
    last = body[-1]["event"]
    assert last["run_state"] == "RUN_STATE_COMPLETED" and last["run_id"] == run.run_id
    assert last["run"]["state"] == "RUN_STATE_COMPLETED"
    assert [s["state"] for s in last["run"]["steps"]] == ["STEP_STATE_SUCCEEDED"] * 2


# --- 2. cancel ------------------------------------------------------------------------------------------


async def test_cancel_over_rest_stops_the_running_step(
    http: aiohttp.ClientSession, pipelines: Stub, service: app.Service
) -> None:
    org = await make_org(service, "cancel")
    run = await start(pipelines, org, "sleepy", {"sleep": "30"})
    await wait_state(pipelines, org, run.run_id, RS.RUN_STATE_RUNNING)
    loop = asyncio.get_running_loop()
    asked = loop.time()
    async with http.delete(f"/api/v1/pipelines/runs/{run.run_id}", headers=org.headers) as r:
        body = await r.json()
        assert r.status == 200, body
    assert body["run"]["run_id"] == run.run_id
    assert body["run"]["state"] in ("RUN_STATE_CANCELLING", "RUN_STATE_CANCELLED"), body

    done = await wait_terminal(pipelines, org, run.run_id, timeout=2)
    assert loop.time() - asked < 2
    assert done.state == RS.RUN_STATE_CANCELLED and done.reason == "CANCELLED_BY_USER", done
    assert {s.step_id: s.state for s in done.steps} == {
        "nap": RS.STEP_STATE_CANCELLED,
        "after": RS.STEP_STATE_NOT_RUN,
    }
    assert done.end_time.ToDatetime() >= done.start_time.ToDatetime()
    assert (await service.state.active_runs(org.slug)) == 0

    # Cancelling it again (over gRPC and REST) returns it unchanged.
    again = await cancel(pipelines, org, run.run_id)
    assert again.state == RS.RUN_STATE_CANCELLED and again.reason == "CANCELLED_BY_USER"
    assert again.end_time == done.end_time
    async with http.delete(f"/api/v1/pipelines/runs/{run.run_id}", headers=org.headers) as r:
        assert r.status == 200
        assert (await r.json())["run"]["state"] == "RUN_STATE_CANCELLED"


async def test_cancelling_a_completed_run_returns_it_unchanged(pipelines: Stub, service: app.Service) -> None:
    org = await make_org(service, "cancelled")
    done = await start(pipelines, org, "quick", wait=True)
    assert done.state == RS.RUN_STATE_COMPLETED
    after = await cancel(pipelines, org, done.run_id)
    assert after.state == RS.RUN_STATE_COMPLETED and after.reason == "" and after.end_time == done.end_time
    assert (await get(pipelines, org, done.run_id)).state == RS.RUN_STATE_COMPLETED


async def test_cancel_leaves_another_orgs_run_going(pipelines: Stub, service: app.Service) -> None:
    one, two = await make_org(service, "cancelone"), await make_org(service, "canceltwo")
    doomed = await start(pipelines, one, "sleepy", {"sleep": "30"})
    other = await start(pipelines, two, "sleepy", {"sleep": "1"})
    await wait_state(pipelines, one, doomed.run_id, RS.RUN_STATE_RUNNING)
    await wait_state(pipelines, two, other.run_id, RS.RUN_STATE_RUNNING)

    await cancel(pipelines, one, doomed.run_id)
    assert (await wait_terminal(pipelines, one, doomed.run_id, timeout=2)).state == RS.RUN_STATE_CANCELLED
    assert (await get(pipelines, two, other.run_id)).state == RS.RUN_STATE_RUNNING
    finished = await wait_terminal(pipelines, two, other.run_id, timeout=10)
    assert finished.state == RS.RUN_STATE_COMPLETED and finished.reason == ""
    assert [s.state for s in finished.steps] == [RS.STEP_STATE_SUCCEEDED] * 2


# --- 3. duplicates --------------------------------------------------------------------------------------


async def test_duplicate_of_an_active_run_is_aborted(
    http: aiohttp.ClientSession, pipelines: Stub, service: app.Service
) -> None:
    org = await make_org(service, "dupe")
    first = await start(pipelines, org, "sleepy", {"sleep": "30"})
    started = [first.run_id]
    try:
        error = await rpc_failure(
            start(pipelines, org, "sleepy", {"sleep": "30"}), grpc.StatusCode.ABORTED, "RUN_ALREADY_ACTIVE"
        )
        assert error_info(error).metadata["active_run_id"] == first.run_id
        # The config's default for `sleep` is "30": leaving it out is the same run too.
        error = await rpc_failure(
            start(pipelines, org, "sleepy"), grpc.StatusCode.ABORTED, "RUN_ALREADY_ACTIVE"
        )
        assert error_info(error).metadata["active_run_id"] == first.run_id

        status, body = await run_rest(http, org, "engine/runs/sleepy", {"parameters": {"sleep": "30"}})
        assert status == 409, body
        assert rest_reason(body) == "RUN_ALREADY_ACTIVE"
        assert rest_details(body, ERROR_INFO)[0]["metadata"]["active_run_id"] == first.run_id

        other = await start(pipelines, org, "sleepy", {"sleep": "29"})
        started.append(other.run_id)
        assert other.run_id != first.run_id and other.parameters["sleep"] == "29"
        status, body = await run_rest(http, org, "engine/runs/sleepy", {"parameters": {"sleep": "28"}})
        assert status == 200, body
        started.append(body["run"]["run_id"])
        assert len(set(started)) == 3
    finally:
        await cancel_and_wait(pipelines, org, started)
    # Once the first run has ended, the same parameters are accepted again.
    again = await start(pipelines, org, "sleepy", {"sleep": "30"})
    assert again.run_id not in started
    await cancel_and_wait(pipelines, org, [again.run_id])


# --- 4. request ids -------------------------------------------------------------------------------------


async def test_request_id_returns_the_same_run(pipelines: Stub, service: app.Service) -> None:
    org, other = await make_org(service, "reqid"), await make_org(service, "reqidother")
    request_id = str(uuid.uuid4())
    first = await start(pipelines, org, "sleepy", {"sleep": "0.3"}, request_id=request_id)
    second = await start(pipelines, org, "sleepy", {"sleep": "0.3"}, request_id=request_id)
    assert second.run_id == first.run_id and second.request_id == request_id
    done = await wait_terminal(pipelines, org, first.run_id)
    assert done.state == RS.RUN_STATE_COMPLETED

    after = await start(pipelines, org, "sleepy", {"sleep": "0.3"}, request_id=request_id)
    assert after.run_id == first.run_id and after.state == RS.RUN_STATE_COMPLETED
    await service.ledger.flush()
    after_flush = await start(pipelines, org, "sleepy", {"sleep": "0.3"}, request_id=request_id)
    assert after_flush.run_id == first.run_id

    theirs = await start(pipelines, other, "sleepy", {"sleep": "0.3"}, request_id=request_id)
    assert theirs.run_id != first.run_id and theirs.org_slug == other.slug
    assert (await wait_terminal(pipelines, other, theirs.run_id)).state == RS.RUN_STATE_COMPLETED
    # Exactly one run per org was made, and only one counts against each org's daily quota.
    assert (await service.state.used(org.slug))[0] == 1
    assert (await service.state.used(other.slug))[0] == 1
    assert [r.run_id for r in await list_all(pipelines, org)] == [first.run_id]


async def test_concurrent_calls_with_one_request_id_make_one_run(
    pipelines: Stub, service: app.Service
) -> None:
    org = await make_org(service, "reqrace")
    request_id = str(uuid.uuid4())
    runs = await asyncio.gather(
        *(start(pipelines, org, "sleepy", {"sleep": "0.3"}, request_id=request_id) for _ in range(5))
    )
    assert {r.run_id for r in runs} == {runs[0].run_id}, runs
    assert (await wait_terminal(pipelines, org, runs[0].run_id)).state == RS.RUN_STATE_COMPLETED
    assert (await service.state.used(org.slug))[0] == 1


# --- 5. quotas ------------------------------------------------------------------------------------------

SMALL = {"daily_limit": 3, "monthly_limit": 100, "concurrent_limit": 2, "requests_per_minute": 1000}


async def test_concurrent_limit_then_recovery(
    http: aiohttp.ClientSession, pipelines: Stub, service: app.Service
) -> None:
    org = await plan_org(service, "concur", **SMALL)
    state = service.state
    a = await start(pipelines, org, "sleepy", {"sleep": "30"})
    b = await start(pipelines, org, "sleepy", {"sleep": "29"})
    started = [a.run_id, b.run_id]
    try:
        assert (await state.active_runs(org.slug)) == 2
        error = await rpc_failure(
            start(pipelines, org, "sleepy", {"sleep": "28"}), EXHAUSTED, "CONCURRENT_LIMIT_EXCEEDED"
        )
        assert error_info(error).metadata["limit"] == "2"
        assert retry_info(error).retry_delay.seconds > 0

        status, body = await run_rest(http, org, "engine/runs/sleepy", {"parameters": {"sleep": "27"}})
        assert status == 429, body
        assert rest_reason(body) == "CONCURRENT_LIMIT_EXCEEDED"
        assert len(rest_details(body, RETRY_INFO)) == 1, body
        assert (await state.active_runs(org.slug)) == 2 and (await state.used(org.slug))[
            0
        ] == 2  # rejections count nothing

        await cancel_and_wait(pipelines, org, [a.run_id])
        assert (await state.active_runs(org.slug)) == 1
        c = await start(pipelines, org, "sleepy", {"sleep": "28"})
        started.append(c.run_id)
        assert c.state in (RS.RUN_STATE_PENDING, RS.RUN_STATE_RUNNING)
        assert (await state.active_runs(org.slug)) == 2
    finally:
        await cancel_and_wait(pipelines, org, started)
    assert (await state.active_runs(org.slug)) == 0


async def test_daily_limit(http: aiohttp.ClientSession, pipelines: Stub, service: app.Service) -> None:
    org = await plan_org(service, "daily", **SMALL)
    for i in range(3):
        run = await start(pipelines, org, "quick", {"label": str(i)}, wait=True)
        assert run.state == RS.RUN_STATE_COMPLETED
    error = await rpc_failure(
        start(pipelines, org, "quick", {"label": "3"}), EXHAUSTED, "DAILY_LIMIT_EXCEEDED"
    )
    assert error_info(error).metadata["limit"] == "3"
    delay = retry_info(error).retry_delay
    assert 0 < delay.seconds <= 24 * 3600
    status, body = await run_rest(http, org, QUICK, {"parameters": {"label": "4"}})
    assert status == 429 and rest_reason(body) == "DAILY_LIMIT_EXCEEDED", body
    assert (await service.state.used(org.slug))[0] == 3
    assert (await service.state.active_runs(org.slug)) == 0


async def test_failed_cancelled_and_timed_out_runs_release_their_slots(
    pipelines: Stub, service: app.Service
) -> None:
    org = await plan_org(
        service, "release", daily_limit=100, monthly_limit=100, concurrent_limit=3, requests_per_minute=1000
    )
    state = service.state
    failing = await start(pipelines, org, "failing")
    slow = await start(pipelines, org, "slow")
    sleepy = await start(pipelines, org, "sleepy", {"sleep": "30"})
    assert (await state.active_runs(org.slug)) >= 1
    await wait_state(pipelines, org, sleepy.run_id, RS.RUN_STATE_RUNNING)
    await cancel(pipelines, org, sleepy.run_id)
    ends = {
        r: (await wait_terminal(pipelines, org, r, timeout=10)).state
        for r in (failing.run_id, slow.run_id, sleepy.run_id)
    }
    assert ends == {
        failing.run_id: RS.RUN_STATE_FAILED,
        slow.run_id: RS.RUN_STATE_TIMEOUT,
        sleepy.run_id: RS.RUN_STATE_CANCELLED,
    }
    assert (await state.active_runs(org.slug)) == 0
    # All three slots are free again: three concurrent runs are accepted.
    more = [await start(pipelines, org, "sleepy", {"sleep": str(20 + i)}) for i in range(3)]
    assert (await state.active_runs(org.slug)) == 3
    await cancel_and_wait(pipelines, org, [r.run_id for r in more])
    assert (await state.active_runs(org.slug)) == 0


async def test_request_rate_limit(pipelines: Stub, service: app.Service) -> None:
    org = await plan_org(service, "rate", requests_per_minute=2)
    first = await start(pipelines, org, "quick", {"label": "a"})
    second = await start(pipelines, org, "quick", {"label": "b"})
    error = await rpc_failure(start(pipelines, org, "quick", {"label": "c"}), EXHAUSTED, "RATE_LIMITED")
    assert retry_info(error).retry_delay.seconds > 0
    for run in (first, second):
        assert (await wait_terminal(pipelines, org, run.run_id)).state == RS.RUN_STATE_COMPLETED
    assert (await service.state.used(org.slug))[0] == 2


# --- 6. tenancy -----------------------------------------------------------------------------------------


async def test_another_orgs_run_is_not_found(pipelines: Stub, acme: Org, globex: Org) -> None:
    active = await start(pipelines, acme, "sleepy", {"sleep": f"{uuid.uuid4().int % 1000 + 30}"})
    try:
        for call in (
            get(pipelines, globex, active.run_id),
            cancel(pipelines, globex, active.run_id),
            watch(pipelines, globex, active.run_id, within=5),
        ):
            error = await rpc_failure(call, grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND")
            # Indistinguishable from a run that does not exist at all.
            assert error.details() == f"run {active.run_id!r} not found"
            assert dict(error_info(error).metadata) == {"run_id": active.run_id}
        # globex's cancel did nothing.
        still = await get(pipelines, acme, active.run_id)
        assert still.state in (RS.RUN_STATE_PENDING, RS.RUN_STATE_RUNNING), still
    finally:
        await cancel_and_wait(pipelines, acme, [active.run_id])

    # The same once the run has ended, and for a well-formed id that no run has (looked up in the ledger).
    unknown = uuid.uuid4().hex
    for run_id in (active.run_id, unknown):
        for call in (
            get(pipelines, globex, run_id),
            cancel(pipelines, globex, run_id),
            watch(pipelines, globex, run_id, within=5),
        ):
            error = await rpc_failure(call, grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND")
            assert error.details() == f"run {run_id!r} not found"
    assert (await get(pipelines, acme, active.run_id)).state == RS.RUN_STATE_CANCELLED


async def test_running_for_another_org_is_org_mismatch(
    http: aiohttp.ClientSession, pipelines: Stub, acme: Org, globex: Org
) -> None:
    request = run_request(acme, "quick")
    error = await rpc_failure(
        pipelines.RunPipeline(request, metadata=globex.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
        "ORG_MISMATCH",
    )
    assert error_info(error).metadata["org_slug"] == acme.slug
    async with http.post(f"/api/v1/pipelines/run/{acme.slug}/{QUICK}", headers=globex.headers, json={}) as r:
        body = await r.json()
        assert r.status == 403, body
    assert rest_reason(body) == "ORG_MISMATCH"


async def test_listing_never_shows_another_orgs_runs(
    pipelines: Stub, service: app.Service, acme: Org, globex: Org
) -> None:
    mine = await start(pipelines, globex, "quick", {"label": "globex"}, wait=True)
    theirs = await start(pipelines, acme, "sleepy", {"sleep": "0.2"})
    ended = await start(pipelines, acme, "quick", {"label": "acme"}, wait=True)
    try:
        for filters in ({}, {"pipeline": QUICK}, {"pipeline": SLEEPY}, {"status": "COMPLETED"}):
            listed = await list_all(pipelines, globex, page_size=50, **filters)
            assert all(r.org_slug == globex.slug for r in listed), filters
            assert {theirs.run_id, ended.run_id}.isdisjoint(r.run_id for r in listed), filters
        assert mine.run_id in {r.run_id for r in await list_all(pipelines, globex, page_size=50)}
    finally:
        await cancel_and_wait(pipelines, acme, [theirs.run_id])


# --- 7. path and date validation over REST --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("engine/runs/..%2F..%2Fetc", "pipeline"),  # Envoy keeps %2F escaped: one (bad) segment reaches us
        ("Engine/runs/quick", "provider"),
        ("engine/Runs/quick", "domain"),
        ("engine/runs/a.b", "pipeline"),
        ("engine/runs/quick%00", "pipeline"),
    ],
)
async def test_bad_path_segment_is_400_with_a_field_violation(
    http: aiohttp.ClientSession, service: app.Service, acme: Org, path: str, field: str
) -> None:
    before = await service.state.used(acme.slug)
    # `encoded=True`: sent exactly as written, nothing unescaped or normalized on the client's side.
    url = URL(f"/api/v1/pipelines/run/{acme.slug}/{path}", encoded=True)
    async with http.post(url, headers=acme.headers, json={}) as r:
        assert r.status == 400, await r.text()
        assert r.content_type == "application/json"
        body = await r.json()
    assert body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rest_reason(body) == "INVALID_PIPELINE_PATH"
    assert rest_violations(body) == {field}, body
    assert (await service.state.used(acme.slug)) == before


async def test_dot_dot_segments_never_reach_another_route(http: aiohttp.ClientSession, acme: Org) -> None:
    # Literal `..` segments are resolved by Envoy before routing: what is left matches no route, and the
    # reply is Envoy's own JSON 404, not a 500 and not some other method.
    url = URL(f"/api/v1/pipelines/run/{acme.slug}/engine/runs/../../etc", encoded=True)
    async with http.post(url, headers=acme.headers, json={}) as r:
        assert r.status == 404, await r.text()
        assert r.content_type == "application/json"
        body = await r.json()
    assert body["code"] == 5 and "Could not resolve" in body["message"], body
    assert body["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "ROUTE_NOT_FOUND",
            "domain": "cloudact.io",
        }
    ]


async def test_unknown_pipeline_is_404(http: aiohttp.ClientSession, pipelines: Stub, acme: Org) -> None:
    status, body = await run_rest(http, acme, "engine/runs/does_not_exist", {})
    assert status == 404 and rest_reason(body) == "PIPELINE_NOT_FOUND", body
    assert rest_details(body, ERROR_INFO)[0]["metadata"]["pipeline"] == "engine/runs/does_not_exist"
    await rpc_failure(
        start(pipelines, acme, "does_not_exist"), grpc.StatusCode.NOT_FOUND, "PIPELINE_NOT_FOUND"
    )


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"date": "2025-13-01"}, {"date"}),
        ({"date": "yesterday"}, {"date"}),
        ({"start_date": "2025-12-08", "end_date": "2025-12-01"}, None),
        ({"start_date": "2025-12-01"}, {"end_date"}),
        ({"date": "2025-12-01", "start_date": "2025-12-01", "end_date": "2025-12-02"}, None),
        ({"date": "2999-01-01"}, {"date"}),
    ],
)
async def test_bad_run_window_is_400(
    http: aiohttp.ClientSession,
    service: app.Service,
    acme: Org,
    body: dict[str, object],
    fields: set[str] | None,
) -> None:
    before = await service.state.used(acme.slug)
    status, data = await run_rest(http, acme, QUICK, body)
    assert status == 400, data
    violations = rest_violations(data)
    assert violations, data
    if fields is not None:
        assert violations == fields, data
    assert (await service.state.used(acme.slug)) == before  # nothing was accepted


# --- 8. listing -----------------------------------------------------------------------------------------


async def rest_list(http: aiohttp.ClientSession, org: Org, query: str) -> tuple[int, dict[str, Any]]:
    async with http.get(f"/api/v1/pipelines/runs?{query}", headers=org.headers) as r:
        return r.status, await r.json()


async def test_list_pages_walk_every_run_newest_first(
    http: aiohttp.ClientSession, pipelines: Stub, service: app.Service
) -> None:
    org = await make_org(service, "listing")
    ids = [(await start(pipelines, org, "quick", {"label": str(i)}, wait=True)).run_id for i in range(5)]
    failed = await start(pipelines, org, "failing", wait=True)
    assert failed.state == RS.RUN_STATE_FAILED

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        query = f"pipeline={QUICK}&status=COMPLETED&page_size=2" + (f"&page_token={token}" if token else "")
        status, body = await rest_list(http, org, query)
        assert status == 200, body
        pages += 1
        assert len(body["runs"]) == (2 if pages < 3 else 1), body
        assert all(r["state"] == "RUN_STATE_COMPLETED" and r["pipeline"] == "quick" for r in body["runs"])
        assert all(r["steps"] == [] for r in body["runs"])
        seen += [r["run_id"] for r in body["runs"]]
        token = body["next_page_token"]
        if not token:
            break
    assert pages == 3
    assert seen == ids[::-1]  # newest first, no duplicates, none missing

    for status_filter in ("FAILED", "RUN_STATE_FAILED", "failed"):
        status, body = await rest_list(http, org, f"status={status_filter}")
        assert status == 200, body
        assert [r["run_id"] for r in body["runs"]] == [failed.run_id], (status_filter, body)
        assert body["runs"][0]["reason"] == "STEP_FAILED"
    status, body = await rest_list(http, org, "status=COMPLETED")
    assert [r["run_id"] for r in body["runs"]] == ids[::-1]
    status, body = await rest_list(http, org, "pipeline=engine/runs/failing")
    assert [r["run_id"] for r in body["runs"]] == [failed.run_id]

    status, body = await rest_list(http, org, "status=DONE")
    assert status == 400 and rest_violations(body) == {"status"}, body
    status, body = await rest_list(http, org, "page_token=garbage")
    assert status == 400 and rest_reason(body) == "INVALID_PAGE_TOKEN", body


async def test_an_active_run_is_listed_at_once(
    http: aiohttp.ClientSession, pipelines: Stub, service: app.Service
) -> None:
    org = await make_org(service, "listactive")
    run = await start(pipelines, org, "sleepy", {"sleep": "30"})
    try:
        await wait_state(pipelines, org, run.run_id, RS.RUN_STATE_RUNNING)
        status, body = await rest_list(http, org, "status=RUNNING")
        assert status == 200, body
        assert [(r["run_id"], r["state"]) for r in body["runs"]] == [(run.run_id, "RUN_STATE_RUNNING")]
        status, body = await rest_list(http, org, f"pipeline={SLEEPY}")
        assert [r["run_id"] for r in body["runs"]] == [run.run_id]
        status, body = await rest_list(http, org, "status=COMPLETED")
        assert body["runs"] == []
    finally:
        await cancel_and_wait(pipelines, org, [run.run_id])
    status, body = await rest_list(http, org, "")
    assert [(r["run_id"], r["state"]) for r in body["runs"]] == [(run.run_id, "RUN_STATE_CANCELLED")]


async def test_a_run_that_just_ended_is_always_listed(pipelines: Stub, service: app.Service) -> None:
    # Between "no longer active" and "readable from the ledger's table" a run must stay listed, also while
    # the background flusher (every 0.5 s) is writing the batch that holds it. The pauses sweep that
    # interval so that some list calls land in the middle of a flush.
    org = await make_org(service, "listrace")
    ids: list[str] = []
    for i in range(20):
        ids.append((await start(pipelines, org, "quick", {"label": str(i)}, wait=True)).run_id)
        await asyncio.sleep(0.025 * i)
        listed = [r.run_id for r in await list_all(pipelines, org, page_size=50)]
        assert listed == ids[::-1], (i, listed)


# --- 9. ledger ------------------------------------------------------------------------------------------


async def ledger_rows(service: app.Service, table: str, slugs: Iterable[str]) -> list[dict[str, Any]]:
    await service.ledger.flush()
    ref = service.warehouse.table_ref(service.settings.meta_dataset, table)
    rows = await service.warehouse.query(
        f"SELECT * FROM {ref} WHERE org_slug IN UNNEST(@orgs)", {"orgs": list(slugs)}
    )
    return [dict(r.items()) for r in rows]


async def test_ledger_has_one_row_per_run_and_every_transition(pipelines: Stub, service: app.Service) -> None:
    org = await make_org(service, "ledger")
    quick = await start(pipelines, org, "quick")
    got = await get(pipelines, org, quick.run_id)  # at once: no NOT_FOUND while it is being accepted
    assert got.run_id == quick.run_id and got.org_slug == org.slug
    failing = await start(pipelines, org, "failing")
    sleepy = await start(pipelines, org, "sleepy", {"sleep": "30"})
    await wait_state(pipelines, org, sleepy.run_id, RS.RUN_STATE_RUNNING)
    await cancel(pipelines, org, sleepy.run_id)
    final = {
        r: (await wait_terminal(pipelines, org, r)).state
        for r in (quick.run_id, failing.run_id, sleepy.run_id)
    }

    exported = service.ledger.exported
    runs = await ledger_rows(service, "pipeline_runs", [org.slug])
    assert sorted(r["run_id"] for r in runs) == sorted(final)  # exactly one row per run
    assert service.ledger.exported >= exported + 3  # the count the benchmark divides the export's cost by
    names = {
        RS.RUN_STATE_COMPLETED: "COMPLETED",
        RS.RUN_STATE_FAILED: "FAILED",
        RS.RUN_STATE_CANCELLED: "CANCELLED",
    }
    assert {r["run_id"]: r["state"] for r in runs} == {k: names[v] for k, v in final.items()}
    by_id = {r["run_id"]: r for r in runs}
    assert by_id[sleepy.run_id]["reason"] == "CANCELLED_BY_USER"
    assert by_id[failing.run_id]["reason"] == "STEP_FAILED"
    assert by_id[quick.run_id]["pipeline_key"] == QUICK and by_id[quick.run_id]["trigger"] == "API"

    events = await ledger_rows(service, "pipeline_run_events", [org.slug])
    attempts = sorted(
        (e["run_id"], e["step_id"], e["attempt"], e["to_state"])
        for e in events
        if e["kind"] == "STEP_ATTEMPT"
    )
    assert attempts == sorted(
        [
            (quick.run_id, "first", 1, "SUCCEEDED"),
            (quick.run_id, "second", 1, "SUCCEEDED"),
            (failing.run_id, "ok", 1, "SUCCEEDED"),
            (failing.run_id, "broken", 1, "FAILED"),
            (sleepy.run_id, "nap", 1, "CANCELLED"),
        ]
    )
    assert all(
        e["started_at"] and e["ended_at"] and e["duration_ms"] is not None
        for e in events
        if e["kind"] == "STEP_ATTEMPT"
    )

    def chain(run_id: str) -> list[tuple[str | None, str]]:
        rows = sorted(
            (e for e in events if e["run_id"] == run_id and e["kind"] == "RUN_TRANSITION"),
            key=lambda e: (e["at"], e["from_state"] is not None),  # RUNNING may share PENDING's time
        )
        return [(e["from_state"], e["to_state"]) for e in rows]

    assert chain(quick.run_id) == [(None, "PENDING"), ("PENDING", "RUNNING"), ("RUNNING", "COMPLETED")]
    assert chain(failing.run_id) == [(None, "PENDING"), ("PENDING", "RUNNING"), ("RUNNING", "FAILED")]
    assert chain(sleepy.run_id) == [
        (None, "PENDING"),
        ("PENDING", "RUNNING"),
        ("RUNNING", "CANCELLING"),
        ("CANCELLING", "CANCELLED"),
    ]
    pending = [e for e in events if e["kind"] == "RUN_TRANSITION" and e["to_state"] == "PENDING"]
    assert all(e["run"] for e in pending) and len(pending) == 3
    steps = Counter(
        (e["run_id"], e["step_id"], e["to_state"]) for e in events if e["kind"] == "STEP_TRANSITION"
    )
    assert steps[(failing.run_id, "never", "NOT_RUN")] == 1
    assert steps[(sleepy.run_id, "after", "NOT_RUN")] == 1
    assert steps[(quick.run_id, "second", "SUCCEEDED")] == 1


async def test_an_accepted_run_is_running_and_stored_so_when_the_call_returns(
    pipelines: Stub, service: app.Service
) -> None:
    # Admission starts the run: the one admission statement writes it RUNNING with its PENDING and
    # RUNNING transitions, so every replica reads what the caller was told, and the run's only other
    # write is its end.
    org = await make_org(service, "admitted_running")
    run = await start(pipelines, org, "sleepy", {"sleep": "0.5"})
    assert run.state == RS.RUN_STATE_RUNNING and run.HasField("start_time"), run
    assert run.start_time.ToDatetime() >= run.create_time.ToDatetime()
    stored = await service.state.get_run(org.slug, run.run_id)
    assert stored is not None and stored.state == "RUNNING"
    assert stored.start_time is not None
    assert stored.start_time.replace(tzinfo=None) == run.start_time.ToDatetime()
    transitions = [
        e["to_state"] for e in await service.state.events(run.run_id) if e["kind"] == "RUN_TRANSITION"
    ]
    assert transitions == ["PENDING", "RUNNING"]
    assert (await get(pipelines, org, run.run_id)).state == RS.RUN_STATE_RUNNING

    watched = await watch(pipelines, org, run.run_id)
    assert [e.run_state for e in watched if not e.step_id] == [
        RS.RUN_STATE_PENDING,
        RS.RUN_STATE_RUNNING,
        RS.RUN_STATE_COMPLETED,
    ]
    events = await service.state.events(run.run_id)
    assert [(e["from_state"], e["to_state"]) for e in events if e["kind"] == "RUN_TRANSITION"] == [
        (None, "PENDING"),
        ("PENDING", "RUNNING"),
        ("RUNNING", "COMPLETED"),
    ]
    assert [(e["step_id"], e["to_state"]) for e in events if e["kind"] == "STEP_TRANSITION"] == [
        (e.step_id, RS.StepState.Name(e.step_state).removeprefix("STEP_STATE_")) for e in watched if e.step_id
    ]
    assert [e["step_id"] for e in events if e["kind"] == "STEP_ATTEMPT"] == ["nap", "after"]
    final = await service.state.get_run(org.slug, run.run_id)
    assert final is not None and final.state == "COMPLETED" and final.start_time == stored.start_time


# --- 10. many concurrent runs ---------------------------------------------------------------------------


async def test_fifty_concurrent_runs_across_five_orgs(pipelines: Stub, service: app.Service) -> None:
    orgs = await asyncio.gather(
        *(plan_org(service, f"many{i}", concurrent_limit=20, daily_limit=100) for i in range(5))
    )
    loop = asyncio.get_running_loop()
    began = loop.time()
    runs = await asyncio.gather(
        *(start(pipelines, orgs[i % 5], "quick", {"label": str(i)}) for i in range(50))
    )
    assert len({r.run_id for r in runs}) == 50
    async with asyncio.timeout(60):
        done = await asyncio.gather(
            *(wait_terminal(pipelines, orgs[i % 5], r.run_id, timeout=60) for i, r in enumerate(runs))
        )
    assert all(r.state == RS.RUN_STATE_COMPLETED for r in done), [r for r in done if r.state != 3]
    assert loop.time() - began < 60
    expected = {o.slug: {r.run_id for i, r in enumerate(runs) if i % 5 == n} for n, o in enumerate(orgs)}
    assert all(len(ids) == 10 for ids in expected.values())
    assert all(r.parameters["label"] == str(i) for i, r in enumerate(done))

    rows = await ledger_rows(service, "pipeline_runs", expected)
    assert len(rows) == 50
    actual: dict[str, set[str]] = {slug: set() for slug in expected}
    for row in rows:
        actual[row["org_slug"]].add(row["run_id"])
        assert row["state"] == "COMPLETED"
    assert actual == expected
    assert [await service.state.active_runs(slug) for slug in expected] == [0] * len(expected)
    for org in orgs:
        assert {r.run_id for r in await list_all(pipelines, org, page_size=4)} == expected[org.slug]


# --- 11. metrics ----------------------------------------------------------------------------------------


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of this process's default registry, as the /metrics endpoint would serve it."""
    text = generate_latest(REGISTRY).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def delta(
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    after: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    name: str,
    **labels: str,
) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in after, (key, sorted(k for k in after if k[0] == name))
    return after[key] - before.get(key, 0.0)


async def test_metrics(pipelines: Stub, service: app.Service) -> None:
    assert service.metrics_port == 0
    org = await plan_org(service, "metrics", requests_per_minute=5, concurrent_limit=1)
    before = scrape()
    ok = await start(pipelines, org, "quick", {"label": "metrics"}, wait=True)
    bad = await start(pipelines, org, "failing", wait=True)
    nap = await start(pipelines, org, "sleepy", {"sleep": "0.3"}, wait=True)
    assert (ok.state, bad.state, nap.state) == (
        RS.RUN_STATE_COMPLETED,
        RS.RUN_STATE_FAILED,
        RS.RUN_STATE_COMPLETED,
    )
    sleepy = await start(pipelines, org, "sleepy", {"sleep": "30"})
    await rpc_failure(start(pipelines, org, "quick"), EXHAUSTED, "CONCURRENT_LIMIT_EXCEEDED")
    await rpc_failure(start(pipelines, org, "quick"), EXHAUSTED, "RATE_LIMITED")
    await cancel_and_wait(pipelines, org, [sleepy.run_id])
    after = scrape()

    # Exact: the tests run one at a time and every earlier run has ended, so only this test's runs count.
    # Refused calls start nothing.
    counts = {
        ("pipeline_runs_started_total", (("pipeline", QUICK),)): 1,
        ("pipeline_runs_started_total", (("pipeline", "engine/runs/failing"),)): 1,
        ("pipeline_runs_started_total", (("pipeline", SLEEPY),)): 2,
        ("pipeline_runs_finished_total", (("pipeline", QUICK), ("state", "COMPLETED"))): 1,
        ("pipeline_runs_finished_total", (("pipeline", "engine/runs/failing"), ("state", "FAILED"))): 1,
        ("pipeline_runs_finished_total", (("pipeline", SLEEPY), ("state", "COMPLETED"))): 1,
        ("pipeline_runs_finished_total", (("pipeline", SLEEPY), ("state", "CANCELLED"))): 1,
        ("pipeline_quota_rejections_total", (("reason", "RATE_LIMITED"),)): 1,
        ("pipeline_quota_rejections_total", (("reason", "CONCURRENT_LIMIT_EXCEEDED"),)): 1,
        ("pipeline_step_duration_seconds_count", (("ps_type", "generic.noop"), ("state", "SUCCEEDED"))): 5,
        ("pipeline_step_duration_seconds_count", (("ps_type", "generic.noop"), ("state", "NOT_RUN"))): 2,
        ("pipeline_step_duration_seconds_count", (("ps_type", "generic.noop"), ("state", "CANCELLED"))): 1,
        (
            "pipeline_step_duration_seconds_count",
            (("ps_type", "generic.procedure_executor"), ("state", "FAILED")),
        ): 1,
    }
    for (name, labels), expected in counts.items():
        assert delta(before, after, name, **dict(labels)) == expected, (name, labels)
    # Step durations are real wall times: the 0.3 s nap is in the histogram's sum.
    assert (
        delta(before, after, "pipeline_step_duration_seconds_sum", ps_type="generic.noop", state="SUCCEEDED")
        >= 0.29
    )
    assert (
        "pipeline_step_duration_seconds_bucket",
        (("le", "+Inf"), ("ps_type", "generic.noop"), ("state", "SUCCEEDED")),
    ) in after
    assert ("pipeline_runs_active", ()) in after
    assert after[("pipeline_runs_active", ())] == 0


async def test_a_caller_that_goes_away_never_leaves_an_admitted_run_behind(
    pipelines: Stub, service: app.Service
) -> None:
    # Deadlines that run out before, during and after the admission commits: whatever was admitted runs.
    org = await plan_org(service, "gone", concurrent_limit=100, daily_limit=1000, requests_per_minute=1000)
    outcomes = await asyncio.gather(
        *(
            pipelines.RunPipeline(
                run_request(org, "quick", {"label": str(i)}), metadata=org.metadata, timeout=0.002 * i + 0.001
            )
            for i in range(30)
        ),
        return_exceptions=True,
    )
    assert any(isinstance(o, aio.AioRpcError) for o in outcomes), outcomes
    await asyncio.sleep(1.0)
    runs = await list_all(pipelines, org, page_size=50)
    assert len(runs) == (await service.state.used(org.slug))[0]
    assert all(r.state == RS.RUN_STATE_COMPLETED for r in runs), runs
    assert await service.state.active_runs(org.slug) == 0
