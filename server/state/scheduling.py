"""The scheduler's part of the state store (migrations/0002_scheduler.sql): overrides, the tick, backfills
and the job queue. Same pool as `StateStore`; every rule that must hold across replicas is one statement
or one transaction here: a job is inserted once per key, claimed once, finished once by its owner."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg

from server.state.migrate import Connection

_CLAIM_LOCK = "scheduler:claim"


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to enqueue (a schedule's instant or a backfill day)."""

    job_key: str
    kind: str
    org_slug: str
    pipeline_key: str
    scheduled_for: datetime
    parameters: dict[str, str]
    max_attempts: int
    backfill_id: str | None = None


@dataclass(frozen=True, slots=True)
class Job:
    """A job as stored."""

    job_id: int
    job_key: str
    kind: str
    org_slug: str
    pipeline_key: str
    scheduled_for: datetime
    backfill_id: str | None
    parameters: dict[str, str]
    state: str
    attempts: int
    max_attempts: int
    deferrals: int
    run_after: datetime
    run_id: str
    owner: str
    reason: str
    error: str

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Job:
        """A job read back from `scheduled_jobs`."""
        return cls(**{name: row[name] for name in cls.__slots__})


@dataclass(frozen=True, slots=True)
class Override:
    """An org's schedule for one pipeline, replacing the config's default."""

    org_slug: str
    pipeline_key: str
    cron: str
    timezone: str
    enabled: bool
    parameters: dict[str, str]
    updated_by: str = ""
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Backfill:
    """A backfill and its progress (jobs per state)."""

    backfill_id: str
    org_slug: str
    pipeline_key: str
    start_date: date
    end_date: date
    max_concurrency: int
    cancelled: bool
    created_by: str
    created_at: datetime
    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class Caps:
    """How many jobs may run at once: over all replicas, per org."""

    total: int
    per_org: int


class SchedulerStore:
    """Scheduler state on the state store's pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # -- overrides -----------------------------------------------------------------------------------

    async def overrides(self, org_slug: str | None = None) -> list[Override]:
        """The overrides of one org, or of every org."""
        rows = await self._pool.fetch(
            "SELECT * FROM schedule_overrides WHERE $1::text IS NULL OR org_slug = $1", org_slug
        )
        return [Override(**dict(r)) for r in rows]

    async def put_override(self, override: Override) -> Override:
        """Create or replace an org's schedule of a pipeline."""
        row = await self._pool.fetchrow(
            "INSERT INTO schedule_overrides (org_slug, pipeline_key, cron, timezone, enabled, parameters, "
            "updated_by) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (org_slug, pipeline_key) DO UPDATE "
            "SET cron = $3, timezone = $4, enabled = $5, parameters = $6, updated_by = $7, "
            "updated_at = clock_timestamp() RETURNING *",
            override.org_slug,
            override.pipeline_key,
            override.cron,
            override.timezone,
            override.enabled,
            override.parameters,
            override.updated_by,
        )
        assert row is not None
        return Override(**dict(row))

    async def delete_override(self, org_slug: str, pipeline_key: str) -> bool:
        """Back to the config's default; False if there was no override."""
        result: str = await self._pool.execute(
            "DELETE FROM schedule_overrides WHERE org_slug = $1 AND pipeline_key = $2", org_slug, pipeline_key
        )
        return result.endswith(" 1")

    # -- the tick ------------------------------------------------------------------------------------

    async def tick(
        self, now: datetime, first_lookback: timedelta, due: Callable[[datetime], Sequence[NewJob]]
    ) -> tuple[int, int]:
        """Enqueue `due(after)`: the jobs of the schedules' instants in (after, now], where `after` is where
        the previous tick stopped (or `now - first_lookback`). One transaction holding the clock's row, so
        concurrent ticks take turns and each instant is looked at once; the unique job key makes a
        repeated instant (a clock going back, a replayed trigger) insert nothing. Returns (inserted, due)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO scheduler_clock VALUES (1, $1) ON CONFLICT DO NOTHING", now - first_lookback
            )
            after: datetime = await conn.fetchval(
                "SELECT last_tick FROM scheduler_clock WHERE id = 1 FOR UPDATE"
            )
            jobs = due(after) if now > after else []
            inserted = await _insert_jobs(conn, jobs)
            await conn.execute("UPDATE scheduler_clock SET last_tick = greatest(last_tick, $1)", now)
            return inserted, len(jobs)

    async def last_tick(self) -> datetime | None:
        """Where the last tick stopped."""
        value: datetime | None = await self._pool.fetchval("SELECT last_tick FROM scheduler_clock")
        return value

    # -- backfills -----------------------------------------------------------------------------------

    async def create_backfill(
        self, backfill: Backfill, jobs: Sequence[NewJob], now: datetime
    ) -> tuple[Backfill, int]:
        """The backfill of the same org, pipeline and dates if there is one (nothing is started twice),
        else this one with its day jobs (a day already queued by another backfill is not added again).
        Returns the backfill and the number of jobs inserted."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO backfills (backfill_id, org_slug, pipeline_key, start_date, end_date, "
                "max_concurrency, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                "ON CONFLICT (org_slug, pipeline_key, start_date, end_date) DO NOTHING RETURNING backfill_id",
                backfill.backfill_id,
                backfill.org_slug,
                backfill.pipeline_key,
                backfill.start_date,
                backfill.end_date,
                backfill.max_concurrency,
                backfill.created_by,
            )
            inserted = await _insert_jobs(conn, jobs) if row else 0
            backfill_id = (
                backfill.backfill_id
                if row
                else await conn.fetchval(
                    "SELECT backfill_id FROM backfills WHERE org_slug = $1 AND pipeline_key = $2 "
                    "AND start_date = $3 AND end_date = $4",
                    backfill.org_slug,
                    backfill.pipeline_key,
                    backfill.start_date,
                    backfill.end_date,
                )
            )
        found = await self.backfill(backfill.org_slug, backfill_id)
        assert found is not None
        return found, inserted

    async def backfill(self, org_slug: str, backfill_id: str) -> Backfill | None:
        """A backfill of the org with its progress: the jobs of its days (whichever backfill queued them)
        per state."""
        row = await self._pool.fetchrow(
            "SELECT b.*, ARRAY(SELECT j.state FROM scheduled_jobs j WHERE j.kind = 'BACKFILL' "
            "AND j.org_slug = b.org_slug AND j.pipeline_key = b.pipeline_key "
            "AND j.scheduled_for >= b.start_date::timestamp AT TIME ZONE 'UTC' "
            "AND j.scheduled_for <= b.end_date::timestamp AT TIME ZONE 'UTC') AS states "
            "FROM backfills b WHERE b.backfill_id = $1 AND b.org_slug = $2",
            backfill_id,
            org_slug,
        )
        if row is None:
            return None
        fields = {k: v for k, v in row.items() if k != "states"}
        return Backfill(**fields, counts=dict(Counter(row["states"])))

    async def cancel_backfill(self, org_slug: str, backfill_id: str) -> list[str]:
        """Mark the backfill cancelled and cancel its queued jobs; the run ids of its running jobs (the
        caller cancels those runs)."""
        async with self._pool.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "UPDATE backfills SET cancelled = true WHERE backfill_id = $1 AND org_slug = $2 "
                "RETURNING backfill_id",
                backfill_id,
                org_slug,
            )
            if found is None:
                return []
            await conn.execute(
                "UPDATE scheduled_jobs SET state = 'CANCELLED', reason = 'CANCELLED_BY_USER', "
                "ended_at = clock_timestamp() WHERE backfill_id = $1 AND state = 'QUEUED'",
                backfill_id,
            )
            rows = await conn.fetch(
                "SELECT run_id FROM scheduled_jobs WHERE backfill_id = $1 AND state = 'RUNNING' "
                "AND run_id <> ''",
                backfill_id,
            )
            return [r["run_id"] for r in rows]

    # -- claiming and finishing jobs -----------------------------------------------------------------

    async def claim(self, owner: str, caps: Caps, limit: int) -> list[Job]:
        """Take up to `limit` due jobs for `owner` (RUNNING, one more attempt), within the global, per-org
        and per-backfill caps counted over every replica. Claims are serialized by a transaction-scoped
        advisory lock (a claim is a few milliseconds), so the caps hold exactly."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", _CLAIM_LOCK)
            running = await conn.fetch(
                "SELECT org_slug, backfill_id, count(*) AS n FROM scheduled_jobs WHERE state = 'RUNNING' "
                "GROUP BY 1, 2"
            )
            per_org: Counter[str] = Counter()
            per_backfill: Counter[str] = Counter()
            for r in running:
                per_org[r["org_slug"]] += r["n"]
                if r["backfill_id"]:
                    per_backfill[r["backfill_id"]] += r["n"]
            free = min(limit, caps.total - sum(per_org.values()))
            if free <= 0:
                return []
            candidates = await conn.fetch(
                "SELECT j.job_id, j.org_slug, j.backfill_id, b.max_concurrency FROM scheduled_jobs j "
                "LEFT JOIN backfills b ON b.backfill_id = j.backfill_id "
                "WHERE j.state = 'QUEUED' AND j.run_after <= clock_timestamp() "
                "ORDER BY j.run_after, j.job_id LIMIT $1 FOR UPDATE OF j SKIP LOCKED",
                min(free * 20, 5_000),
            )
            chosen: list[int] = []
            for c in candidates:
                if len(chosen) >= free:
                    break
                if per_org[c["org_slug"]] >= caps.per_org:
                    continue
                bf = c["backfill_id"]
                if bf and per_backfill[bf] >= c["max_concurrency"]:
                    continue
                chosen.append(c["job_id"])
                per_org[c["org_slug"]] += 1
                if bf:
                    per_backfill[bf] += 1
            if not chosen:
                return []
            rows = await conn.fetch(
                "UPDATE scheduled_jobs SET state = 'RUNNING', owner = $2, attempts = attempts + 1, "
                "started_at = clock_timestamp() WHERE job_id = ANY($1::bigint[]) RETURNING *",
                chosen,
                owner,
            )
            return sorted((Job.from_row(r) for r in rows), key=lambda j: (j.run_after, j.job_id))

    async def started(self, job: Job, run_id: str) -> bool:
        """Record the run of the job's current attempt; False if the job should not go on (its backfill
        was cancelled meanwhile, or the job is no longer this owner's): the caller cancels the run.

        The backfill's row is read `FOR SHARE`: a concurrent cancel (which updates that row, then reads
        its running jobs' runs) either comes first and is seen here, or waits and then sees this run."""
        async with self._pool.acquire() as conn, conn.transaction():
            cancelled = job.backfill_id is not None and await conn.fetchval(
                "SELECT cancelled FROM backfills WHERE backfill_id = $1 FOR SHARE", job.backfill_id
            )
            result: str = await conn.execute(
                "UPDATE scheduled_jobs SET run_id = $3 WHERE job_id = $1 AND owner = $2 "
                "AND state = 'RUNNING'",
                job.job_id,
                job.owner,
                run_id,
            )
            return result.endswith(" 1") and not cancelled

    async def finish(self, job: Job, state: str, *, reason: str = "", error: str = "") -> str | None:
        """End the job (SUCCEEDED, FAILED, CANCELLED) if it is still this owner's; returns the state of the
        previous finished job of the same org and pipeline (None if none, or if not ours any more)."""
        row = await self._pool.fetchrow(
            "WITH u AS (UPDATE scheduled_jobs SET state = $3, reason = $4, error = $5, "
            "ended_at = clock_timestamp() WHERE job_id = $1 AND owner = $2 AND state = 'RUNNING' "
            "RETURNING org_slug, pipeline_key, ended_at) "
            "SELECT (SELECT j.state FROM scheduled_jobs j, u WHERE j.org_slug = u.org_slug "
            "AND j.pipeline_key = u.pipeline_key AND j.job_id <> $1 AND j.state IN ('SUCCEEDED', 'FAILED') "
            "ORDER BY j.ended_at DESC LIMIT 1) AS previous, (SELECT count(*) FROM u) AS n",
            job.job_id,
            job.owner,
            state,
            reason,
            error[:500],
        )
        if row is None or not row["n"]:
            return None
        previous: str | None = row["previous"] or ""
        return previous

    async def requeue(
        self, job: Job, run_after: datetime, *, reason: str, error: str = "", deferred: bool = False
    ) -> bool:
        """Put the job back in the queue until `run_after`: a retry (the attempt counts) or a deferral by
        a quota or cap (it does not: the attempt is given back)."""
        result: str = await self._pool.execute(
            "UPDATE scheduled_jobs SET state = 'QUEUED', owner = '', run_after = $3, reason = $4, "
            "error = $5, "
            "attempts = attempts - $6::int, deferrals = deferrals + $6::int "
            "WHERE job_id = $1 AND owner = $2 AND state = 'RUNNING'",
            job.job_id,
            job.owner,
            run_after,
            reason,
            error[:500],
            int(deferred),
        )
        return result.endswith(" 1")

    async def reap(self, retry_after: timedelta) -> int:
        """Jobs RUNNING on replicas without a lease go back to the queue (their runs were closed as
        INTERRUPTED), or fail if that was their last attempt."""
        result: str = await self._pool.execute(
            "UPDATE scheduled_jobs j SET owner = '', reason = 'INTERRUPTED', "
            "state = CASE WHEN attempts >= max_attempts THEN 'FAILED' ELSE 'QUEUED' END, "
            "ended_at = CASE WHEN attempts >= max_attempts THEN clock_timestamp() END, "
            "run_after = clock_timestamp() + $1::interval "
            "WHERE state = 'RUNNING' AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.replica_id = j.owner "
            "AND r.expires_at >= clock_timestamp())",
            retry_after,
        )
        return int(result.split()[-1])

    # -- reads ---------------------------------------------------------------------------------------

    async def job(self, job_key: str) -> Job | None:
        """A job by its key."""
        row = await self._pool.fetchrow("SELECT * FROM scheduled_jobs WHERE job_key = $1", job_key)
        return Job.from_row(row) if row else None

    async def jobs(self, org_slug: str, pipeline_key: str | None = None) -> list[Job]:
        """An org's jobs (of one pipeline), oldest scheduled first."""
        rows = await self._pool.fetch(
            "SELECT * FROM scheduled_jobs WHERE org_slug = $1 AND ($2::text IS NULL OR pipeline_key = $2) "
            "ORDER BY scheduled_for, job_id",
            org_slug,
            pipeline_key,
        )
        return [Job.from_row(r) for r in rows]

    async def last_jobs(self, org_slug: str) -> dict[str, Job]:
        """The latest scheduled (not backfill) job of each of the org's pipelines."""
        rows = await self._pool.fetch(
            "SELECT DISTINCT ON (pipeline_key) * FROM scheduled_jobs WHERE org_slug = $1 "
            "AND kind = 'SCHEDULE' ORDER BY pipeline_key, scheduled_for DESC",
            org_slug,
        )
        return {r["pipeline_key"]: Job.from_row(r) for r in rows}

    async def status(self, today_start: datetime) -> dict[str, Any]:
        """Counts over every org: due (queued and due now), queued, running, failed today, retries pending
        (queued after a failed attempt), and the oldest due job's lag in seconds."""
        row = await self._pool.fetchrow(
            "SELECT count(*) FILTER (WHERE state = 'QUEUED' AND run_after <= clock_timestamp()) AS due, "
            "count(*) FILTER (WHERE state = 'QUEUED') AS queued, "
            "count(*) FILTER (WHERE state = 'RUNNING') AS running, "
            "count(*) FILTER (WHERE state = 'FAILED' AND ended_at >= $1) AS failed_today, "
            "count(*) FILTER (WHERE state = 'QUEUED' AND attempts > 0) AS retries_pending, "
            "coalesce(extract(epoch FROM clock_timestamp() - min(run_after) FILTER (WHERE state = 'QUEUED' "
            "AND run_after <= clock_timestamp())), 0)::float8 AS oldest_lag "
            "FROM scheduled_jobs WHERE state IN ('QUEUED', 'RUNNING') OR ended_at >= $1",
            today_start,
        )
        assert row is not None
        return dict(row)


async def _insert_jobs(conn: Connection, jobs: Sequence[NewJob]) -> int:
    if not jobs:
        return 0
    rows = await conn.fetch(
        "INSERT INTO scheduled_jobs (job_key, kind, org_slug, pipeline_key, scheduled_for, backfill_id, "
        "parameters, max_attempts, run_after) "
        "SELECT *, clock_timestamp() FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
        "$5::timestamptz[], $6::text[], $7::jsonb[], $8::int[]) "
        "ON CONFLICT (job_key) DO NOTHING RETURNING 1",
        [j.job_key for j in jobs],
        [j.kind for j in jobs],
        [j.org_slug for j in jobs],
        [j.pipeline_key for j in jobs],
        [j.scheduled_for for j in jobs],
        [j.backfill_id for j in jobs],
        [j.parameters for j in jobs],
        [j.max_attempts for j in jobs],
    )
    return len(rows)
