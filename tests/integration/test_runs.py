"""RunPipeline and friends over the gRPC stub and REST through Envoy, against the real emulator."""

from __future__ import annotations

import aiohttp

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from server import app
from tests.conftest import Org
from tests.integration.runs import wait_terminal

PS = pipeline_service_pb2
RS = pipeline_run_pb2


async def run_rest(
    http: aiohttp.ClientSession, org: Org, path: str, body: dict[str, object]
) -> tuple[int, dict[str, object]]:
    async with http.post(f"/api/v1/pipelines/run/{org.slug}/{path}", headers=org.headers, json=body) as r:
        return r.status, await r.json()


async def test_seed_bodies_work_verbatim_over_rest(
    http: aiohttp.ClientSession, acme: Org, pipelines: pipeline_service_pb2_grpc.PipelineServiceStub
) -> None:
    for body, window in (
        ({"date": "2025-12-08"}, ("2025-12-08", "2025-12-08")),
        ({"start_date": "2025-12-01", "end_date": "2025-12-08"}, ("2025-12-01", "2025-12-08")),
        ({}, None),
    ):
        status, data = await run_rest(http, acme, "engine/runs/quick", body)
        assert status == 200, data
        run = data["run"]
        assert run["org_slug"] == acme.slug and run["pipeline"] == "quick" and run["trigger"] == "TRIGGER_API"
        assert run["state"] in ("RUN_STATE_PENDING", "RUN_STATE_RUNNING")
        done = await wait_terminal(pipelines, acme, run["run_id"])
        assert done.state == RS.RUN_STATE_COMPLETED, done
        assert [s.state for s in done.steps] == [RS.STEP_STATE_SUCCEEDED] * 2
        if window:
            assert (done.parameters["start_date"], done.parameters["end_date"]) == window
        assert done.parameters["label"] == "default"


async def test_wait_returns_the_finished_run_with_step_outputs_resolved(
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub, acme: Org
) -> None:
    response = await pipelines.RunPipeline(
        PS.RunPipelineRequest(
            org_slug=acme.slug,
            provider="engine",
            domain="runs",
            pipeline="quick",
            date="2025-02-28",
            parameters={"label": "custom"},
            wait=True,
        ),
        metadata=acme.metadata,
        timeout=30,
    )
    run = response.run
    assert run.state == RS.RUN_STATE_COMPLETED
    assert run.parameters["label"] == "custom"
    assert all(s.attempts == 1 and s.end_time.seconds > 0 for s in run.steps)


async def test_failed_step_fails_the_run_and_later_steps_do_not_run(
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub, acme: Org
) -> None:
    run = (
        await pipelines.RunPipeline(
            PS.RunPipelineRequest(
                org_slug=acme.slug, provider="engine", domain="runs", pipeline="failing", wait=True
            ),
            metadata=acme.metadata,
            timeout=60,
        )
    ).run
    assert run.state == RS.RUN_STATE_FAILED and run.reason == "STEP_FAILED"
    states = {s.step_id: s.state for s in run.steps}
    assert states == {
        "ok": RS.STEP_STATE_SUCCEEDED,
        "broken": RS.STEP_STATE_FAILED,
        "never": RS.STEP_STATE_NOT_RUN,
    }
    broken = next(s for s in run.steps if s.step_id == "broken")
    assert "sp_does_not_exist" in broken.error and "Traceback" not in broken.error
    # A stable reason and our own words: not the warehouse's message (project, dataset, routine path).
    assert broken.error_reason == "WAREHOUSE_NOT_FOUND"
    assert broken.error == "procedure sp_does_not_exist failed: not found"
    assert "test-project" not in run.error and "organizations" not in run.error


async def test_pipeline_timeout(pipelines: pipeline_service_pb2_grpc.PipelineServiceStub, acme: Org) -> None:
    run = (
        await pipelines.RunPipeline(
            PS.RunPipelineRequest(
                org_slug=acme.slug, provider="engine", domain="runs", pipeline="slow", wait=True
            ),
            metadata=acme.metadata,
            timeout=30,
        )
    ).run
    assert run.state == RS.RUN_STATE_TIMEOUT and run.reason == "PIPELINE_TIMEOUT"
    assert run.steps[0].state == RS.STEP_STATE_CANCELLED


async def test_template_error_fails_the_step_with_the_field_named_and_is_in_the_ledger(
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub, acme: Org, service: app.Service
) -> None:
    run = (
        await pipelines.RunPipeline(
            PS.RunPipelineRequest(
                org_slug=acme.slug, provider="engine", domain="runs", pipeline="bad_template", wait=True
            ),
            metadata=acme.metadata,
            timeout=30,
        )
    ).run
    assert run.state == RS.RUN_STATE_FAILED
    step = run.steps[0]
    assert step.state == RS.STEP_STATE_FAILED and step.error_reason == "TEMPLATE_ERROR"
    assert "no_such_name" in step.error and "steps.render.config.outputs.x" in step.error
    await service.runs._ledger.flush()
    events = service.warehouse.table_ref(service.settings.meta_dataset, "pipeline_run_events")
    rows = await service.warehouse.query(
        f"SELECT to_state, error_reason FROM {events} WHERE run_id = @id AND kind = 'STEP_ATTEMPT'",
        {"id": run.run_id},
    )
    assert rows == [{"to_state": "FAILED", "error_reason": "TEMPLATE_ERROR"}]
