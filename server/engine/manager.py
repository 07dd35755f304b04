"""Runs pipelines for orgs: accept (validation, idempotency, duplicates, quotas), execute (the step runner
under the pipeline's timeout), observe (get, list, watch) and cancel.

Each run is one asyncio task owned by this manager; cancelling or timing out a run touches that task
and its step tasks only. State changes go to the in-memory run (what Get and Watch read at once) and to
the ledger's buffers (written in batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from processors.base import RunIdentity, StepContext
from server import metrics
from server.credentials.vault import CredentialVault
from server.engine import templates
from server.engine.quotas import Quotas, Reservation
from server.engine.run import ACTIVE, TERMINAL, Event, Run, StepView
from server.engine.runner import TERMINAL as STEP_TERMINAL
from server.engine.runner import PreparedStep, StepEvent, StepRunner
from server.errors import ConflictError, FieldViolation, InvalidInputError, NotFoundError, ThrottledError
from server.http.client import OutboundHttp
from server.ids import new_id
from server.ledger import Ledger
from server.logs import log_fields
from server.orgs import OrgContext
from server.pipelines.catalog import PipelineCatalog, PipelineConfig
from server.pipelines.spec import StepSpec
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


class RunManager:
    """Owns the active runs of this process."""

    def __init__(
        self,
        *,
        catalog: PipelineCatalog,
        runner: StepRunner,
        ledger: Ledger,
        quotas: Quotas,
        warehouse: BigQueryWarehouse,
        meta_dataset: str,
        http: OutboundHttp,
        vault: CredentialVault,
        recent: int = 2000,
    ) -> None:
        self._catalog = catalog
        self._runner = runner
        self._ledger = ledger
        self._quotas = quotas
        self._wh = warehouse
        self._meta = meta_dataset
        self._http = http
        self._vault = vault
        self._active: dict[str, Run] = {}
        self._recent: OrderedDict[str, Run] = OrderedDict()
        self._recent_limit = recent
        self._by_dedupe: dict[str, Run] = {}
        self._by_request: dict[tuple[str, str], Run] = {}

    async def start(self) -> list[str]:
        """Close runs interrupted by a dead process, seed the quota counters, start the ledger flusher."""
        closed = await self._ledger.recover_interrupted()
        now = datetime.now(UTC)
        month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        self._quotas.seed(await self._ledger.counts(month, day), now)
        self._ledger.start()
        if closed:
            log.warning("closed %d interrupted runs", len(closed))
        return closed

    async def close(self) -> None:
        """Cancel active runs (reason SHUTDOWN), then write the ledger's last rows."""
        for run in list(self._active.values()):
            self._cancel_task(run, "SHUTDOWN")
        tasks = [r.task for r in self._active.values() if r.task]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        await self._ledger.close()

    # -- accept ------------------------------------------------------------------------------------

    async def submit(self, org: OrgContext, request: RunRequest, triggered_by: str) -> Run:
        """Accept a run and start it; return it in PENDING (or the earlier run of the same request id)."""
        config = self._catalog.get(request.provider, request.domain, request.pipeline)
        if request.request_id:
            earlier = await self._replay(org.org_slug, request.request_id)
            if earlier is not None:
                return earlier
        parameters = self._parameters(config, request)
        identity = orjson.dumps([org.org_slug, config.key, parameters], option=orjson.OPT_SORT_KEYS)
        dedupe_key = hashlib.sha256(identity).hexdigest()
        active = self._by_dedupe.get(dedupe_key)
        if active is not None:
            raise ConflictError(
                f"a run of {config.key} with these parameters is active: {active.run_id}",
                reason="RUN_ALREADY_ACTIVE",
                metadata={"active_run_id": active.run_id},
            )
        try:
            self._quotas.check_rate(org)
            reservation = self._quotas.reserve(org)
        except ThrottledError as exc:
            metrics.labelled(metrics.QUOTA_REJECTIONS, exc.reason).inc()
            raise
        run = Run(
            run_id=new_id(),
            org_slug=org.org_slug,
            pipeline_key=config.key,
            pipeline_id=config.spec.pipeline_id,
            trigger=request.trigger,
            triggered_by=triggered_by,
            parameters=parameters,
            request_id=request.request_id,
            create_time=datetime.now(UTC),
            dedupe_key=dedupe_key,
            steps={s.step_id: StepView(s.step_id, s.ps_type) for s in config.spec.steps},
        )
        self._active[run.run_id] = run
        self._by_dedupe[run.dedupe_key] = run
        if run.request_id:
            self._by_request[(org.org_slug, run.request_id)] = run
        self._ledger.transition(run, "", "PENDING")
        run.notify(Event(run.create_time, "PENDING"))
        metrics.labelled(metrics.RUNS_STARTED, config.key).inc()
        metrics.RUNS_ACTIVE.inc()
        run.task = asyncio.create_task(self._execute(run, config, org, reservation), name=f"run-{run.run_id}")
        run.task.add_done_callback(lambda _: self._cancelled_before_start(run, config, reservation))
        return run

    def _cancelled_before_start(self, run: Run, config: PipelineConfig, reservation: Reservation) -> None:
        # A task cancelled before its first step never enters `_execute`, so its `finally` never runs.
        if not run.terminal:
            self._set_state(run, "CANCELLED", reason=run.reason or "CANCELLED")
            self._finish(run, config, reservation)

    async def _replay(self, org_slug: str, request_id: str) -> Run | None:
        run = self._by_request.get((org_slug, request_id)) or self._ledger.unwritten_request(
            org_slug, request_id
        )
        if run is not None:
            return run
        stored = await self._ledger.find_request(org_slug, request_id)
        # A concurrent call with the same request id may have been accepted while the ledger was read.
        return stored or self._by_request.get((org_slug, request_id))

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

    def _set_state(self, run: Run, state: str, *, reason: str = "", error: str = "") -> None:
        previous = run.state
        run.state, run.reason, run.error = state, reason or run.reason, error or run.error
        now = datetime.now(UTC)
        if state == "RUNNING":
            run.start_time = now
        if state in TERMINAL:
            run.end_time = now
        self._ledger.transition(run, previous, state, reason=reason, error=error)
        run.notify(Event(now, state, error=error))

    async def _execute(
        self, run: Run, config: PipelineConfig, org: OrgContext, reservation: Reservation
    ) -> None:
        log_fields.set({"org_slug": run.org_slug, "run_id": run.run_id})
        try:
            self._set_state(run, "RUNNING")
            async with asyncio.timeout(config.spec.timeout):
                outcome = await self._runner.run(
                    config.spec,
                    prepare=lambda step, steps: self._prepare(run, org, step, steps),
                    make_context=lambda step, attempt, steps: self._context(run, org, step, attempt, steps),
                    on_event=lambda event: self._on_step(run, event),
                )
            if outcome.state == "COMPLETED":
                self._set_state(run, "COMPLETED")
            else:
                self._set_state(run, "FAILED", reason="STEP_FAILED", error=outcome.error)
        except TimeoutError:
            self._set_state(
                run,
                "TIMEOUT",
                reason="PIPELINE_TIMEOUT",
                error=f"the pipeline timeout of {config.spec.timeout:g}s ran out",
            )
        except asyncio.CancelledError:
            self._set_state(run, "CANCELLED", reason=run.reason or "CANCELLED")
        except Exception:  # the run ends FAILED; the details stay in our log, not in the run
            log.exception("run crashed")
            self._set_state(
                run,
                "FAILED",
                reason="INTERNAL",
                error="internal error (details in the server log, by run id)",
            )
        finally:
            self._finish(run, config, reservation)

    def _finish(self, run: Run, config: PipelineConfig, reservation: Reservation) -> None:
        if self._active.pop(run.run_id, None) is None:
            return
        for step in run.steps.values():
            if step.state not in STEP_TERMINAL:
                step.state = "NOT_RUN"
        self._quotas.release(reservation)
        self._ledger.finished(run)
        self._by_dedupe.pop(run.dedupe_key, None)
        self._recent[run.run_id] = run
        while len(self._recent) > self._recent_limit:
            old = self._recent.popitem(last=False)[1]
            self._by_request.pop((old.org_slug, old.request_id), None)
        metrics.RUNS_ACTIVE.dec()
        metrics.labelled(metrics.RUNS_FINISHED, config.key, run.state).inc()

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
            logging.getLogger(f"processors.{step.ps_type}"),
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

    def _on_step(self, run: Run, event: StepEvent) -> None:
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
                state = "FAILED" if event.state == "RETRYING" else event.state
                self._ledger.attempt(
                    run,
                    step,
                    event.attempt,
                    state,
                    event.attempt_started_at,
                    event.at,
                    event.error,
                    event.error_reason,
                    event.rows_written,
                )
        if event.state in STEP_TERMINAL:
            # A terminal event's duration spans the step from its first RUNNING, over all attempts.
            step.duration_ms = event.duration_ms
            step.ended_at = event.at
            metrics.labelled(metrics.STEP_SECONDS, step.ps_type, event.state).observe(step.duration_ms / 1000)
        self._ledger.transition(
            run, previous, event.state, step=step, attempt=event.attempt, error=event.error
        )
        run.notify(Event(event.at, run.state, step.step_id, event.state, event.attempt, event.error))

    # -- observe and cancel ------------------------------------------------------------------------

    async def get(self, org_slug: str, run_id: str) -> Run:
        """A run of the org; NotFoundError for unknown runs and for other orgs' runs alike."""
        run = self._active.get(run_id) or self._recent.get(run_id) or self._ledger.unwritten(run_id)
        if run is None and len(run_id) == 32 and all(c in "0123456789abcdef" for c in run_id):
            run = await self._ledger.get(org_slug, run_id)
        if run is None or run.org_slug != org_slug:
            raise NotFoundError(
                f"run {run_id!r} not found", reason="RUN_NOT_FOUND", metadata={"run_id": run_id}
            )
        return run

    async def list(
        self, org_slug: str, *, pipeline_key: str, state: str, before: tuple[datetime, str] | None, limit: int
    ) -> list[Run]:
        """Runs of the org, newest first, before the cursor: active and unwritten ones from memory too."""
        # Memory first: a run leaves it only once its row is written, so no run falls between the two.
        live = [
            r
            for r in (*self._active.values(), *self._ledger.unwritten_runs(org_slug))
            if r.org_slug == org_slug
            and (not pipeline_key or r.pipeline_key == pipeline_key)
            and (not state or r.state == state)
            and (before is None or (r.create_time, r.run_id) < before)
        ]
        stored = await self._ledger.finished_runs(
            org_slug, pipeline_key=pipeline_key, state=state, before=before, limit=limit
        )
        merged = {r.run_id: r for r in stored} | {r.run_id: r for r in live}
        ordered = sorted(merged.values(), key=lambda r: (r.create_time, r.run_id), reverse=True)
        return ordered[:limit]

    def _cancel_task(self, run: Run, reason: str) -> None:
        if run.state in ACTIVE and run.state != "CANCELLING" and run.task is not None:
            self._set_state(run, "CANCELLING", reason=reason)
            run.task.cancel()

    async def cancel(self, org_slug: str, run_id: str) -> Run:
        """Request cancellation of an active run; returns at once (the run ends CANCELLED promptly)."""
        run = await self.get(org_slug, run_id)
        self._cancel_task(run, "CANCELLED_BY_USER")
        return run

    async def wait(self, run: Run, seconds: float) -> Run:
        """Wait until the run ends or `seconds` pass; return it either way."""
        if run.task is not None and not run.terminal:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(run.task), seconds)
        return run

    async def watch(self, org_slug: str, run_id: str) -> AsyncIterator[tuple[Event, Run]]:
        """Every event of the run (the past ones first) until it ends."""
        run = await self.get(org_slug, run_id)
        if not run.events:  # a run read back from the ledger: one final event
            yield Event(run.end_time or run.create_time, run.state, error=run.error), run
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
