"""The run ledger in the central dataset: `pipeline_runs` (one row per finished run) and
`pipeline_run_events` (every run and step transition, one STEP_ATTEMPT row per attempt).

Nothing is written row by row: rows are buffered and written by one load job per table per flush
(every `interval` seconds, and on close), shared by every run of the process. BigQuery allows a fixed
number of load jobs per table per day (1,500), so the periodic flushes draw on a budget of
`loads_per_day` (a token bucket holding an hour of it): while busy for long, rows are written in
bigger, rarer batches instead of failing with quotaExceeded. Finished runs stay readable from memory
until their row is written. A flush whose outcome is unknown (the job ran, its answer was lost) is
written again, so every reader here tolerates a row stored twice. The PENDING transition of a run
carries its identity, so a run that a crash interrupted can be found (a PENDING event without a
`pipeline_runs` row) and closed as FAILED with reason INTERRUPTED when the service starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from server.engine.run import Run, StepView
from server.token_bucket import TokenBucket
from server.warehouse.bigquery import BigQueryWarehouse, Row

log = logging.getLogger(__name__)

RUNS = "pipeline_runs"
EVENTS = "pipeline_run_events"


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _identity(run: Run) -> str:
    return _json(
        {
            "pipeline_key": run.pipeline_key,
            "pipeline_id": run.pipeline_id,
            "trigger": run.trigger,
            "triggered_by": run.triggered_by,
            "parameters": run.parameters,
            "request_id": run.request_id,
            "create_time": run.create_time.isoformat(),
        }
    )


def run_row(run: Run) -> dict[str, Any]:
    """The `pipeline_runs` row of a finished run."""
    return {
        "run_id": run.run_id,
        "org_slug": run.org_slug,
        "pipeline_key": run.pipeline_key,
        "pipeline_id": run.pipeline_id,
        "state": run.state,
        "trigger": run.trigger,
        "triggered_by": run.triggered_by,
        "parameters": _json(run.parameters),
        "request_id": run.request_id,
        "create_time": run.create_time,
        "start_time": run.start_time,
        "end_time": run.end_time,
        "reason": run.reason,
        "error": run.error,
        "steps": _json([s.as_json() for s in run.steps.values()]),
    }


def run_from_row(row: Row) -> Run:
    """A finished run read back from `pipeline_runs`."""
    run = Run(
        run_id=row["run_id"],
        org_slug=row["org_slug"],
        pipeline_key=row["pipeline_key"],
        pipeline_id=row["pipeline_id"],
        trigger=row["trigger"],
        triggered_by=row["triggered_by"] or "",
        parameters=json.loads(row["parameters"] or "{}"),
        request_id=row["request_id"] or "",
        create_time=row["create_time"],
        state=row["state"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        reason=row["reason"] or "",
        error=row["error"] or "",
    )
    run.steps = {s["step_id"]: StepView.from_json(s) for s in json.loads(row["steps"] or "[]")}
    return run


class LoadBudget:
    """Load jobs allowed: `per_day` a day, holding at most an hour's worth (0: unlimited).

    It starts with one load, not a full hour, so that restarts (deploys, a crash loop) do not each add
    a burst to BigQuery's rolling day.
    """

    def __init__(self, per_day: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._bucket = (
            TokenBucket(per_day / 86400.0, max(1.0, per_day / 24.0), tokens=1.0, clock=clock)
            if per_day
            else None
        )

    def take(self) -> bool:
        """Spend one load if the budget has one."""
        return self._bucket is None or self._bucket.take()

    def spend(self) -> None:
        """Count a load that must happen anyway (on close, after recovery); later ones wait for it."""
        if self._bucket is not None:
            self._bucket.spend()


class Ledger:
    """Buffers ledger rows and writes them in batches; reads finished runs back."""

    def __init__(
        self,
        warehouse: BigQueryWarehouse,
        dataset: str,
        *,
        interval: float = 0.5,
        loads_per_day: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wh = warehouse
        self._dataset = dataset
        self._interval = interval
        self._budget = LoadBudget(loads_per_day, clock)
        self._runs: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        # Finished runs whose row is not in the table yet, by id, by org and by request id.
        self._unwritten: dict[str, Run] = {}
        self._unwritten_by_org: dict[str, dict[str, Run]] = {}
        self._unwritten_requests: dict[tuple[str, str], Run] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def _t(self, table: str) -> str:
        return self._wh.table_ref(self._dataset, table)

    def transition(
        self,
        run: Run,
        from_state: str,
        to_state: str,
        *,
        step: StepView | None = None,
        attempt: int = 0,
        reason: str = "",
        error: str = "",
    ) -> None:
        """Buffer one run or step transition."""
        self._events.append(
            {
                "run_id": run.run_id,
                "org_slug": run.org_slug,
                "kind": "STEP_TRANSITION" if step else "RUN_TRANSITION",
                "step_id": step.step_id if step else None,
                "ps_type": step.ps_type if step else None,
                "attempt": attempt or None,
                "from_state": from_state or None,
                "to_state": to_state,
                "reason": reason or None,
                "error": error or None,
                "at": datetime.now(UTC),
                "run": _identity(run) if to_state == "PENDING" and step is None else None,
            }
        )

    def attempt(
        self,
        run: Run,
        step: StepView,
        attempt: int,
        state: str,
        started_at: datetime,
        ended_at: datetime | None,
        error: str,
        error_reason: str,
        rows_written: int,
    ) -> None:
        """Buffer one STEP_ATTEMPT row."""
        duration = int((ended_at - started_at).total_seconds() * 1000) if ended_at else None
        self._events.append(
            {
                "run_id": run.run_id,
                "org_slug": run.org_slug,
                "kind": "STEP_ATTEMPT",
                "step_id": step.step_id,
                "ps_type": step.ps_type,
                "attempt": attempt,
                "to_state": state,
                "error": error or None,
                "error_reason": error_reason or None,
                "started_at": started_at,
                "ended_at": ended_at,
                "duration_ms": duration,
                "rows_written": rows_written,
                "at": datetime.now(UTC),
            }
        )

    def finished(self, run: Run) -> None:
        """Buffer the `pipeline_runs` row of a run that reached a terminal state."""
        self._runs.append(run_row(run))
        self._unwritten[run.run_id] = run
        self._unwritten_by_org.setdefault(run.org_slug, {})[run.run_id] = run
        if run.request_id:
            self._unwritten_requests[(run.org_slug, run.request_id)] = run

    def _written(self, run_id: str) -> None:
        run = self._unwritten.pop(run_id, None)
        if run is None:
            return
        of_org = self._unwritten_by_org.get(run.org_slug, {})
        of_org.pop(run_id, None)
        if not of_org:
            self._unwritten_by_org.pop(run.org_slug, None)
        if run.request_id:
            self._unwritten_requests.pop((run.org_slug, run.request_id), None)

    def unwritten(self, run_id: str) -> Run | None:
        """A finished run whose row is not written yet (the table cannot answer for it)."""
        return self._unwritten.get(run_id)

    def unwritten_request(self, org_slug: str, request_id: str) -> Run | None:
        """The finished, not yet written run that a call with this request id created."""
        return self._unwritten_requests.get((org_slug, request_id))

    def unwritten_runs(self, org_slug: str) -> list[Run]:
        """The org's finished runs whose rows are not written yet."""
        return list(self._unwritten_by_org.get(org_slug, {}).values())

    @property
    def pending(self) -> int:
        """Rows waiting for the next flush."""
        return len(self._runs) + len(self._events)

    async def flush(self) -> None:
        """Write everything buffered: at most one load job per table."""
        async with self._lock:
            runs, events = self._runs, self._events
            self._runs, self._events = [], []
            try:
                # Events first: a run row must never exist without its transitions.
                await self._wh.load_rows(self._dataset, EVENTS, events)
            except Exception:
                self._runs[:0], self._events[:0] = runs, events
                raise
            try:
                await self._wh.load_rows(self._dataset, RUNS, runs)
            except Exception:
                self._runs[:0] = runs  # the events are written; only the run rows are retried
                raise
            for row in runs:
                self._written(row["run_id"])

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self.pending and self._budget.take():
                try:
                    await self.flush()
                except Exception as exc:  # keep the rows; the next tick retries
                    log.warning("ledger flush failed, will retry: %s", type(exc).__name__)

    def start(self) -> None:
        """Start the background flusher."""
        self._task = asyncio.create_task(self._loop(), name="ledger-flush")

    async def close(self) -> None:
        """Stop the flusher and write what is left."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.pending:
            self._budget.spend()
            await self.flush()

    async def get(self, org_slug: str, run_id: str) -> Run | None:
        """A finished run of `org_slug`, or None."""
        rows = await self._wh.query(
            f"SELECT * FROM {self._t(RUNS)} WHERE org_slug = @org AND run_id = @id LIMIT 1",
            {"org": org_slug, "id": run_id},
        )
        return run_from_row(rows[0]) if rows else None

    async def find_request(self, org_slug: str, request_id: str) -> Run | None:
        """The finished run that an earlier call with this request id created."""
        rows = await self._wh.query(
            f"SELECT * FROM {self._t(RUNS)} WHERE org_slug = @org AND request_id = @rid "
            "ORDER BY create_time LIMIT 1",
            {"org": org_slug, "rid": request_id},
        )
        return run_from_row(rows[0]) if rows else None

    async def finished_runs(
        self, org_slug: str, *, pipeline_key: str, state: str, before: tuple[datetime, str] | None, limit: int
    ) -> list[Run]:
        """Finished runs of an org, newest first, strictly before the (create_time, run_id) cursor."""
        where = ["org_slug = @org"]
        params: dict[str, Any] = {"org": org_slug, "limit": limit}
        if pipeline_key:
            where.append("pipeline_key = @pipeline")
            params["pipeline"] = pipeline_key
        if state:
            where.append("state = @state")
            params["state"] = state
        if before:
            where.append("(create_time < @t OR (create_time = @t AND run_id < @id))")
            params.update(t=before[0], id=before[1])
        rows = await self._wh.query(
            f"SELECT DISTINCT * FROM {self._t(RUNS)} WHERE {' AND '.join(where)} "
            "ORDER BY create_time DESC, run_id DESC LIMIT @limit",
            params,
        )
        return [run_from_row(r) for r in rows]

    async def counts(self, month_start: datetime, day_start: datetime) -> dict[str, tuple[int, int]]:
        """Runs accepted per org since `month_start` and since `day_start`: {org: (month, day)}."""
        rows = await self._wh.query(
            "SELECT e.org_slug, COUNT(DISTINCT e.run_id) AS month, "
            f"COUNT(DISTINCT IF(e.at >= @day, e.run_id, NULL)) AS day FROM {self._t(EVENTS)} AS e "
            "WHERE e.kind = 'RUN_TRANSITION' AND e.to_state = 'PENDING' AND e.at >= @month "
            "GROUP BY e.org_slug",
            {"month": month_start, "day": day_start},
        )
        return {r["org_slug"]: (int(r["month"]), int(r["day"])) for r in rows}

    async def recover_interrupted(self) -> list[str]:
        """Close runs that a dead process left active: FAILED with reason INTERRUPTED."""
        rows = await self._wh.query(
            f"SELECT DISTINCT e.run_id, e.org_slug, e.run FROM {self._t(EVENTS)} AS e "
            f"LEFT JOIN {self._t(RUNS)} AS r ON r.run_id = e.run_id "
            "WHERE e.kind = 'RUN_TRANSITION' AND e.to_state = 'PENDING' AND r.run_id IS NULL"
        )
        now = datetime.now(UTC)
        closed = []
        for row in rows:
            identity = json.loads(row["run"] or "{}")
            run = Run(
                run_id=row["run_id"],
                org_slug=row["org_slug"],
                pipeline_key=identity.get("pipeline_key", "?/?/?"),
                pipeline_id=identity.get("pipeline_id", ""),
                trigger=identity.get("trigger", "API"),
                triggered_by=identity.get("triggered_by", ""),
                parameters=identity.get("parameters", {}),
                request_id=identity.get("request_id", ""),
                create_time=datetime.fromisoformat(identity.get("create_time", now.isoformat())),
                state="FAILED",
                end_time=now,
                reason="INTERRUPTED",
                error="the service stopped while the run was active",
            )
            self.transition(run, "RUNNING", "FAILED", reason="INTERRUPTED", error=run.error)
            self.finished(run)
            closed.append(run.run_id)
        if closed:
            self._budget.spend()
            await self.flush()
        return closed
