"""Retention of the state store against the real PostgreSQL: what goes, what stays, in bounded batches.

Rows are written with the times a long-running service would have left (the schema's own tables), then
`prune` runs at a fixed instant; its counts and the rows left are both checked.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from server.localstack.postgres import Postgres
from server.state.retention import Retention, RetentionPolicy
from server.state.store import StateStore
from tests.conftest import scratch_database

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture
async def store(postgres: Postgres) -> AsyncIterator[StateStore]:
    """A store on a database of its own (so nothing else prunes or reads these rows)."""
    async with scratch_database(postgres, "retention") as url:
        state = await StateStore.connect(dsn=url, pool_size=4)
        try:
            yield state
        finally:
            await state.close()


async def run(
    conn: asyncpg.Connection,
    *,
    ended: datetime | None,
    exported: bool,
    state: str = "SUCCEEDED",
    events: int = 2,
) -> str:
    run_id = uuid.uuid4().hex
    created = (ended or NOW) - timedelta(minutes=5)
    await conn.execute(
        "INSERT INTO runs (run_id, org_slug, pipeline_key, pipeline_id, state, trigger, parameters, "
        "request_id, dedupe_key, owner, create_time, end_time, exported) "
        "VALUES ($1, 'acme', 'generic/x/y', 'y', $2, 'API', '{}', $1, $1, 'r1', $3, $4, $5)",
        run_id,
        state,
        created,
        ended,
        exported,
    )
    for _ in range(events):
        await conn.execute(
            "INSERT INTO run_events (run_id, org_slug, kind, to_state, at) "
            "VALUES ($1, 'acme', 'RUN_TRANSITION', 'RUNNING', $2)",
            run_id,
            created,
        )
    return run_id


async def job(
    conn: asyncpg.Connection,
    *,
    kind: str,
    pipeline: str,
    at: datetime,
    state: str,
    backfill: str | None = None,
) -> int:
    job_id: int = await conn.fetchval(
        "INSERT INTO scheduled_jobs (job_key, kind, org_slug, pipeline_key, scheduled_for, backfill_id, "
        "state, max_attempts, run_after, ended_at) VALUES ($1, $2, 'acme', $3, $4, $5, $6, 3, $4, $7) "
        "RETURNING job_id",
        f"{kind[0]}|acme|{pipeline}|{at.isoformat()}",
        kind,
        pipeline,
        at,
        backfill,
        state,
        None if state in ("QUEUED", "RUNNING") else at + timedelta(minutes=1),
    )
    return job_id


async def backfill(
    conn: asyncpg.Connection, *, pipeline: str, first: datetime, days: int, created: datetime
) -> str:
    backfill_id = uuid.uuid4().hex
    await conn.execute(
        "INSERT INTO backfills (backfill_id, org_slug, pipeline_key, start_date, end_date, max_concurrency, "
        "created_at) VALUES ($1, 'acme', $2, $3, $4, 2, $5)",
        backfill_id,
        pipeline,
        first.date(),
        (first + (days - 1) * DAY).date(),
        created,
    )
    return backfill_id


async def ids(conn: asyncpg.Connection, sql: str) -> set[object]:
    return {r[0] for r in await conn.fetch(sql)}


async def test_finished_exported_runs_go_with_their_events_and_nothing_else(store: StateStore) -> None:
    async with store.connection() as conn:
        gone = await run(conn, ended=NOW - 91 * DAY, exported=True, events=3)
        unexported = await run(conn, ended=NOW - 200 * DAY, exported=False)
        active = await run(conn, ended=None, exported=False, state="RUNNING")
        recent = await run(conn, ended=NOW - 89 * DAY, exported=True)

        counts = await store.retention.prune(RetentionPolicy(), NOW)

        assert counts["runs"] == 1 and counts["run_events"] == 3
        assert await ids(conn, "SELECT run_id FROM runs") == {unexported, active, recent}
        assert await ids(conn, "SELECT DISTINCT run_id FROM run_events") == {unexported, active, recent}
        assert gone not in await ids(conn, "SELECT request_id FROM runs")  # its request id is forgotten
        again = await store.retention.prune(RetentionPolicy(), NOW)
        assert not any(again.values()), again


async def test_prune_goes_batch_by_batch_until_everything_old_is_gone(store: StateStore) -> None:
    async with store.connection() as conn:
        for n in range(7):
            await run(conn, ended=NOW - (100 + n) * DAY, exported=True, events=1)
        kept = await run(conn, ended=NOW - DAY, exported=True)

        counts = await store.retention.prune(RetentionPolicy(batch=3), NOW)

        assert (counts["runs"], counts["run_events"]) == (7, 7)
        assert await ids(conn, "SELECT run_id FROM runs") == {kept}


async def test_zero_days_keeps_finished_things_forever(store: StateStore) -> None:
    async with store.connection() as conn:
        old_run = await run(conn, ended=NOW - 3000 * DAY, exported=True)
        await job(conn, kind="SCHEDULE", pipeline="p/a/b", at=NOW - 3000 * DAY, state="SUCCEEDED")
        await job(conn, kind="SCHEDULE", pipeline="p/a/b", at=NOW - 2999 * DAY, state="SUCCEEDED")
        counts = await store.retention.prune(
            RetentionPolicy(runs_days=0, jobs_days=0, notifications_days=0), NOW
        )
        assert "runs" not in counts and "scheduled_jobs" not in counts
        assert await ids(conn, "SELECT run_id FROM runs") == {old_run}
        assert await conn.fetchval("SELECT count(*) FROM scheduled_jobs") == 2


async def test_old_scheduled_jobs_go_but_each_pipelines_latest_stays(store: StateStore) -> None:
    async with store.connection() as conn:
        older = await job(conn, kind="SCHEDULE", pipeline="p/a/b", at=NOW - 120 * DAY, state="FAILED")
        old = await job(conn, kind="SCHEDULE", pipeline="p/a/b", at=NOW - 110 * DAY, state="SUCCEEDED")
        latest = await job(conn, kind="SCHEDULE", pipeline="p/a/b", at=NOW - 100 * DAY, state="SUCCEEDED")
        other = await job(conn, kind="SCHEDULE", pipeline="p/c/d", at=NOW - 300 * DAY, state="CANCELLED")
        queued = await job(conn, kind="SCHEDULE", pipeline="p/c/d", at=NOW - 400 * DAY, state="QUEUED")
        recent = await job(conn, kind="SCHEDULE", pipeline="p/e/f", at=NOW - 10 * DAY, state="SUCCEEDED")
        await job(conn, kind="SCHEDULE", pipeline="p/e/f", at=NOW - 5 * DAY, state="SUCCEEDED")

        counts = await store.retention.prune(RetentionPolicy(), NOW)

        assert counts["scheduled_jobs"] == 2
        left = await ids(conn, "SELECT job_id FROM scheduled_jobs")
        assert older not in left and old not in left
        assert {latest, other, queued, recent} <= left
        last = await store.scheduling.last_jobs("acme")
        assert last["p/a/b"].job_id == latest  # what ListSchedules shows survives


async def test_old_backfills_go_with_their_days_unless_active_or_counted_by_a_newer_one(
    store: StateStore,
) -> None:
    async with store.connection() as conn:
        first = datetime(2025, 10, 26, tzinfo=UTC)  # backfill days are their midnight (UTC)
        done = await backfill(conn, pipeline="p/a/b", first=first, days=2, created=NOW - 100 * DAY)
        done_jobs = {
            await job(
                conn, kind="BACKFILL", pipeline="p/a/b", at=first + n * DAY, state="SUCCEEDED", backfill=done
            )
            for n in range(2)
        }
        busy = await backfill(conn, pipeline="p/c/d", first=first, days=2, created=NOW - 100 * DAY)
        await job(conn, kind="BACKFILL", pipeline="p/c/d", at=first, state="SUCCEEDED", backfill=busy)
        await job(conn, kind="BACKFILL", pipeline="p/c/d", at=first + DAY, state="RUNNING", backfill=busy)
        shared = await backfill(conn, pipeline="p/e/f", first=first, days=1, created=NOW - 100 * DAY)
        newer = await backfill(conn, pipeline="p/e/f", first=first - DAY, days=2, created=NOW - DAY)
        shared_job = await job(
            conn, kind="BACKFILL", pipeline="p/e/f", at=first, state="SUCCEEDED", backfill=shared
        )

        counts = await store.retention.prune(RetentionPolicy(), NOW)

        assert counts["backfills"] == 2 and counts["backfill_jobs"] == 2
        assert await ids(conn, "SELECT backfill_id FROM backfills") == {busy, newer}
        left = await ids(conn, "SELECT job_id FROM scheduled_jobs")
        assert not done_jobs & left and shared_job in left
        progress = await store.scheduling.backfill("acme", newer)
        assert progress is not None and progress.counts.get("SUCCEEDED") == 1


async def test_notifications_quotas_and_rate_buckets(store: StateStore) -> None:
    async with store.connection() as conn:
        for days in (91, 89):
            await conn.execute(
                "INSERT INTO notification_log (org_slug, pipeline_key, event, channel, outcome, at) "
                "VALUES ('acme', 'p/a/b', 'FAILED', 'EMAIL', 'SENT', $1)",
                NOW - days * DAY,
            )
        for pipeline, days in (("p/a/b", 9), ("p/c/d", 7)):
            await conn.execute(
                "INSERT INTO notification_cooldowns VALUES ('acme', $1, 'FAILED', $2)",
                pipeline,
                NOW - days * DAY,
            )
        periods = [
            "D2026-11-30",
            "D2026-11-29",
            "D2026-11-28",
            "D2026-11-27",
            "M2026-11",
            "M2026-10",
            "M2026-09",
        ]
        for period in periods:
            await conn.execute("INSERT INTO quota_usage VALUES ('acme', $1, 1)", period)
        for bucket, hours in (("rate:old", 25), ("rate:new", 1), ("ledger-loads:meta", 100)):
            await conn.execute(
                "INSERT INTO token_buckets VALUES ($1, 1, $2)", bucket, NOW - timedelta(hours=hours)
            )

        counts = await store.retention.prune(RetentionPolicy(), NOW)

        assert counts["notification_log"] == 1
        assert await conn.fetchval("SELECT count(*) FROM notification_log") == 1
        assert await ids(conn, "SELECT pipeline_key FROM notification_cooldowns") == {"p/c/d"}
        assert await ids(conn, "SELECT period FROM quota_usage") == {
            "D2026-11-30",
            "D2026-11-29",
            "D2026-11-28",
            "M2026-11",
            "M2026-10",
        }
        assert await ids(conn, "SELECT bucket FROM token_buckets") == {"rate:new", "ledger-loads:meta"}
        assert (counts["quota_usage"], counts["token_buckets"], counts["notification_cooldowns"]) == (2, 1, 1)


async def test_the_periodic_prune_of_a_replica(store: StateStore) -> None:
    async with store.connection() as conn:
        gone = await run(conn, ended=datetime.now(UTC) - 91 * DAY, exported=True)
        kept = await run(conn, ended=datetime.now(UTC) - DAY, exported=True)
        retention = Retention(store.retention, RetentionPolicy(), interval=0.05)
        retention.start()
        try:
            for _ in range(100):
                if gone not in await ids(conn, "SELECT run_id FROM runs"):
                    break
                await asyncio.sleep(0.05)
        finally:
            await retention.close()
        assert await ids(conn, "SELECT run_id FROM runs") == {kept}
