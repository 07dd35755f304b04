"""The scheduler: which pipelines each org runs when (effective schedules), the tick that enqueues the
due times, backfills, and the worker that turns queued jobs into runs under the failure policy.

- **Effective schedule.** A pipeline's YAML `schedule` applies to every active org that has what it
  needs (`requires_credential`), unless the org overrides it (its own cron, timezone, parameters) or
  disables it; deleting the override goes back to the default.
- **Exactly once.** The tick enqueues one job per (org, pipeline, scheduled instant) with a unique key
  in PostgreSQL, so ticks of several replicas and a trigger delivered twice insert it once; a job is
  claimed once (advisory lock + caps), and its run's request id is the job and attempt, so even a
  repeated start of one attempt is one run (admission replays it).
- **After downtime** only the latest missed instant of each schedule runs (`catch_up`, per pipeline;
  with `catch_up: false` an instant missed by more than two minutes is skipped).
- **Failure policy.** A transient failure (the replica died, the pipeline timed out, a step failed with
  a transient reason) is retried with exponential backoff up to the pipeline's `max_attempts`; a
  terminal one (a rejected credential, a bad config, the warehouse refusing) is not. A run refused by a
  quota, a rate or a concurrency cap is deferred (the attempt is given back), never dropped. Jobs run
  within a global cap and a per-org cap over every replica (and a backfill's own `max_concurrency`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from server import metrics
from server.engine.manager import RunManager, RunRequest
from server.engine.run import Run
from server.errors import ConflictError, NotFoundError, ServiceError, ThrottledError
from server.ids import new_id
from server.notify.alert import Alert
from server.orgs import OrgContext
from server.pipelines.catalog import PipelineCatalog, PipelineConfig
from server.scheduler import cron
from server.state.scheduling import Backfill, Caps, Job, NewJob, Override, SchedulerStore
from server.state.store import StateStore

log = logging.getLogger(__name__)

TRANSIENT_RUN_REASONS = frozenset({"INTERRUPTED", "PIPELINE_TIMEOUT", "INTERNAL"})
TRANSIENT_STEP_REASONS = frozenset(
    {"WAREHOUSE_UNAVAILABLE", "STEP_TIMEOUT", "PROVIDER_UNAVAILABLE", "PROVIDER_RATE_LIMITED", "TRANSIENT"}
)
QUOTA_REASONS = frozenset({"DAILY_LIMIT_EXCEEDED", "MONTHLY_LIMIT_EXCEEDED"})
MISSED_GRACE = timedelta(minutes=2)

OrgSource = Callable[[datetime], Awaitable[list[OrgContext]]]
CredentialHolders = Callable[[str], Awaitable[AbstractSet[str]]]


Notify = Callable[[Alert], None]


@dataclass(frozen=True, slots=True)
class Effective:
    """A pipeline's schedule for one org and where it comes from (DEFAULT, OVERRIDE)."""

    pipeline_key: str
    cron: str
    timezone: str
    enabled: bool
    parameters: dict[str, str]
    source: str
    catch_up: bool
    max_attempts: int


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """How the scheduler ticks and runs jobs."""

    tick_seconds: float = 60.0  # 0: no in-process ticker (the trigger RPC only)
    poll_seconds: float = 1.0
    caps: Caps = field(default_factory=lambda: Caps(total=50, per_org=3))
    retry_base_seconds: float = 60.0
    retry_max_seconds: float = 3600.0
    max_catch_up: timedelta = timedelta(days=1)
    org_cache_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class TickResult:
    """What one tick did."""

    due: int
    enqueued: int
    seconds: float


async def no_credentials(provider: str) -> AbstractSet[str]:
    """No org holds any credential (a scheduler built without the credential store)."""
    return frozenset()


class Scheduler:
    """Effective schedules, the tick, backfills and the job worker of one replica."""

    def __init__(
        self,
        *,
        catalog: PipelineCatalog,
        runs: RunManager,
        store: StateStore,
        orgs: OrgSource,
        settings: SchedulerSettings = SchedulerSettings(),
        credentials: CredentialHolders = no_credentials,
        notify: Notify | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._catalog = catalog
        self._runs = runs
        self._store = store
        self._jobs = store.scheduling
        self._orgs = orgs
        self._settings = settings
        self._credentials = credentials
        self._notify = notify
        self._clock = clock
        self._org_cache: tuple[float, dict[str, OrgContext]] = (-1e18, {})
        self._holders_cache: tuple[float, dict[str, AbstractSet[str]]] = (-1e18, {})
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def jobs(self) -> SchedulerStore:
        """The scheduler's state (overrides, jobs, backfills)."""
        return self._jobs

    @property
    def settings(self) -> SchedulerSettings:
        """The scheduler's settings."""
        return self._settings

    # -- effective schedules -------------------------------------------------------------------------

    def scheduled_configs(self) -> list[PipelineConfig]:
        """Every pipeline config (each can be scheduled by an override; some have a default)."""
        return self._catalog.all()

    def check_parameters(self, config: PipelineConfig, parameters: dict[str, str]) -> None:
        """Refuse (InvalidInputError, fields named) parameters a scheduled run could not start with."""
        self._runs.parameters(
            config,
            RunRequest(
                config.provider,
                config.domain,
                config.pipeline,
                date=parameters.get("date", ""),
                parameters={k: v for k, v in parameters.items() if k != "date"},
            ),
        )

    @staticmethod
    def effective(config: PipelineConfig, override: Override | None, eligible: bool) -> Effective | None:
        """The org's schedule of a pipeline: its override, else the config's default if the org has
        what the pipeline needs, else None."""
        default = config.spec.schedule
        catch_up = default.catch_up if default else True
        max_attempts = default.max_attempts if default else 3
        if override is not None:
            return Effective(
                config.key,
                override.cron,
                override.timezone,
                override.enabled,
                dict(override.parameters),
                "OVERRIDE",
                catch_up,
                max_attempts,
            )
        if default is None or not eligible:
            return None
        return Effective(
            config.key, default.cron, default.timezone, default.enabled, {}, "DEFAULT", catch_up, max_attempts
        )

    async def _holders(self) -> dict[str, AbstractSet[str]]:
        """Per provider a pipeline's default schedule needs, the orgs holding its credential (cached like
        the org list: a credential added shows within `org_cache_seconds`)."""
        loop = asyncio.get_running_loop()
        at, cached = self._holders_cache
        if loop.time() - at > self._settings.org_cache_seconds:
            needed = {
                c.spec.schedule.requires_credential
                for c in self._catalog.all()
                if c.spec.schedule and c.spec.schedule.requires_credential
            }
            cached = {provider: await self._credentials(provider) for provider in needed}
            self._holders_cache = (loop.time(), cached)
        return cached

    @staticmethod
    def _eligible(org_slug: str, config: PipelineConfig, holders: dict[str, AbstractSet[str]]) -> bool:
        schedule = config.spec.schedule
        return (
            schedule is None
            or not schedule.requires_credential
            or org_slug in holders.get(schedule.requires_credential, set())
        )

    async def schedules(self, org_slug: str) -> list[tuple[PipelineConfig, Effective | None]]:
        """Every pipeline the org can run, with its effective schedule (None: not scheduled)."""
        overrides = {o.pipeline_key: o for o in await self._jobs.overrides(org_slug)}
        holders = await self._holders()
        return [
            (c, self.effective(c, overrides.get(c.key), self._eligible(org_slug, c, holders)))
            for c in self._catalog.all()
        ]

    # -- the tick ------------------------------------------------------------------------------------

    async def _contexts(self, now: datetime, *, refresh: bool = False) -> dict[str, OrgContext]:
        loop = asyncio.get_running_loop()
        at, cached = self._org_cache
        if refresh or loop.time() - at > self._settings.org_cache_seconds:
            cached = {o.org_slug: o for o in await self._orgs(now)}
            self._org_cache = (loop.time(), cached)
        return cached

    async def tick(self, now: datetime | None = None) -> TickResult:
        """Enqueue every effective schedule's latest instant since the previous tick (exactly once over
        replicas and repeated triggers), then wake the worker."""
        started = asyncio.get_running_loop().time()
        now = now or self._clock()
        orgs = await self._contexts(now)
        overrides = {(o.org_slug, o.pipeline_key): o for o in await self._jobs.overrides()}
        holders = await self._holders()
        configs = self._catalog.all()

        def due(after: datetime) -> list[NewJob]:
            after = max(after, now - self._settings.max_catch_up)
            instants: dict[tuple[str, str, bool], datetime | None] = {}
            jobs: list[NewJob] = []
            for org_slug in orgs:
                for config in configs:
                    eff = self.effective(
                        config,
                        overrides.get((org_slug, config.key)),
                        self._eligible(org_slug, config, holders),
                    )
                    if eff is None or not eff.enabled:
                        continue
                    key = (eff.cron, eff.timezone, eff.catch_up)
                    if key not in instants:
                        t = cron.latest(eff.cron, cron.timezone(eff.timezone), after, now)
                        instants[key] = None if t and not eff.catch_up and t < now - MISSED_GRACE else t
                    t = instants[key]
                    if t is not None:
                        jobs.append(
                            NewJob(
                                f"S|{org_slug}|{config.key}|{t.isoformat()}",
                                "SCHEDULE",
                                org_slug,
                                config.key,
                                t,
                                eff.parameters,
                                eff.max_attempts,
                            )
                        )
            return jobs

        lookback = timedelta(seconds=max(self._settings.tick_seconds, 60.0))
        inserted, considered = await self._jobs.tick(now, lookback, due)
        metrics.SCHEDULER_ENQUEUED.inc(inserted)
        if inserted:
            self._wake.set()
        return TickResult(considered, inserted, asyncio.get_running_loop().time() - started)

    # -- backfills -----------------------------------------------------------------------------------

    async def backfill(
        self,
        org_slug: str,
        config: PipelineConfig,
        start: date,
        end: date,
        max_concurrency: int,
        created_by: str,
    ) -> tuple[Backfill, int]:
        """One job per day of [start, end] (date = the day), at most `max_concurrency` running at once;
        the same backfill asked again returns the first one and starts nothing."""
        now = self._clock()
        backfill_id = new_id()
        days = [start + timedelta(days=i) for i in range((end - start).days + 1)]
        attempts = config.spec.schedule.max_attempts if config.spec.schedule else 3
        jobs = [
            NewJob(
                f"B|{org_slug}|{config.key}|{day.isoformat()}",
                "BACKFILL",
                org_slug,
                config.key,
                datetime.combine(day, datetime.min.time(), UTC),
                {"date": day.isoformat()},
                attempts,
                backfill_id,
            )
            for day in days
        ]
        found, inserted = await self._jobs.create_backfill(
            Backfill(
                backfill_id, org_slug, config.key, start, end, max_concurrency, False, created_by, now, {}
            ),
            jobs,
            now,
        )
        self._wake.set()
        return found, inserted

    async def cancel_backfill(self, org_slug: str, backfill_id: str) -> Backfill:
        """Cancel the queued days and the running days' runs."""
        for run_id in await self._jobs.cancel_backfill(org_slug, backfill_id):
            with contextlib.suppress(NotFoundError):
                await self._runs.cancel(org_slug, run_id)
        found = await self._jobs.backfill(org_slug, backfill_id)
        if found is None:
            raise NotFoundError(f"backfill {backfill_id!r} not found", reason="BACKFILL_NOT_FOUND")
        return found

    # -- the worker ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop: tick (when the ticker is on), reap dead replicas' jobs, claim and run jobs."""
        self._loop_task = asyncio.create_task(self._loop(), name="scheduler")

    def stop_claiming(self) -> None:
        """Stop the loop (jobs already running go on)."""
        if self._loop_task is not None:
            self._loop_task.cancel()

    async def close(self) -> None:
        """Stop the loop and wait (bounded) for this replica's jobs to be written back."""
        self.stop_claiming()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time() if self._settings.tick_seconds else float("inf")
        next_reap = loop.time()
        while True:
            try:
                if loop.time() >= next_tick:
                    next_tick = loop.time() + self._settings.tick_seconds
                    await self.tick()
                if loop.time() >= next_reap:
                    next_reap = loop.time() + self._store.lease_seconds / 3
                    if await self._jobs.reap(timedelta(seconds=self._settings.retry_base_seconds)):
                        log.warning("requeued jobs of replicas without a lease")
                await self.dispatch()
            except Exception as exc:  # the store or the warehouse is unreachable: next time
                log.warning("scheduler loop: %s", type(exc).__name__)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.poll_seconds)

    async def dispatch(self) -> list[Job]:
        """Claim due jobs within the caps and start each as a task; the claimed jobs."""
        room = self._settings.caps.total - len(self._tasks)
        if room <= 0 or not self._store.replica_id:
            return []
        jobs = await self._jobs.claim(self._store.replica_id, self._settings.caps, room)
        for job in jobs:
            task = asyncio.create_task(self._run_job(job), name=f"job-{job.job_id}")
            self._tasks.add(task)
            task.add_done_callback(self._job_done)
        return jobs

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()  # a slot is free

    async def _finish(self, job: Job, state: str, *, reason: str = "", error: str = "") -> str | None:
        metrics.labelled(metrics.SCHEDULER_JOBS, state).inc()
        return await self._jobs.finish(job, state, reason=reason, error=error)

    async def _requeue(
        self, job: Job, run_after: datetime, *, reason: str, error: str = "", deferred: bool = False
    ) -> bool:
        metrics.labelled(metrics.SCHEDULER_JOBS, "DEFERRED" if deferred else "RETRY").inc()
        return await self._jobs.requeue(job, run_after, reason=reason, error=error, deferred=deferred)

    def _backoff(self, attempt: int) -> timedelta:
        s = self._settings
        return timedelta(seconds=min(s.retry_max_seconds, s.retry_base_seconds * 2 ** max(attempt - 1, 0)))

    def _alert(self, event: str, job: Job, run: Run | None, reason: str, error: str) -> None:
        if self._notify is None:
            return
        try:
            self._notify(
                Alert(
                    event,
                    job.org_slug,
                    job.pipeline_key,
                    run.run_id if run else job.run_id,
                    run.state if run else "DEFERRED",
                    reason,
                    error,
                    job.attempts,
                )
            )
        except Exception:  # telling someone never affects the run
            log.exception("notification hand-off failed")

    async def _run_job(self, job: Job) -> None:
        try:
            await self._execute(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # kept for a retry
            log.exception("job %s failed unexpectedly", job.job_id)
            await self._requeue(
                job, self._clock() + self._backoff(job.attempts), reason="INTERNAL", error=type(exc).__name__
            )

    async def _execute(self, job: Job) -> None:
        orgs = await self._contexts(self._clock())
        org = orgs.get(job.org_slug) or (await self._contexts(self._clock(), refresh=True)).get(job.org_slug)
        if org is None:
            await self._finish(job, "FAILED", reason="ORG_INACTIVE", error="the org is not active")
            return
        provider, domain, pipeline = job.pipeline_key.split("/")
        parameters = dict(job.parameters)
        request = RunRequest(
            provider,
            domain,
            pipeline,
            date=parameters.pop("date", ""),
            parameters=parameters,
            request_id=f"job-{job.job_id}-{job.attempts}",
            trigger="SCHEDULER",
        )
        by = f"backfill:{job.backfill_id}" if job.backfill_id else "scheduler"
        try:
            run = await self._runs.submit(org, request, by)
        except ThrottledError as exc:
            retry = timedelta(seconds=min(max(exc.retry_after, 1.0), self._settings.retry_max_seconds))
            await self._requeue(job, self._clock() + retry, reason=exc.reason, deferred=True)
            if exc.reason in QUOTA_REASONS:
                self._alert("QUOTA_EXCEEDED", job, None, exc.reason, exc.message)
            return
        except ConflictError as exc:  # a run of the same pipeline and parameters is active
            await self._requeue(job, self._clock() + timedelta(seconds=30), reason=exc.reason, deferred=True)
            return
        except ServiceError as exc:  # the config or the parameters are wrong: retrying will not help
            await self._finish(job, "FAILED", reason="CONFIG_INVALID", error=exc.message)
            self._alert("RUN_FAILED", job, None, "CONFIG_INVALID", exc.message)
            return
        if not await self._jobs.started(job, run.run_id):  # cancelled while it was being started
            run = await self._runs.cancel(org.org_slug, run.run_id)
        while not run.terminal:
            run = await self._runs.wait(run, 60.0)
        await self._settle(job, run)

    async def _settle(self, job: Job, run: Run) -> None:
        if run.state == "COMPLETED":
            previous = await self._finish(job, "SUCCEEDED")
            if previous == "FAILED":
                self._alert("RUN_RECOVERED", job, run, "", "")
            return
        if run.state == "CANCELLED":
            if run.reason == "SHUTDOWN":  # this replica stopped: another one takes it
                await self._requeue(job, self._clock(), reason="SHUTDOWN", deferred=True)
            else:
                await self._finish(job, "CANCELLED", reason=run.reason)
            return
        step_reasons = {s.error_reason for s in run.steps.values() if s.state in ("FAILED", "TIMEOUT")}
        transient = run.reason in TRANSIENT_RUN_REASONS or bool(step_reasons & TRANSIENT_STEP_REASONS)
        reason = next(iter(sorted(step_reasons - {""})), "") or run.reason
        if transient and job.attempts < job.max_attempts:
            await self._requeue(
                job, self._clock() + self._backoff(job.attempts), reason=reason, error=run.error
            )
            return
        if await self._finish(job, "FAILED", reason=reason, error=run.error) is not None:
            event = "RUN_TIMED_OUT" if run.state == "TIMEOUT" else "RUN_FAILED"
            self._alert(event, job, run, reason, run.error)


__all__: Sequence[str] = ["Alert", "Effective", "Scheduler", "SchedulerSettings", "TickResult"]
