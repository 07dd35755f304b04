"""`PipelineService`: thin servicer over the pipeline catalog and the run manager."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

from grpc import aio

from cloudact.pipeline.v1 import (
    pipeline_pb2,
    pipeline_run_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
)
from server.api.convert import set_timestamp, timestamp
from server.api.guard import org_principal, principal_name
from server.api.paging import decode_token, encode_token, invalid_token, page_size, paginate
from server.engine.manager import RunManager, RunRequest
from server.engine.run import ACTIVE, TERMINAL, Event, Run
from server.errors import FieldViolation, InvalidInputError
from server.pipelines.catalog import PipelineCatalog, PipelineConfig

MAX_WAIT_SECONDS = 600.0
_RUN_STATES = ACTIVE | TERMINAL


def pipeline_message(config: PipelineConfig) -> pipeline_pb2.Pipeline:
    """The proto form of a config."""
    spec = config.spec
    return pipeline_pb2.Pipeline(
        provider=config.provider,
        domain=config.domain,
        pipeline=config.pipeline,
        pipeline_id=spec.pipeline_id,
        display_name=spec.name,
        description=spec.description,
        version=spec.version,
        steps=[
            pipeline_pb2.PipelineStep(step_id=s.step_id, ps_type=s.ps_type, depends_on=s.depends_on or [])
            for s in spec.steps
        ],
    )


_RUN_STATE_VALUES = {name.removeprefix("RUN_STATE_"): v for name, v in pipeline_run_pb2.RunState.items()}
_STEP_STATE_VALUES = {name.removeprefix("STEP_STATE_"): v for name, v in pipeline_run_pb2.StepState.items()}
_TRIGGER_VALUES = {name.removeprefix("TRIGGER_"): v for name, v in pipeline_run_pb2.Trigger.items()}


def run_message(run: Run, *, with_steps: bool = True) -> pipeline_run_pb2.PipelineRun:
    """The proto form of a run (every RunPipeline answer builds one: its times and steps are set in place,
    not built apart and copied in)."""
    provider, domain, pipeline = run.pipeline_key.split("/")
    message = pipeline_run_pb2.PipelineRun(
        run_id=run.run_id,
        org_slug=run.org_slug,
        provider=provider,
        domain=domain,
        pipeline=pipeline,
        pipeline_id=run.pipeline_id,
        state=_RUN_STATE_VALUES[run.state],
        trigger=_TRIGGER_VALUES[run.trigger],
        triggered_by=run.triggered_by,
        parameters=run.parameters,
        reason=run.reason,
        error=run.error,
        request_id=run.request_id,
    )
    set_timestamp(message.create_time, run.create_time)
    set_timestamp(message.start_time, run.start_time)
    set_timestamp(message.end_time, run.end_time)
    if with_steps:
        for s in run.steps.values():
            step = message.steps.add(
                step_id=s.step_id,
                ps_type=s.ps_type,
                state=_STEP_STATE_VALUES[s.state],
                attempts=s.attempts,
                duration_ms=s.duration_ms,
                rows_written=s.rows_written,
                error=s.error,
                error_reason=s.error_reason,
            )
            set_timestamp(step.start_time, s.started_at)
            set_timestamp(step.end_time, s.ended_at)
    return message


def event_message(event: Event, run: Run) -> pipeline_run_pb2.RunEvent:
    """The proto form of a watched event; run-level events carry the whole run."""
    return pipeline_run_pb2.RunEvent(
        run_id=run.run_id,
        time=timestamp(event.at),
        run_state=_RUN_STATE_VALUES[event.run_state],
        step_id=event.step_id,
        step_state=_STEP_STATE_VALUES[event.step_state or "UNSPECIFIED"],
        attempt=event.attempt,
        error=event.error,
        run=None if event.step_id else run_message(run),
    )


def _state_filter(status: str) -> str:
    state = status.upper().removeprefix("RUN_STATE_")
    if state and state not in _RUN_STATES:
        raise InvalidInputError(
            "unknown run state", [FieldViolation("status", f"one of {sorted(_RUN_STATES)}")]
        )
    return state


_RUN_ID = re.compile(r"[0-9a-f]{32}")


def _cursor(token: str) -> tuple[datetime, str] | None:
    """The (create time, run id) a ListPipelineRuns token points after; a token this API did not issue
    (a naive or non-UTC time, a time out of range, a run id of another shape) is INVALID_PAGE_TOKEN."""
    if not token:
        return None
    created, _, run_id = decode_token(token).partition("|")
    try:
        after = datetime.fromisoformat(created)
    except ValueError as exc:
        raise invalid_token() from exc
    if after.tzinfo is None or after.utcoffset() != timedelta(0) or not _RUN_ID.fullmatch(run_id):
        raise invalid_token()
    return after, run_id


class PipelineServicer(pipeline_service_pb2_grpc.PipelineServiceServicer):
    """Lists, runs, observes and cancels the pipelines of the calling org."""

    def __init__(self, catalog: PipelineCatalog, runs: RunManager) -> None:
        self._catalog = catalog
        self._runs = runs

    async def ListPipelines(
        self, request: pipeline_service_pb2.ListPipelinesRequest, context: aio.ServicerContext[Any, Any]
    ) -> pipeline_service_pb2.ListPipelinesResponse:
        org_principal()
        configs = [c for c in self._catalog.all() if not request.provider or c.provider == request.provider]
        page, next_token = paginate(
            configs, lambda c: c.key, request.page_size, request.page_token, default=50, maximum=500
        )
        return pipeline_service_pb2.ListPipelinesResponse(
            pipelines=[pipeline_message(c) for c in page], next_page_token=next_token, total_size=len(configs)
        )

    async def RunPipeline(
        self, request: pipeline_service_pb2.RunPipelineRequest, context: aio.ServicerContext[Any, Any]
    ) -> pipeline_service_pb2.RunPipelineResponse:
        org = org_principal()
        run = await self._runs.submit(
            org,
            RunRequest(
                provider=request.provider,
                domain=request.domain,
                pipeline=request.pipeline,
                date=request.date,
                start_date=request.start_date,
                end_date=request.end_date,
                parameters=dict(request.parameters),
                force_refresh=request.force_refresh,
                request_id=request.request_id,
            ),
            principal_name(),
        )
        if request.wait:
            remaining = context.time_remaining()
            await self._runs.wait(run, min(MAX_WAIT_SECONDS, (remaining or MAX_WAIT_SECONDS) - 0.5))
        return pipeline_service_pb2.RunPipelineResponse(run=run_message(run))

    async def GetPipelineRun(
        self, request: pipeline_service_pb2.GetPipelineRunRequest, context: aio.ServicerContext[Any, Any]
    ) -> pipeline_service_pb2.GetPipelineRunResponse:
        run = await self._runs.get(org_principal().org_slug, request.run_id)
        return pipeline_service_pb2.GetPipelineRunResponse(run=run_message(run))

    async def ListPipelineRuns(
        self, request: pipeline_service_pb2.ListPipelineRunsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pipeline_service_pb2.ListPipelineRunsResponse:
        size = page_size(request.page_size, default=50, maximum=500)
        runs = await self._runs.list(
            org_principal().org_slug,
            pipeline_key=request.pipeline,
            state=_state_filter(request.status),
            before=_cursor(request.page_token),
            limit=size + 1,
        )
        page = runs[:size]
        token = (
            encode_token(f"{page[-1].create_time.isoformat()}|{page[-1].run_id}") if len(runs) > size else ""
        )
        return pipeline_service_pb2.ListPipelineRunsResponse(
            runs=[run_message(r, with_steps=False) for r in page], next_page_token=token
        )

    async def CancelPipelineRun(
        self, request: pipeline_service_pb2.CancelPipelineRunRequest, context: aio.ServicerContext[Any, Any]
    ) -> pipeline_service_pb2.CancelPipelineRunResponse:
        run = await self._runs.cancel(org_principal().org_slug, request.run_id)
        return pipeline_service_pb2.CancelPipelineRunResponse(run=run_message(run))

    async def WatchPipelineRun(
        self, request: pipeline_service_pb2.WatchPipelineRunRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pipeline_service_pb2.WatchPipelineRunResponse]:
        async for event, run in self._runs.watch(org_principal().org_slug, request.run_id):
            yield pipeline_service_pb2.WatchPipelineRunResponse(event=event_message(event, run))
