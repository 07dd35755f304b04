"""Runs pipelines for orgs: accept (validation, then one admission transaction in the state store:
idempotency, duplicates, rate and quotas), execute (the step runner under the pipeline's timeout), observe
(get, list, watch) and cancel.

Each run is one asyncio task of the replica that accepted it. Its run-level transitions are written to
the state store before they show here; step events are written with the next transition or by the
background flush (every `flush_seconds`). The same loop renews this replica's lease, picks up
cancellations asked for on other replicas, and closes the runs of replicas whose lease expired
(INTERRUPTED). Runs of other replicas, and finished runs, are read from the state store.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson

from processors.base import RunIdentity, StepContext
from server import metrics
from server.credentials.vault import CredentialVault
from server.engine import templates
from server.engine.run import ACTIVE, TERMINAL, Event, Run, StepView
from server.engine.runner import TERMINAL as STEP_TERMINAL
from server.engine.runner import PreparedStep, StepEvent, StepRunner
from server.errors import ConflictError, FieldViolation, InvalidInputError, NotFoundError, ThrottledError
from server.http.client import OutboundHttp
from server.ids import new_id
from server.logs import log_fields
from server.orgs import OrgContext
from server.pipelines.catalog import PipelineCatalog, PipelineConfig
from server.pipelines.spec import StepSpec
from server.state.store import INTERRUPTED_ERROR, Limits, StateStore
from server.warehouse.bigquery import BigQueryWarehouse

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunRequest:
    """What a caller asks to run."""

    provider: str
    domain: str
    pipeline: str
    date: str = ""
    start_date: str = ""
    end_date: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)
    force_refresh: bool = False
    request_id: str = ""
    trigger: str = "API"


class _Lazy(Mapping[str, Any]):
    """A mapping built on first use: most steps have no template, and building the variables is not free."""

    def __init__(self, build: Callable[[], Mapping[str, Any]]) -> None:
        self._build = build
        self._data: Mapping[str, Any] | None = None

    def _get(self) -> Mapping[str, Any]:
        if self._data is None:
            self._data = self._build()
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _next_day(now: datetime) -> datetime:
    return datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)


def _next_month(now: datetime) -> datetime:
    first = date(now.year + (now.month == 12), now.month % 12 + 1, 1)
    return datetime.combine(first, datetime.min.time(), UTC)


def _is_run_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


@dataclass(eq=False)
class _Live:
    """A run executing on this replica: its in-memory view, its unwritten events, what is written."""

    run: Run
    config: PipelineConfig
    pending: list[dict[str, Any]] = field(default_factory=list)
    written: str = "PENDING"  # the run state last written to the store
    fenced: bool = False  # the store refused a write: the run is no longer this replica's
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def unwritten(self) -> bool:
        """Whether the run, still ours, has events or a state not written to the store yet."""
        return not self.fenced and (bool(self.pending) or self.written != self.run.state)


@functools.cache
def _processor_logger(ps_type: str) -> logging.Logger:
    """The logger of a processor (`getLogger` takes the logging module's lock at every call)."""
    return logging.getLogger(f"processors.{ps_type}")


class RunManager:
    """Admits runs, executes this replica's runs, and reads everyone's from the state store."""

    def __init__(
        self,
        *,
        catalog: PipelineCatalog,
        runner: StepRunner,
        store: StateStore,
        warehouse: BigQueryWarehouse,
        meta_dataset: str,
        http: OutboundHttp,
        vault: CredentialVault,
        flush_seconds: float = 0.2,
        poll_seconds: float = 0.5,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_end: Callable[[Run], None] | None = None,
    ) -> None:
        self._catalog = catalog
        self.on_end = on_end  # told about every run of this replica that ended (notifications)
        self._runner = runner
        self._store = store
        self._wh = warehouse
        self._meta = meta_dataset
        self._http = http
        self._vault = vault
        self._flush_seconds = flush_seconds
        self._poll_seconds = poll_seconds
        self._clock = clock
        self._active: dict[str, _Live] = {}
        self._background: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Task[None]] = set()

    async def start(self) -> list[str]:
        """Take this replica's lease, close the runs of dead replicas, start the background loop."""
        await self._store.register(new_id())
        closed = await self._store.sweep()
        if closed:
            log.warning("closed %d interrupted runs", len(closed))
        self._background = asyncio.create_task(self._loop(), name="run-manager")
        return closed

    async def close(self) -> None:
        """Cancel active runs (reason SHUTDOWN), write what is left, give the lease up."""
        for live in list(self._active.values()):
            await self._cancel(live, "SHUTDOWN")
        tasks = [t for t in (live.run.task for live in self._active.values()) if t is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
        await self._flush()
        if not self._active:  # a run left unwritten keeps the lease until it expires, then it is closed
            await self._store.retire()

    # -- the background loop: flush, lease, cancellations, dead replicas ---------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_renew = loop.time() + self._store.lease_seconds / 3
        while True:
            await asyncio.sleep(self._flush_seconds)
            try:
                await self._flush()
                if loop.time() >= next_renew:
                    next_renew = loop.time() + self._store.lease_seconds / 3
                    await self._renew()
            except Exception as exc:  # the store is unreachable: try again on the next tick
                log.warning("state store unreachable: %s", type(exc).__name__)

    async def _flush(self) -> None:
        lives = list(self._active.values())
        # Together, so that the runs' writes go out as one group-committed statement.
        await asyncio.gather(*(self._save(live) for live in lives if live.unwritten))
        for live in lives:
            if live.run.terminal and (live.fenced or live.written == live.run.state):
                self._active.pop(live.run.run_id, None)

    async def _renew(self) -> None:
        cancels = await self._store.renew()
        if cancels is None:
            # Our lease expired and another replica closed our runs: they are no longer ours to run.
            log.error("lease lost; stopping this replica's %d runs and taking a new lease", len(self._active))
            for live in list(self._active.values()):
                self._fence(live)
            await self._store.register(new_id())
            return
        for run_id in cancels:
            asked = self._active.get(run_id)
            if asked is not None:
                await self._cancel(asked, "CANCELLED_BY_USER")
        closed = await self._store.sweep()
        if closed:
            log.warning("closed %d interrupted runs", len(closed))

    def _fence(self, live: _Live) -> None:
        live.fenced = True
        live.pending.clear()
        if live.run.task is not None and not live.run.terminal:
            live.run.reason = "INTERRUPTED"
            live.run.task.cancel()

    async def _save(self, live: _Live) -> None:
        """Write the run as it is and its pending events (the background flush)."""
        async with live.lock:
            if live.unwritten:  # (again: a transition may have written it meanwhile)
                await self._write(live, live.run)

    async def _write(self, live: _Live, run: Run) -> bool:
        """Write `run` (the live run or its next state) with the pending events; the caller holds the
        run's lock. False if not written: kept for the next flush, or no longer ours (fenced)."""
        events, live.pending = live.pending, []
        try:
            ok = await self._store.write(run, events)
        except Exception as exc:  # kept for the next flush
            live.pending[:0] = events
            log.warning("run write failed, will retry: %s", type(exc).__name__)
            return False
        if not ok:
            log.warning("run %s was closed by another replica", run.run_id)
            self._fence(live)
            return False
        live.written = run.state
        return True

    # -- accept ------------------------------------------------------------------------------------

    async def submit(self, org: OrgContext, request: RunRequest, triggered_by: str) -> Run:
        """Admit a run and start it; return it RUNNING (or the earlier run of the same request id).

        The run's row is committed before this returns: a crash afterwards never loses it."""
        config = self._catalog.get(request.provider, request.domain, request.pipeline)
        parameters = self._parameters(config, request)
        identity = orjson.dumps([org.org_slug, config.key, parameters], option=orjson.OPT_SORT_KEYS)
        run = Run(
            run_id=new_id(),
            org_slug=org.org_slug,
            pipeline_key=config.key,
            pipeline_id=config.spec.pipeline_id,
            trigger=request.trigger,
            triggered_by=triggered_by,
            parameters=parameters,
            request_id=request.request_id,
            create_time=self._clock(),
            dedupe_key=hashlib.sha256(identity).hexdigest(),
            steps={s.step_id: StepView(s.step_id, s.ps_type) for s in config.spec.steps},
        )
        # It runs the moment it is admitted (no queue in between), so it is admitted RUNNING: the
        # admission's one statement also writes its RUNNING transition (one write fewer per run).
        run.state, run.start_time = "RUNNING", max(datetime.now(UTC), run.create_time)
        limits = Limits(org.requests_per_minute, org.concurrent_limit, org.daily_limit, org.monthly_limit)
        # An accepted run is started by the admission batch itself, as it learns the outcome, so a caller
        # that goes away (deadline, disconnect) while the admission commits never leaves an admitted run
        # that nobody executes (it would hold a slot while this replica lives).
        admission = await self._store.admit(run, limits, on_accept=lambda: self._start(org, run, config))
        if admission.outcome == "REPLAY":
            return await self.get(org.org_slug, admission.run_id)
        if admission.outcome == "ACTIVE":
            raise ConflictError(
                f"a run of {config.key} with these parameters is active: {admission.run_id}",
                reason="RUN_ALREADY_ACTIVE",
                metadata={"active_run_id": admission.run_id},
            )
        if admission.outcome != "ACCEPTED":
            error = self._refusal(admission.outcome, admission.wait, org, run.create_time)
            metrics.labelled(metrics.QUOTA_REJECTIONS, error.reason).inc()
            raise error
        return run

    def _start(self, org: OrgContext, run: Run, config: PipelineConfig) -> None:
        """Start a run whose admission committed."""
        live = _Live(run, config, written=run.state)
        self._active[run.run_id] = live
        run.notify(Event(run.create_time, "PENDING"))
        if run.start_time is not None:
            run.notify(Event(run.start_time, run.state))
        metrics.RUNS.started(config.key)
        # A context of its own: it is started by the admission batch, whose context is some caller's.
        run.task = asyncio.create_task(
            self._execute(live, org), name=f"run-{run.run_id}", context=contextvars.Context()
        )
        run.task.add_done_callback(lambda _: self._cancelled_before_start(live))

    @staticmethod
    def _refusal(outcome: str, wait: float, org: OrgContext, now: datetime) -> ThrottledError:
        if outcome == "RATE_LIMITED":
            rate = max(org.requests_per_minute, 1)
            return ThrottledError(
                f"more than {rate} RunPipeline calls per minute",
                reason="RATE_LIMITED",
                retry_after=wait,
                metadata={"limit": str(rate)},
            )
        if outcome == "CONCURRENT_LIMIT_EXCEEDED":
            limit, message, retry = org.concurrent_limit, "runs already active", 5.0
        elif outcome == "DAILY_LIMIT_EXCEEDED":
            limit, message = org.daily_limit, "daily limit of runs reached"
            retry = (_next_day(now) - now).total_seconds()
        else:
            limit, message = org.monthly_limit, "monthly limit of runs reached"
            retry = (_next_month(now) - now).total_seconds()
        return ThrottledError(
            f"{message} ({limit})", reason=outcome, retry_after=retry, metadata={"limit": str(limit)}
        )

    def _cancelled_before_start(self, live: _Live) -> None:
        # A task cancelled before its first step never enters `_execute`, so its `finally` never runs.
        if not live.run.terminal and not live.fenced:
            task = asyncio.get_running_loop().create_task(
                self._end(live, "CANCELLED", live.run.reason or "CANCELLED", "")
            )
            self._finishing.add(task)
            task.add_done_callback(self._finishing.discard)

    def parameters(self, config: PipelineConfig, request: RunRequest) -> dict[str, str]:
        """The parameters a run of `request` would get; InvalidInputError naming the fields if bad (what
        the scheduler checks when an org sets a schedule's parameters)."""
        return self._parameters(config, request)

    @staticmethod
    def _parameters(config: PipelineConfig, request: RunRequest) -> dict[str, str]:
        """The run's parameters: the config's defaults, the request's parameters, then the run window.

        The window can be given as the request's fields or as parameters of the same names; either way
        it goes through the one validation of `templates.parse_run_dates` with the pipeline's limits.
        """
        bad = [
            FieldViolation(f"parameters[{k[:64]}]", "keys are lowercase snake_case")
            for k in request.parameters
            if not k.isidentifier() or k.lower() != k
        ]
        fields = {"date": request.date, "start_date": request.start_date, "end_date": request.end_date}
        window = dict(fields)
        for name, value in fields.items():
            given = request.parameters.get(name, "")
            if given and value and given != value:
                bad.append(FieldViolation(f"parameters[{name}]", f"differs from the request's {name}"))
            window[name] = value or given
        if bad:
            raise InvalidInputError("invalid parameters", bad)
        spec = config.spec
        params = {
            k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
            for k, v in spec.parameters.items()
        }
        params.update((k, v) for k, v in request.parameters.items() if k not in fields)
        params.update(
            templates.parse_run_dates(
                **window,
                today=datetime.now(UTC).date(),
                max_days=spec.max_window_days,
                future_days=spec.max_future_days,
            )
        )
        if request.force_refresh:
            params["force_refresh"] = "true"
        return params

    # -- execute -----------------------------------------------------------------------------------

    def _event(
        self,
        run: Run,
        from_state: str,
        to_state: str,
        *,
        step: StepView | None = None,
        attempt: int = 0,
        reason: str = "",
        error: str = "",
        at: datetime | None = None,
    ) -> dict[str, Any]:
        return {
            "kind": "STEP_TRANSITION" if step else "RUN_TRANSITION",
            "step_id": step.step_id if step else None,
            "ps_type": step.ps_type if step else None,
            "attempt": attempt or None,
            "from_state": from_state or None,
            "to_state": to_state,
            "reason": reason or None,
            "error": error or None,
            "at": at or datetime.now(UTC),
        }

    async def _transition(self, live: _Live, state: str, *, reason: str = "", error: str = "") -> None:
        """Write a run-level transition to the store, then show it here (Get, Watch). Nothing happens
        to a run that has ended; a run that is no longer ours (fenced) only changes here."""
        run = live.run
        async with live.lock:
            if run.terminal:
                return
            now = datetime.now(UTC)
            changes: dict[str, Any] = {
                "state": state,
                "reason": reason or run.reason,
                "error": error or run.error,
            }
            if state == "RUNNING":
                changes["start_time"] = now
            if state in TERMINAL:
                changes["end_time"] = now
            if not live.fenced:
                live.pending.append(self._event(run, run.state, state, reason=reason, error=error, at=now))
                await self._write(live, replace(run, **changes))
            if live.fenced and state in TERMINAL:  # as the replica that closed it wrote it
                changes.update(state="FAILED", reason="INTERRUPTED", error=INTERRUPTED_ERROR)
            for name, value in changes.items():
                setattr(run, name, value)
            run.notify(Event(now, run.state, error=run.error))

    async def _execute(self, live: _Live, org: OrgContext) -> None:
        run, config = live.run, live.config
        log_fields.set({"org_slug": run.org_slug, "run_id": run.run_id})
        state, reason, error = "FAILED", "INTERNAL", ""
        try:
            async with asyncio.timeout(config.spec.timeout):
                outcome = await self._runner.run(
                    config.spec,
                    prepare=lambda step, steps: self._prepare(run, org, step, steps),
                    make_context=lambda step, attempt, steps: self._context(run, org, step, attempt, steps),
                    on_event=lambda event: self._on_step(live, event),
                )
            if outcome.state == "COMPLETED":
                state, reason = "COMPLETED", ""
            else:
                state, reason, error = "FAILED", "STEP_FAILED", outcome.error
        except TimeoutError:
            state, reason = "TIMEOUT", "PIPELINE_TIMEOUT"
            error = f"the pipeline timeout of {config.spec.timeout:g}s ran out"
        except asyncio.CancelledError:
            state, reason = "CANCELLED", run.reason or "CANCELLED"
        except Exception:  # the run ends FAILED; the details stay in our log, not in the run
            log.exception("run crashed")
            error = "internal error (details in the server log, by run id)"
        finally:
            await self._end(live, state, reason, error)

    async def _end(self, live: _Live, state: str, reason: str, error: str) -> None:
        run = live.run
        if run.terminal:
            return
        for step in run.steps.values():
            if step.state not in STEP_TERMINAL:
                step.state = "NOT_RUN"
        await self._transition(live, state, reason=reason, error=error)
        if live.fenced or live.written == run.state:
            self._active.pop(run.run_id, None)  # else the background flush retries the write
        metrics.RUNS.finished(live.config.key, run.state)
        if self.on_end is not None and not live.fenced:
            try:
                self.on_end(run)
            except Exception:  # whoever listens never affects the run
                log.exception("run end listener failed")

    def _variables(self, run: Run, org: OrgContext, steps: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        return templates.template_variables(
            parameters=run.parameters,
            org_slug=run.org_slug,
            run_id=run.run_id,
            dataset=org.dataset,
            pipeline_id=run.pipeline_id,
            steps=steps,
            now=datetime.now(UTC),
        )

    def _prepare(
        self, run: Run, org: OrgContext, step: StepSpec, steps: Mapping[str, Mapping[str, Any]]
    ) -> PreparedStep:
        variables = _Lazy(lambda: self._variables(run, org, steps))  # built only if a template is rendered
        base = f"steps.{step.step_id}"
        return PreparedStep(
            config=templates.render_value(step.config, variables, f"{base}.config"),
            enabled=templates.render_bool(step.enabled, variables, f"{base}.enabled"),
        )

    def _context(
        self, run: Run, org: OrgContext, step: StepSpec, attempt: int, steps: Mapping[str, Mapping[str, Any]]
    ) -> StepContext:
        identity = RunIdentity(run.run_id, run.org_slug, org.dataset, run.pipeline_id, run.pipeline_key)
        logger = logging.LoggerAdapter(
            _processor_logger(step.ps_type),
            {"fields": {"run_id": run.run_id, "step_id": step.step_id}},
        )
        return StepContext(
            run=identity,
            step_id=step.step_id,
            attempt=attempt,
            parameters=dict(run.parameters),
            steps=steps,
            warehouse=self._wh,
            meta_dataset=self._meta,
            log=logger,
            http=self._http.bind(run.org_slug, run.run_id, step.step_id),
            secrets=self._vault.for_org(run.org_slug),
        )

    def _on_step(self, live: _Live, event: StepEvent) -> None:
        run = live.run
        step = run.steps[event.step_id]
        previous = step.state
        step.state = event.state
        step.attempts = max(step.attempts, event.attempt)
        if event.state == "RUNNING":
            step.started_at = step.started_at or event.at
        else:
            step.error, step.error_reason = event.error, event.error_reason
            step.rows_written += event.rows_written if event.state == "SUCCEEDED" else 0
            if event.attempt_started_at is not None:  # the event ends an attempt: its ledger row
                # A retried attempt ended in a transient failure: the attempt row says FAILED.
                ended = event.at
                live.pending.append(
                    {
                        "kind": "STEP_ATTEMPT",
                        "step_id": step.step_id,
                        "ps_type": step.ps_type,
                        "attempt": event.attempt,
                        "to_state": "FAILED" if event.state == "RETRYING" else event.state,
                        "error": event.error or None,
                        "error_reason": event.error_reason or None,
                        "started_at": event.attempt_started_at,
                        "ended_at": ended,
                        "duration_ms": int((ended - event.attempt_started_at).total_seconds() * 1000),
                        "rows_written": event.rows_written,
                        "at": datetime.now(UTC),
                    }
                )
        if event.state in STEP_TERMINAL:
            # A terminal event's duration spans the step from its first RUNNING, over all attempts.
            step.duration_ms = event.duration_ms
            step.ended_at = event.at
            metrics.RUNS.step(step.ps_type, event.state, step.duration_ms / 1000)
        live.pending.append(
            self._event(run, previous, event.state, step=step, attempt=event.attempt, error=event.error)
        )
        run.notify(Event(event.at, run.state, step.step_id, event.state, event.attempt, event.error))

    # -- observe and cancel ------------------------------------------------------------------------

    async def get(self, org_slug: str, run_id: str) -> Run:
        """A run of the org; NotFoundError for unknown runs and for other orgs' runs alike."""
        live = self._active.get(run_id)
        run = live.run if live is not None else None
        if run is None and _is_run_id(run_id):
            run = await self._store.get_run(org_slug, run_id)
        if run is None or run.org_slug != org_slug:
            raise NotFoundError(
                f"run {run_id!r} not found", reason="RUN_NOT_FOUND", metadata={"run_id": run_id}
            )
        return run

    async def list(
        self, org_slug: str, *, pipeline_key: str, state: str, before: tuple[datetime, str] | None, limit: int
    ) -> list[Run]:
        """Runs of the org, newest first, before the cursor (from the state store)."""
        return await self._store.list_runs(
            org_slug, pipeline_key=pipeline_key, state=state, before=before, limit=limit
        )

    async def _cancel(self, live: _Live, reason: str) -> None:
        run = live.run
        if run.state in ACTIVE and run.state != "CANCELLING" and run.task is not None and not live.fenced:
            await self._transition(live, "CANCELLING", reason=reason)
            run.task.cancel()

    async def cancel(self, org_slug: str, run_id: str) -> Run:
        """Request cancellation of an active run; returns at once (the run ends CANCELLED promptly). A
        run of another replica is cancelled by it when it next renews its lease."""
        run = await self.get(org_slug, run_id)
        live = self._active.get(run_id)
        if live is not None:
            await self._cancel(live, "CANCELLED_BY_USER")
        elif not run.terminal and await self._store.request_cancel(org_slug, run_id):
            run = await self.get(org_slug, run_id)
        return run

    async def wait(self, run: Run, seconds: float) -> Run:
        """Wait until the run ends or `seconds` pass; return it either way."""
        if run.task is not None and not run.terminal:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(run.task), seconds)
            return run
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not run.terminal and loop.time() < deadline:
            await asyncio.sleep(min(self._poll_seconds, max(0.0, deadline - loop.time())))
            run = await self.get(run.org_slug, run.run_id)
        return run

    async def watch(self, org_slug: str, run_id: str) -> AsyncIterator[tuple[Event, Run]]:
        """Every event of the run (the past ones first) until it ends: from memory for a run of this
        replica, else from the state store's events (polled while the run is active elsewhere)."""
        run = await self.get(org_slug, run_id)
        if run.task is None:
            async for item in self._watch_stored(run):
                yield item
            return
        sent = 0
        while True:
            changed = run.next_change()
            while sent < len(run.events):
                yield run.events[sent], run
                sent += 1
            if run.terminal:
                return
            await changed.wait()

    async def _watch_stored(self, run: Run) -> AsyncIterator[tuple[Event, Run]]:
        last, state = 0, "PENDING"
        while True:
            rows = await self._store.events(run.run_id, last)
            if any(r["kind"] == "RUN_TRANSITION" and r["to_state"] in TERMINAL for r in rows):
                run = await self.get(run.org_slug, run.run_id)  # the final event carries the final run
            for row in rows:
                last = row["event_id"]
                if row["kind"] == "RUN_TRANSITION":
                    state = row["to_state"]
                    yield Event(row["at"], state, error=row["error"] or ""), run
                elif row["kind"] == "STEP_TRANSITION":
                    step = Event(row["at"], state, row["step_id"], row["to_state"], row["attempt"] or 0)
                    yield replace(step, error=row["error"] or ""), run
            if state in TERMINAL:
                return
            await asyncio.sleep(self._poll_seconds)
