"""`SchedulerService`: thin servicer over the scheduler (schedules, backfills, the trigger, the status)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from grpc import aio

from cloudact.pipeline.v1 import scheduler_service_pb2 as pb
from cloudact.pipeline.v1 import scheduler_service_pb2_grpc
from server.api.convert import timestamp
from server.api.guard import org_principal, principal_name
from server.errors import FieldViolation, InvalidInputError, NotFoundError
from server.pipelines.catalog import PipelineCatalog, PipelineConfig
from server.scheduler import cron
from server.scheduler.scheduler import Effective, Scheduler
from server.state.scheduling import Backfill, Job, Override

MAX_BACKFILL_DAYS = 366
MAX_BACKFILL_CONCURRENCY = 10
DEFAULT_BACKFILL_CONCURRENCY = 3


def schedule_message(
    config: PipelineConfig, effective: Effective | None, last: Job | None, now: datetime
) -> pb.Schedule:
    """The proto form of a pipeline's effective schedule for one org."""
    e = effective
    following = cron.following(e.cron, cron.timezone(e.timezone), now) if e and e.enabled else None
    return pb.Schedule(
        provider=config.provider,
        domain=config.domain,
        pipeline=config.pipeline,
        cron=e.cron if e else "",
        timezone=e.timezone if e else "",
        enabled=e.enabled if e else False,
        source=e.source if e else "NONE",
        parameters=e.parameters if e else {},
        next_run_time=timestamp(following),
        last_run_time=timestamp(last.scheduled_for if last else None),
        last_run_state=last.state if last else "",
        last_run_id=last.run_id if last else "",
    )


def backfill_message(backfill: Backfill) -> pb.Backfill:
    """The proto form of a backfill and its progress."""
    counts = backfill.counts
    return pb.Backfill(
        backfill_id=backfill.backfill_id,
        pipeline=backfill.pipeline_key,
        start_date=backfill.start_date.isoformat(),
        end_date=backfill.end_date.isoformat(),
        max_concurrency=backfill.max_concurrency,
        total=(backfill.end_date - backfill.start_date).days + 1,
        queued=counts.get("QUEUED", 0),
        running=counts.get("RUNNING", 0),
        succeeded=counts.get("SUCCEEDED", 0),
        failed=counts.get("FAILED", 0),
        cancelled=counts.get("CANCELLED", 0),
        is_cancelled=backfill.cancelled,
        create_time=timestamp(backfill.created_at),
    )


def _day(field: str, value: str, bad: list[FieldViolation]) -> date | None:
    try:
        if len(value) == 10:
            return date.fromisoformat(value)
    except ValueError:
        pass
    bad.append(FieldViolation(field, "a day as YYYY-MM-DD"))
    return None


class SchedulerServicer(scheduler_service_pb2_grpc.SchedulerServiceServicer):
    """Schedules and backfills of an org; the trigger and the status for the root key."""

    def __init__(self, catalog: PipelineCatalog, scheduler: Scheduler) -> None:
        self._catalog = catalog
        self._scheduler = scheduler
        self._jobs = scheduler.jobs

    async def _one(self, org_slug: str, config: PipelineConfig) -> pb.Schedule:
        schedules = dict((c.key, e) for c, e in await self._scheduler.schedules(org_slug))
        last = (await self._jobs.last_jobs(org_slug)).get(config.key)
        return schedule_message(config, schedules.get(config.key), last, datetime.now(UTC))

    async def ListSchedules(
        self, request: pb.ListSchedulesRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListSchedulesResponse:
        now = datetime.now(UTC)
        last = await self._jobs.last_jobs(request.org_slug)
        return pb.ListSchedulesResponse(
            schedules=[
                schedule_message(c, e, last.get(c.key), now)
                for c, e in await self._scheduler.schedules(request.org_slug)
            ]
        )

    async def UpdateSchedule(
        self, request: pb.UpdateScheduleRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.UpdateScheduleResponse:
        config = self._catalog.get(request.provider, request.domain, request.pipeline)
        bad: list[FieldViolation] = []
        expression = ""
        try:
            expression = cron.check_cron(request.cron)
        except ValueError as exc:
            bad.append(FieldViolation("cron", str(exc)))
        zone = request.timezone or "UTC"
        try:
            cron.timezone(zone)
        except ValueError as exc:
            bad.append(FieldViolation("timezone", str(exc)))
        minimum = config.spec.schedule.min_interval_minutes if config.spec.schedule else 60
        if expression and cron.min_interval(expression) < minimum * 60:
            bad.append(FieldViolation("cron", f"runs more often than every {minimum} minutes"))
        if bad:
            raise InvalidInputError("invalid schedule", bad, reason="INVALID_SCHEDULE")
        self._scheduler.check_parameters(config, dict(request.parameters))
        enabled = request.enabled if request.HasField("enabled") else True
        await self._jobs.put_override(
            Override(
                org_principal().org_slug,
                config.key,
                expression,
                zone,
                enabled,
                dict(request.parameters),
                principal_name(),
            )
        )
        return pb.UpdateScheduleResponse(schedule=await self._one(request.org_slug, config))

    async def DeleteSchedule(
        self, request: pb.DeleteScheduleRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.DeleteScheduleResponse:
        config = self._catalog.get(request.provider, request.domain, request.pipeline)
        if not await self._jobs.delete_override(request.org_slug, config.key):
            raise NotFoundError(
                f"no schedule of the org for {config.key}", reason="SCHEDULE_OVERRIDE_NOT_FOUND"
            )
        return pb.DeleteScheduleResponse(schedule=await self._one(request.org_slug, config))

    async def CreateBackfill(
        self, request: pb.CreateBackfillRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.CreateBackfillResponse:
        parts = request.pipeline.split("/")
        if len(parts) != 3:
            raise InvalidInputError(
                "invalid backfill", [FieldViolation("pipeline", "provider/domain/pipeline")]
            )
        config = self._catalog.get(*parts)
        bad: list[FieldViolation] = []
        start = _day("start_date", request.start_date, bad)
        end = _day("end_date", request.end_date, bad)
        today = datetime.now(UTC).date()
        if start and end:
            if start > end:
                bad.append(FieldViolation("end_date", "on or after start_date"))
            elif (end - start).days + 1 > MAX_BACKFILL_DAYS:
                bad.append(FieldViolation("end_date", f"at most {MAX_BACKFILL_DAYS} days after start_date"))
            if end > today + timedelta(days=config.spec.max_future_days):
                bad.append(FieldViolation("end_date", "not after today (UTC)"))
        concurrency = request.max_concurrency or DEFAULT_BACKFILL_CONCURRENCY
        if not 1 <= concurrency <= MAX_BACKFILL_CONCURRENCY:
            bad.append(FieldViolation("max_concurrency", f"1 to {MAX_BACKFILL_CONCURRENCY}"))
        if bad or start is None or end is None:
            raise InvalidInputError("invalid backfill", bad)
        backfill, queued = await self._scheduler.backfill(
            request.org_slug, config, start, end, concurrency, principal_name()
        )
        return pb.CreateBackfillResponse(backfill=backfill_message(backfill), queued_now=queued)

    async def _backfill(self, org_slug: str, backfill_id: str) -> Backfill:
        found = await self._jobs.backfill(org_slug, backfill_id)
        if found is None:
            raise NotFoundError(f"backfill {backfill_id!r} not found", reason="BACKFILL_NOT_FOUND")
        return found

    async def GetBackfill(
        self, request: pb.GetBackfillRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.GetBackfillResponse:
        return pb.GetBackfillResponse(
            backfill=backfill_message(await self._backfill(request.org_slug, request.backfill_id))
        )

    async def CancelBackfill(
        self, request: pb.CancelBackfillRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.CancelBackfillResponse:
        await self._backfill(request.org_slug, request.backfill_id)
        backfill = await self._scheduler.cancel_backfill(request.org_slug, request.backfill_id)
        return pb.CancelBackfillResponse(backfill=backfill_message(backfill))

    async def TriggerScheduler(
        self, request: pb.TriggerSchedulerRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.TriggerSchedulerResponse:
        result = await self._scheduler.tick()
        return pb.TriggerSchedulerResponse(due=result.due, enqueued=result.enqueued, seconds=result.seconds)

    async def GetSchedulerStatus(
        self, request: pb.GetSchedulerStatusRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.GetSchedulerStatusResponse:
        now = datetime.now(UTC)
        counts = await self._jobs.status(datetime.combine(now.date(), datetime.min.time(), UTC))
        return pb.GetSchedulerStatusResponse(
            due=counts["due"],
            queued=counts["queued"],
            running=counts["running"],
            failed_today=counts["failed_today"],
            retries_pending=counts["retries_pending"],
            oldest_lag_seconds=counts["oldest_lag"],
            last_tick_time=timestamp(await self._jobs.last_tick()),
        )
