"""Retention of the operational state: what PostgreSQL no longer needs is deleted, in bounded batches.

The state store holds what the service works with; history for analysis is BigQuery's copy. So:
- finished runs and their events go `runs_days` after they ended, and only once exported to BigQuery
  (a run not yet exported stays, however old); a run's `request_id` is remembered as long as the run;
- finished scheduler jobs go `jobs_days` after they ended, except each org and pipeline's latest
  scheduled job (ListSchedules shows it, and the next job's "recovered" test compares with it); a
  backfill goes with its jobs `jobs_days` after it was created, once none of its days is queued or
  running, and a job still counted by a newer backfill of the same days stays;
- the notification log goes `notifications_days` after the entry; cooldowns go once older than the
  longest cooldown allowed (7 days);
- quota counters of past UTC days and months go once no admission can count them (2 days, 2 months);
  RunPipeline rate buckets go a day after their last use (a new bucket starts full, as an idle one is).

Each table is pruned by statements of at most `batch` rows, each its own short transaction, so a prune
never holds locks for long and never competes with admissions; several replicas may prune at once
(`SKIP LOCKED`), one periodic task per replica does it (`Retention.start`), and `db prune` on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

log = logging.getLogger(__name__)

COOLDOWN_MAX = timedelta(days=8)  # longer than the longest cooldown an org may set (7 days)
MAX_BATCHES = 1000  # per table and prune: a bounded loop; the next prune goes on


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long finished things are kept, in days; 0 keeps them forever."""

    runs_days: int = 90
    jobs_days: int = 90
    notifications_days: int = 90
    batch: int = 5000


_RUNS = """
WITH gone AS (
    DELETE FROM runs WHERE run_id IN (
        SELECT run_id FROM runs WHERE exported AND end_time < $1
        ORDER BY end_time LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING run_id),
events AS (DELETE FROM run_events WHERE run_id IN (SELECT run_id FROM gone) RETURNING 1)
SELECT (SELECT count(*) FROM gone) AS n, (SELECT count(*) FROM events) AS events
"""

_JOBS = """
WITH gone AS (
    DELETE FROM scheduled_jobs WHERE job_id IN (
        SELECT j.job_id FROM scheduled_jobs j
        WHERE j.kind = 'SCHEDULE' AND j.state IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND j.ended_at < $1
          AND EXISTS (SELECT 1 FROM scheduled_jobs n WHERE n.kind = 'SCHEDULE' AND n.org_slug = j.org_slug
                      AND n.pipeline_key = j.pipeline_key AND n.scheduled_for > j.scheduled_for)
        ORDER BY j.ended_at LIMIT $2 FOR UPDATE OF j SKIP LOCKED)
    RETURNING 1)
SELECT count(*) AS n FROM gone
"""


def _covers(backfill: str) -> str:
    """SQL: job `j` is one of the days of backfill `backfill`."""
    b = backfill
    return (
        f"j.kind = 'BACKFILL' AND j.org_slug = {b}.org_slug AND j.pipeline_key = {b}.pipeline_key "
        f"AND j.scheduled_for >= {b}.start_date::timestamp AT TIME ZONE 'UTC' "
        f"AND j.scheduled_for <= {b}.end_date::timestamp AT TIME ZONE 'UTC'"
    )


_BACKFILLS = f"""
WITH old AS (
    SELECT b.* FROM backfills b
    WHERE b.created_at < $1
      AND NOT EXISTS (SELECT 1 FROM scheduled_jobs j
                      WHERE {_covers("b")} AND j.state IN ('QUEUED', 'RUNNING'))
    LIMIT $2 FOR UPDATE OF b SKIP LOCKED),
jobs AS (
    DELETE FROM scheduled_jobs j USING old b
    WHERE {_covers("b")}
      AND NOT EXISTS (SELECT 1 FROM backfills b2 WHERE b2.backfill_id NOT IN (SELECT backfill_id FROM old)
                      AND {_covers("b2")})
    RETURNING 1),
gone AS (DELETE FROM backfills WHERE backfill_id IN (SELECT backfill_id FROM old) RETURNING 1)
SELECT (SELECT count(*) FROM gone) AS n, (SELECT count(*) FROM jobs) AS jobs
"""

_NOTIFICATIONS = """
WITH gone AS (
    DELETE FROM notification_log WHERE id IN (
        SELECT id FROM notification_log WHERE at < $1 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING 1)
SELECT count(*) AS n FROM gone
"""

_COOLDOWNS = """
WITH gone AS (
    DELETE FROM notification_cooldowns WHERE ctid IN (
        SELECT ctid FROM notification_cooldowns WHERE sent_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING 1)
SELECT count(*) AS n FROM gone
"""

_QUOTAS = """
WITH gone AS (
    DELETE FROM quota_usage WHERE ctid IN (
        SELECT ctid FROM quota_usage
        WHERE (period LIKE 'D%' AND period < 'D' || to_char($1::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD'))
           OR (period LIKE 'M%' AND period < 'M' || to_char($1::timestamptz AT TIME ZONE 'UTC'
                                                            - interval '1 month', 'YYYY-MM'))
        LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING 1)
SELECT count(*) AS n FROM gone
"""

_BUCKETS = """
WITH gone AS (
    DELETE FROM token_buckets WHERE bucket IN (
        SELECT bucket FROM token_buckets WHERE bucket LIKE 'rate:%' AND updated_at < $1
        LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING 1)
SELECT count(*) AS n FROM gone
"""


class RetentionStore:
    """The prune statements, on the state store's pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def _drain(
        self, sql: str, cutoff: datetime, batch: int, counts: dict[str, int], *names: str
    ) -> None:
        """Run one prune statement until it deletes less than a batch; add its counts up under `names`."""
        for _ in range(MAX_BATCHES):
            row = await self._pool.fetchrow(sql, cutoff, batch)
            assert row is not None
            for name, value in zip(names, row.values(), strict=True):
                counts[name] = counts.get(name, 0) + int(value)
            if row["n"] < batch:
                return

    async def prune(self, policy: RetentionPolicy, now: datetime | None = None) -> dict[str, int]:
        """Delete what the policy no longer keeps; returns the rows deleted per table."""
        now = now or datetime.now(UTC)
        days = timedelta(days=1)
        counts: dict[str, int] = {}
        if policy.runs_days:
            cutoff = now - policy.runs_days * days
            await self._drain(_RUNS, cutoff, policy.batch, counts, "runs", "run_events")
        if policy.jobs_days:
            cutoff = now - policy.jobs_days * days
            await self._drain(_JOBS, cutoff, policy.batch, counts, "scheduled_jobs")
            await self._drain(_BACKFILLS, cutoff, policy.batch, counts, "backfills", "backfill_jobs")
        if policy.notifications_days:
            cutoff = now - policy.notifications_days * days
            await self._drain(_NOTIFICATIONS, cutoff, policy.batch, counts, "notification_log")
        await self._drain(_COOLDOWNS, now - COOLDOWN_MAX, policy.batch, counts, "notification_cooldowns")
        await self._drain(_QUOTAS, now - 2 * days, policy.batch, counts, "quota_usage")
        await self._drain(_BUCKETS, now - days, policy.batch, counts, "token_buckets")
        return counts


class Retention:
    """Prunes the state store every `interval` seconds (0: never) from one task of this replica."""

    def __init__(self, store: RetentionStore, policy: RetentionPolicy, *, interval: float) -> None:
        self._store = store
        self._policy = policy
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                counts = await self._store.prune(self._policy)
            except (asyncpg.PostgresError, OSError) as exc:  # the next prune goes on
                log.warning("state retention failed, will retry: %s", type(exc).__name__)
                continue
            if any(counts.values()):
                log.info("state retention", extra={"fields": {k: v for k, v in counts.items() if v}})

    def start(self) -> None:
        """Start the periodic prune (unless the interval is 0)."""
        if self._interval > 0:
            self._task = asyncio.create_task(self._loop(), name="state-retention")

    async def close(self) -> None:
        """Stop pruning."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
