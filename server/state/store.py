"""The state store: the only code that talks to PostgreSQL.

Runs (while they live and after), their events (the run ledger, also the outbox of BigQuery's analytics
copy), quota counters, token buckets and replica leases. Every rule that must hold across replicas is one
statement or one transaction here: admission is one call of `admit_runs()` per batch
(migrations/0006_admit_runs.sql: each row checked in order, an org's counters read and written once per
batch), a run's update and its events are one statement, closing a dead replica's runs is one
statement.

A run is written by the replica that owns it, and only while it is active and that replica's lease
holds: writes carry the owner and match active runs only, so a replica whose lease expired (and whose
runs another replica closed as INTERRUPTED) can no longer change them (fencing).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from server.engine.run import ACTIVE, Run, StepView
from server.state import migrate
from server.state.notifications import NotificationStore
from server.state.retention import RetentionStore
from server.state.scheduling import SchedulerStore

log = logging.getLogger(__name__)

ACTIVE_SQL = "('PENDING', 'RUNNING', 'CANCELLING')"
STEP_TERMINAL = ["SUCCEEDED", "FAILED", "SKIPPED", "CANCELLED", "NOT_RUN", "TIMEOUT"]
INTERRUPTED_ERROR = "the replica running it stopped (its lease expired)"

_EVENT_NAMES = (
    "kind, step_id, ps_type, attempt, from_state, to_state, reason, error, error_reason, started_at, "
    "ended_at, duration_ms, rows_written, at"
)


ADMIT_BATCH = 64  # admissions per statement at most
WRITE_BATCH = 256  # run writes per statement at most
COMMIT_SIBLINGS = 4  # entries queued behind a batch that make the next one wait for its commit delay

_Write = tuple[Run, list[dict[str, Any]], "asyncio.Future[bool]"]
_BATCH_SQL = "SELECT n, outcome, run_id, wait FROM apply_batch($1, $2::jsonb, $3::jsonb)"


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a connection to the pool as it is: no statement of ours leaves session state behind (the
    migrations' advisory lock is released by them), so asyncpg's reset round trip per use is saved."""


def _gone(conn: Any) -> bool:
    """Whether a pooled connection closed; asyncpg gives a connection that closed back to the pool by
    itself, and its proxy then refuses every call."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of `admit`: ACCEPTED, REPLAY or ACTIVE (with `run_id`), or a refusal (a limit's name,
    RATE_LIMITED with `wait` seconds)."""

    outcome: str
    run_id: str
    wait: float


@dataclass(frozen=True, slots=True)
class Limits:
    """An org's limits as admission needs them."""

    requests_per_minute: int
    concurrent: int
    daily: int
    monthly: int


def _first_writes(queued: list[_Write]) -> tuple[list[_Write], list[_Write]]:
    """The writes of the next batch (at most WRITE_BATCH, a run once: a run's second write must see its
    first) and those left queued, in order."""
    batch: list[_Write] = []
    later: list[_Write] = []
    runs: set[str] = set()
    for write in queued:
        if len(batch) < WRITE_BATCH and write[0].run_id not in runs:
            runs.add(write[0].run_id)
            batch.append(write)
        else:
            later.append(write)
    return batch, later


def run_from_row(row: asyncpg.Record) -> Run:
    """A run read back from the `runs` table."""
    run = Run(
        run_id=row["run_id"],
        org_slug=row["org_slug"],
        pipeline_key=row["pipeline_key"],
        pipeline_id=row["pipeline_id"],
        trigger=row["trigger"],
        triggered_by=row["triggered_by"],
        parameters=dict(row["parameters"]),
        request_id=row["request_id"],
        create_time=row["create_time"],
        state=row["state"],
        start_time=row["start_time"],
        end_time=row["end_time"],
        reason=row["reason"],
        error=row["error"],
        dedupe_key=row["dedupe_key"],
    )
    run.steps = {s["step_id"]: StepView.from_json(s) for s in row["steps"]}
    return run


def _steps(run: Run) -> list[dict[str, Any]]:
    return [s.as_json() for s in run.steps.values()]


def identity(run: Run) -> str:
    """The run's identity as JSON, carried by its PENDING event."""
    return _dumps(
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


class StateStore:
    """A connection pool to the state database and the operations on it."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        lease_seconds: float,
        commit_delay: float = 0.0,
        closers: Sequence[Any] = (),
    ) -> None:
        self._pool = pool
        self.lease_seconds = lease_seconds
        self._commit_delay = commit_delay
        self.batches = 0  # statements of the batch loop sent (group commits)
        self.replica_id = ""
        self._closers = list(closers)
        self.scheduling = SchedulerStore(pool)
        self.notifications = NotificationStore(pool)
        self.retention = RetentionStore(pool)
        self._kept: Any = None  # the pooled connection of the batch loop, kept between its batches
        self._admissions: list[tuple[Run, Limits, asyncio.Future[Admission], Callable[[], None] | None]] = []
        self._writes: list[_Write] = []
        self._batcher: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        *,
        dsn: str = "",
        cloud_sql_instance: str = "",
        user: str = "",
        database: str = "",
        pool_size: int = 10,
        lease_seconds: float = 15.0,
        commit_delay: float = 0.0,
        upgrade: bool = True,
    ) -> StateStore:
        """A pool on `dsn`, or on a Cloud SQL instance through the Python Connector (IAM database auth);
        with `upgrade`, the schema migrations are applied first (under their advisory lock).
        `commit_delay`: see `_apply_batches`."""
        closers: list[Any] = []
        if cloud_sql_instance:
            from google.cloud.sql.connector import create_async_connector  # production only

            connector = await create_async_connector()
            closers.append(connector)

            async def connect_cloud_sql(*_: Any, **__: Any) -> asyncpg.Connection:
                conn: asyncpg.Connection = await connector.connect_async(
                    cloud_sql_instance, "asyncpg", user=user, db=database, enable_iam_auth=True
                )
                return conn

            pool = await asyncpg.create_pool(
                connect=connect_cloud_sql,
                min_size=1,
                max_size=pool_size,
                init=_init_connection,
                command_timeout=30,
            )
        elif dsn:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=pool_size,
                init=_init_connection,
                reset=_keep_session,
                command_timeout=30,
            )
        else:
            raise RuntimeError("set DATABASE_URL or CLOUD_SQL_INSTANCE: the service needs its state store")
        assert pool is not None
        store = cls(pool, lease_seconds=lease_seconds, commit_delay=commit_delay, closers=closers)
        if upgrade:
            async with pool.acquire() as conn:
                await migrate.upgrade(conn)
        return store

    async def close(self) -> None:
        """Close the pool (and the Cloud SQL connector)."""
        if self._kept is not None:
            await self._pool.release(self._kept)
            self._kept = None
        await self._pool.close()
        for closer in self._closers:
            await closer.close_async()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[migrate.Connection]:
        """A pooled connection (for the migrations command and tests)."""
        async with self._pool.acquire() as conn:
            yield conn

    async def _fetch_kept(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """`fetch` on the connection kept for the batch loop: it sends one statement after another, so
        keeping its connection saves the pool's acquire and release per batch. A connection that failed
        goes back to the pool, which replaces it if it broke."""
        conn, self._kept = self._kept, None
        if conn is not None and _gone(conn):  # its server went away while it was kept
            await self._pool.release(conn)  # (nothing to do if asyncpg gave it back already)
            conn = None
        conn = conn or await self._pool.acquire()
        try:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
        except BaseException:
            await self._pool.release(conn)
            raise
        self._kept = conn
        return rows

    # -- leases ------------------------------------------------------------------------------------

    async def register(self, replica_id: str) -> None:
        """Take a lease for this replica (a new id each time)."""
        await self._pool.execute(
            "INSERT INTO replicas (replica_id, host, pid, expires_at) "
            "VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4))",
            replica_id,
            socket.gethostname(),
            os.getpid(),
            self.lease_seconds,
        )
        self.replica_id = replica_id

    async def renew(self) -> list[str] | None:
        """Extend this replica's lease; None if it was lost (expired and taken), else the ids of its runs
        whose cancellation another replica asked for."""
        row = await self._pool.fetchrow(
            "WITH l AS (UPDATE replicas SET expires_at = clock_timestamp() + make_interval(secs => $2) "
            "WHERE replica_id = $1 RETURNING 1) "
            "SELECT (SELECT count(*) FROM l) AS alive, ARRAY(SELECT run_id FROM runs WHERE owner = $1 "
            f"AND cancel_requested AND state IN {ACTIVE_SQL}) AS cancels",
            self.replica_id,
            self.lease_seconds,
        )
        assert row is not None
        return list(row["cancels"]) if row["alive"] else None

    async def retire(self) -> None:
        """Give the lease up (graceful stop, after this replica's runs ended)."""
        await self._pool.execute("DELETE FROM replicas WHERE replica_id = $1", self.replica_id)

    async def sweep(self) -> list[str]:
        """Close the active runs of replicas whose lease expired (and of replicas without a lease) as
        FAILED, reason INTERRUPTED, with their events; one statement, so a run is closed once."""
        rows = await self._pool.fetch(
            f"""
            WITH dead AS (
                DELETE FROM replicas WHERE expires_at < clock_timestamp() RETURNING replica_id),
            closing AS (
                SELECT r.run_id, r.state AS old FROM runs r
                WHERE r.state IN {ACTIVE_SQL}
                  AND (r.owner IN (SELECT replica_id FROM dead)
                       OR NOT EXISTS (SELECT 1 FROM replicas p WHERE p.replica_id = r.owner))
                FOR UPDATE OF r),
            closed AS (
                UPDATE runs r SET state = 'FAILED', reason = 'INTERRUPTED', error = $1,
                    end_time = clock_timestamp(),
                    steps = (SELECT coalesce(jsonb_agg(CASE WHEN s->>'state' = ANY($2::text[]) THEN s
                                 ELSE jsonb_set(s, '{{state}}', '"NOT_RUN"') END ORDER BY n), '[]'::jsonb)
                             FROM jsonb_array_elements(r.steps) WITH ORDINALITY AS x(s, n))
                FROM closing c WHERE r.run_id = c.run_id
                RETURNING r.run_id, r.org_slug, c.old, r.end_time),
            events AS (
                INSERT INTO run_events (run_id, org_slug, kind, from_state, to_state, reason, error, at)
                SELECT run_id, org_slug, 'RUN_TRANSITION', old, 'FAILED', 'INTERRUPTED', $1, end_time
                FROM closed)
            SELECT run_id FROM closed
            """,
            INTERRUPTED_ERROR,
            STEP_TERMINAL,
        )
        return [r["run_id"] for r in rows]

    # -- admission and run writes ------------------------------------------------------------------

    async def admit(
        self, run: Run, limits: Limits, *, on_accept: Callable[[], None] | None = None
    ) -> Admission:
        """Admit `run` in its state, PENDING or RUNNING (a run that starts the moment it is admitted: its
        RUNNING transition is then part of the admission), owned by this replica; see `admit_runs()`.
        Each admission is checked in order against everything before it, also in its own batch.

        `on_accept` is called once the admission committed, by the batch, before this returns and also
        when the caller was cancelled meanwhile (an admitted run must run)."""
        done: asyncio.Future[Admission] = asyncio.get_running_loop().create_future()
        self._admissions.append((run, limits, done, on_accept))
        self._schedule()
        return await done

    async def write(self, run: Run, events: Sequence[dict[str, Any]]) -> bool:
        """Store the run's state and append its events; False if the run is no longer this replica's to
        write (it ended, or was closed as INTERRUPTED after this lease expired)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._writes.append((run, list(events), done))
        self._schedule()
        return await done

    def _schedule(self) -> None:
        """Group commit: what is queued while a batch is in flight goes out together as the next one, the
        writes and the admissions in one statement and one commit (`apply_batch()`)."""
        if self._batcher is None or self._batcher.done():
            # A context of its own, not the first caller's (the batch serves every caller).
            self._batcher = asyncio.create_task(
                self._apply_batches(), name="state-batches", context=contextvars.Context()
            )

    async def _apply_batches(self) -> None:
        # Group commit with a commit delay (PostgreSQL's commit_delay and commit_siblings, here): when
        # COMMIT_SIBLINGS entries or more were queued while the batch before was in flight, calls are
        # arriving concurrently, and the next batch goes out `commit_delay` after the one before it was
        # sent, with what arrives meanwhile, instead of the moment that one returned. Fewer, larger
        # statements: less CPU in PostgreSQL and here per run, for a little latency under load only. A
        # few callers taking turns (fewer queued) are never delayed: they would only wait for each other.
        loop = asyncio.get_running_loop()
        sent = None
        while self._admissions or self._writes:
            queued = len(self._admissions) + len(self._writes)
            if sent is not None and queued >= COMMIT_SIBLINGS and self._commit_delay > 0:
                await asyncio.sleep(max(0.0, sent + self._commit_delay - loop.time()))
            sent = loop.time()
            self.batches += 1
            admissions, self._admissions = self._admissions[:ADMIT_BATCH], self._admissions[ADMIT_BATCH:]
            writes, self._writes = _first_writes(self._writes)
            try:
                written, admitted = await self._apply(
                    [(run, events) for run, events, _ in writes],
                    [(run, limits) for run, limits, *_ in admissions],
                )
            except Exception as exc:
                for done in [w[2] for w in writes] + [a[2] for a in admissions]:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for run, _, wrote in writes:
                if not wrote.done():
                    wrote.set_result(run.run_id in written)
            for (_, _, done, on_accept), result in zip(admissions, admitted, strict=True):
                if on_accept is not None and result.outcome == "ACCEPTED":
                    try:
                        on_accept()
                    except Exception:  # the others' admissions are answered regardless
                        log.exception("starting an admitted run failed")
                if not done.done():
                    done.set_result(result)

    async def _apply(
        self, writes: Sequence[tuple[Run, Sequence[dict[str, Any]]]], admissions: Sequence[tuple[Run, Limits]]
    ) -> tuple[set[str], list[Admission]]:
        """One `apply_batch()`: the ids of the runs written, and the admissions' outcomes in order."""
        # Admissions take their orgs' locks in the order of the locks' keys, as every batch of every
        # replica does, so two batches never wait for each other's locks in a cycle; a deadlock is retried
        # anyway (the whole batch rolled back).
        write_items = [
            {
                "run_id": run.run_id,
                "state": run.state,
                "reason": run.reason,
                "error": run.error,
                "start_time": run.start_time,
                "end_time": run.end_time,
                "steps": _steps(run),
                "events": events,
                "n": n,
            }
            for n, (run, events) in enumerate(writes)
        ]
        admission_items = [
            {
                "n": n,
                "run_id": run.run_id,
                "org": run.org_slug,
                "request_id": run.request_id,
                "dedupe_key": run.dedupe_key,
                "at": run.create_time,
                "rate": limits.requests_per_minute,
                "concurrent": limits.concurrent,
                "daily": limits.daily,
                "monthly": limits.monthly,
                "pipeline_key": run.pipeline_key,
                "pipeline_id": run.pipeline_id,
                "trigger": run.trigger,
                "triggered_by": run.triggered_by,
                "parameters": run.parameters,
                "steps": _steps(run),
                "identity": identity(run),
                "state": run.state,
                "start_time": run.start_time,
            }
            for n, (run, limits) in enumerate(admissions)
        ]
        for attempt in range(3):
            try:
                rows = await self._fetch_kept(_BATCH_SQL, self.replica_id, write_items, admission_items)
                break
            except asyncpg.exceptions.DeadlockDetectedError:
                if attempt == 2:
                    raise
        written = {r["run_id"] for r in rows if r["n"] is None}
        by_n = {
            r["n"]: Admission(r["outcome"], r["run_id"] or "", float(r["wait"] or 0.0))
            for r in rows
            if r["n"] is not None
        }
        return written, [by_n[n] for n in range(len(admissions))]

    # -- reads -------------------------------------------------------------------------------------

    async def get_run(self, org_slug: str, run_id: str) -> Run | None:
        """A run of the org, or None (another org's run is None too)."""
        row = await self._pool.fetchrow(
            "SELECT * FROM runs WHERE run_id = $1 AND org_slug = $2", run_id, org_slug
        )
        return run_from_row(row) if row else None

    async def list_runs(
        self, org_slug: str, *, pipeline_key: str, state: str, before: tuple[datetime, str] | None, limit: int
    ) -> list[Run]:
        """Runs of an org, newest first, strictly before the (create_time, run_id) cursor."""
        where = ["org_slug = $1"]
        args: list[Any] = [org_slug]
        if pipeline_key:
            args.append(pipeline_key)
            where.append(f"pipeline_key = ${len(args)}")
        if state:
            args.append(state)
            where.append(f"state = ${len(args)}")
        if before:
            args += [before[0], before[1]]
            where.append(f"(create_time, run_id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        rows = await self._pool.fetch(
            f"SELECT * FROM runs WHERE {' AND '.join(where)} "
            f"ORDER BY create_time DESC, run_id DESC LIMIT ${len(args)}",
            *args,
        )
        return [run_from_row(r) for r in rows]

    async def request_cancel(self, org_slug: str, run_id: str) -> bool:
        """Ask the replica running an active run of the org to cancel it (it sees it on its next renew)."""
        result: str = await self._pool.execute(
            f"UPDATE runs SET cancel_requested = true WHERE run_id = $1 AND org_slug = $2 "
            f"AND state IN {ACTIVE_SQL}",
            run_id,
            org_slug,
        )
        return result.endswith(" 1")

    async def active_runs(self, org_slug: str) -> int:
        """Runs of the org holding a concurrency slot (its active runs, wherever they run)."""
        n: int = await self._pool.fetchval(
            f"SELECT count(*) FROM runs WHERE org_slug = $1 AND state IN {ACTIVE_SQL}", org_slug
        )
        return n

    async def used(self, org_slug: str, now: datetime | None = None) -> tuple[int, int]:
        """Runs accepted (on the UTC day, in the UTC month of `now`) for the org."""
        now = (now or datetime.now(UTC)).astimezone(UTC)
        rows = await self._pool.fetch(
            "SELECT period, used FROM quota_usage WHERE org_slug = $1 AND period = ANY($2::text[])",
            org_slug,
            [f"D{now:%Y-%m-%d}", f"M{now:%Y-%m}"],
        )
        got = {r["period"][0]: int(r["used"]) for r in rows}
        return got.get("D", 0), got.get("M", 0)

    async def events(self, run_id: str, after: int = 0) -> list[asyncpg.Record]:
        """A run's events after the event id `after`, in the order they were written."""
        return list(
            await self._pool.fetch(
                "SELECT * FROM run_events WHERE run_id = $1 AND event_id > $2 ORDER BY event_id",
                run_id,
                after,
            )
        )

    async def take_token(self, bucket: str, per_second: float, capacity: float, initial: float) -> float:
        """Take a token from a shared bucket: 0 if taken, else the seconds until one will be there."""
        wait: float = await self._pool.fetchval(
            "SELECT take_token($1, $2, $3, $4)", bucket, per_second, capacity, initial
        )
        return wait

    # -- the BigQuery export's outbox --------------------------------------------------------------

    async def unexported(self) -> int:
        """Finished runs whose rows (the run's and its events') are not yet in BigQuery."""
        n: int = await self._pool.fetchval(
            f"SELECT count(*) FROM runs WHERE NOT exported AND state NOT IN {ACTIVE_SQL}"
        )
        return n

    async def export(
        self,
        load: Callable[[str, bytes], Awaitable[None]],
        *,
        lock_key: int,
        limit: int = 2_000,
    ) -> int | None:
        """Hand the events of up to `limit` finished, unexported runs to `load("events", ndjson)`, then
        the runs' rows to `load("runs", ndjson)`, and mark the runs exported once both returned (a run's
        row never goes before its events); the number of runs, or None if another replica is exporting.
        PostgreSQL writes the rows as newline-delimited JSON (`row_to_json`), in the columns of
        `pipeline_run_events` and `pipeline_runs`: no Python object per row."""
        async with self._pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", lock_key):
                return None
            ids = await conn.fetchval(
                f"SELECT array_agg(run_id) FROM (SELECT run_id FROM runs WHERE NOT exported "
                f"AND state NOT IN {ACTIVE_SQL} LIMIT $1) AS r",
                limit,
            )
            if not ids:
                return 0
            events: str | None = await conn.fetchval(_EXPORT_EVENTS_SQL, ids)
            runs: str = await conn.fetchval(_EXPORT_RUNS_SQL, ids)
            await load("events", (events or "").encode())
            await load("runs", runs.encode())
            await conn.execute("UPDATE runs SET exported = true WHERE run_id = ANY($1::text[])", ids)
            return len(ids)


_EXPORT_EVENTS_SQL = f"""
SELECT string_agg(row_to_json(e)::text, E'\\n') FROM (
    SELECT run_id, org_slug, {_EVENT_NAMES}, run FROM run_events WHERE run_id = ANY($1::text[])
) AS e
"""
# parameters and steps are JSON text in BigQuery; the rest as they are.
_EXPORT_RUNS_SQL = """
SELECT string_agg(row_to_json(r)::text, E'\\n') FROM (
    SELECT run_id, org_slug, pipeline_key, pipeline_id, state, trigger, triggered_by, parameters::text AS
        parameters, request_id, create_time, start_time, end_time, reason, error, steps::text AS steps
    FROM runs WHERE run_id = ANY($1::text[])
) AS r
"""


__all__ = ["ACTIVE", "Admission", "Limits", "StateStore", "identity", "run_from_row"]
