"""Contract of the state store against the real PostgreSQL, under real concurrency: admission (concurrent,
daily, monthly and rate limits, idempotency, the duplicate guard), the slot given back exactly once
whatever the run's end, leases and the closing of a dead replica's runs, the shared token bucket, and the
migrations. "Replicas" here are separate stores, each with its own connection pool and lease.

The module has a database of its own on the session's PostgreSQL, so the session service's sweeper (which
closes runs of replicas without a lease) never touches these runs.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from server.engine.run import Run, StepView
from server.ids import new_id
from server.localstack.postgres import Postgres
from server.state import migrate
from server.state.store import Admission, Limits, StateStore
from tests.conftest import scratch_database

MANY = 1_000_000
Factory = Callable[..., Awaitable[StateStore]]


@pytest.fixture(scope="module")
async def database(postgres: Postgres) -> AsyncIterator[str]:
    async with scratch_database(postgres, "contract") as url:
        yield url


@pytest.fixture
async def replicas(database: str) -> AsyncIterator[Factory]:
    """Make registered stores ("replicas") on the module's database; all closed at the end."""
    made: list[StateStore] = []

    async def make(lease: float = 60.0, register: bool = True, commit_delay: float = 0.0) -> StateStore:
        store = await StateStore.connect(
            dsn=database, pool_size=10, lease_seconds=lease, commit_delay=commit_delay
        )
        made.append(store)
        if register:
            await store.register(new_id())
        return store

    yield make
    for store in made:
        await store.close()


def org_slug(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def new_run(org: str, *, dedupe: str = "", request_id: str = "", at: datetime | None = None) -> Run:
    return Run(
        run_id=new_id(),
        org_slug=org,
        pipeline_key="engine/runs/quick",
        pipeline_id="quick",
        trigger="API",
        triggered_by="test",
        parameters={"p": dedupe or "x"},
        request_id=request_id,
        create_time=at or datetime.now(UTC),
        dedupe_key=dedupe or uuid.uuid4().hex,
        steps={"only": StepView("only", "generic.noop")},
    )


def limits(concurrent: int = MANY, daily: int = MANY, monthly: int = MANY, rate: int = MANY) -> Limits:
    return Limits(requests_per_minute=rate, concurrent=concurrent, daily=daily, monthly=monthly)


async def end(store: StateStore, run: Run, state: str = "COMPLETED") -> bool:
    run.state, run.end_time = state, datetime.now(UTC)
    event = {"kind": "RUN_TRANSITION", "from_state": "PENDING", "to_state": state, "at": run.end_time}
    return await store.write(run, [event])


async def admit_all(stores: list[StateStore], runs: list[Run], lim: Limits) -> list[Admission]:
    """Admit the runs at once, alternating between the stores."""
    return list(
        await asyncio.gather(*(stores[i % len(stores)].admit(run, lim) for i, run in enumerate(runs)))
    )


# --- admission ------------------------------------------------------------------------------------------


async def test_concurrent_limit_holds_across_replicas(replicas: Factory) -> None:
    a, b = await replicas(), await replicas()
    org = org_slug("concur")
    results = await admit_all([a, b], [new_run(org) for _ in range(40)], limits(concurrent=3))
    assert Counter(r.outcome for r in results) == {"ACCEPTED": 3, "CONCURRENT_LIMIT_EXCEEDED": 37}
    assert await a.active_runs(org) == 3 and await b.active_runs(org) == 3
    assert await a.used(org) == (3, 3)  # refusals count nothing


async def test_batches_of_many_orgs_from_two_replicas_hold_each_orgs_limit(replicas: Factory) -> None:
    # Admissions asked for together go out as one statement per replica; batches of the two replicas
    # lock the same orgs, in any order of arrival, without deadlocking and without overshooting.
    a, b = await replicas(), await replicas()
    orgs = [org_slug(f"batch{i}") for i in range(8)]
    runs = [new_run(orgs[(i * 7) % 8]) for i in range(160)]
    results = await admit_all([a, b], runs, limits(concurrent=5))
    per_org = Counter(run.org_slug for run, r in zip(runs, results, strict=True) if r.outcome == "ACCEPTED")
    assert per_org == dict.fromkeys(orgs, 5)
    assert Counter(r.outcome for r in results) == {"ACCEPTED": 40, "CONCURRENT_LIMIT_EXCEEDED": 120}
    assert [await a.active_runs(org) for org in orgs] == [5] * 8


async def test_slot_is_given_back_exactly_once_whatever_the_end(replicas: Factory) -> None:
    a, b = await replicas(), await replicas(lease=1.0)
    org = org_slug("release")
    lim = limits(concurrent=4)
    runs = [new_run(org) for _ in range(4)]
    admitted = [await (a if i < 3 else b).admit(run, lim) for i, run in enumerate(runs)]
    assert [r.outcome for r in admitted] == ["ACCEPTED"] * 4
    assert (await a.admit(new_run(org), lim)).outcome == "CONCURRENT_LIMIT_EXCEEDED"

    # Completed, failed and cancelled: each end written twice at once, only one write counts.
    for run, state in zip(runs[:3], ("COMPLETED", "FAILED", "CANCELLED"), strict=True):
        twice = await asyncio.gather(end(a, run, state), end(a, run, state))
        assert sorted(twice) == [False, True], state
    assert await a.active_runs(org) == 1
    # Interrupted: b stops renewing; after its lease expired, a closes its run.
    await asyncio.sleep(1.2)
    assert runs[3].run_id in await a.sweep()
    assert await a.active_runs(org) == 0
    assert not await end(b, runs[3]), "a closed run cannot be written by its old owner"
    assert await a.active_runs(org) == 0

    # Four slots again, no more.
    more = await admit_all([a], [new_run(org) for _ in range(6)], lim)
    assert Counter(r.outcome for r in more) == {"ACCEPTED": 4, "CONCURRENT_LIMIT_EXCEEDED": 2}


async def test_one_request_id_makes_one_run_across_replicas(replicas: Factory) -> None:
    a, b = await replicas(), await replicas()
    org, other = org_slug("idem"), org_slug("idemother")
    runs = [new_run(org, request_id="nightly-1") for _ in range(20)]
    results = await admit_all([a, b], runs, limits())
    accepted = [r for r in results if r.outcome == "ACCEPTED"]
    assert len(accepted) == 1
    assert {(r.outcome, r.run_id) for r in results if r.outcome != "ACCEPTED"} == {
        ("REPLAY", accepted[0].run_id)
    }
    assert await a.used(org) == (1, 1)
    # After the run ended it is still the same run; another org's equal request id is its own run.
    stored = await a.get_run(org, accepted[0].run_id)
    assert stored is not None and stored.request_id == "nightly-1"
    owner = [a, b][[r.run_id for r in runs].index(accepted[0].run_id) % 2]
    assert await end(owner, stored)
    again = await b.admit(new_run(org, request_id="nightly-1"), limits())
    assert (again.outcome, again.run_id) == ("REPLAY", accepted[0].run_id)
    theirs = await b.admit(new_run(other, request_id="nightly-1"), limits())
    assert theirs.outcome == "ACCEPTED" and theirs.run_id != accepted[0].run_id


async def test_duplicate_guard_allows_one_active_run(replicas: Factory) -> None:
    a, b = await replicas(), await replicas()
    org = org_slug("dupe")
    runs = [new_run(org, dedupe=f"{org}-same") for _ in range(20)]
    results = await admit_all([a, b], runs, limits())
    accepted = [r.run_id for r in results if r.outcome == "ACCEPTED"]
    assert len(accepted) == 1
    assert {(r.outcome, r.run_id) for r in results if r.outcome != "ACCEPTED"} == {("ACTIVE", accepted[0])}
    winner = next(r for r in runs if r.run_id == accepted[0])
    owner = a if runs.index(winner) % 2 == 0 else b
    assert await end(owner, winner)
    later = await a.admit(new_run(org, dedupe=f"{org}-same"), limits())
    assert later.outcome == "ACCEPTED"


async def test_daily_and_monthly_quotas_exact_across_replicas_and_midnight(replicas: Factory) -> None:
    a, b = await replicas(), await replicas()
    org = org_slug("quota")
    lim = limits(daily=5, monthly=7)
    before_midnight = datetime(2026, 1, 30, 23, 59, 59, 900_000, tzinfo=UTC)
    next_day = datetime(2026, 1, 31, 0, 0, 0, 100_000, tzinfo=UTC)
    next_month = datetime(2026, 2, 1, 0, 0, 0, 100_000, tzinfo=UTC)

    day1 = await admit_all([a, b], [new_run(org, at=before_midnight) for _ in range(20)], lim)
    assert Counter(r.outcome for r in day1) == {"ACCEPTED": 5, "DAILY_LIMIT_EXCEEDED": 15}
    day2 = await admit_all([a, b], [new_run(org, at=next_day) for _ in range(20)], lim)
    assert Counter(r.outcome for r in day2) == {"ACCEPTED": 2, "MONTHLY_LIMIT_EXCEEDED": 18}
    day3 = await admit_all([a, b], [new_run(org, at=next_month) for _ in range(20)], lim)
    assert Counter(r.outcome for r in day3) == {"ACCEPTED": 5, "DAILY_LIMIT_EXCEEDED": 15}

    assert await a.used(org, before_midnight) == (5, 7)
    assert await b.used(org, next_day) == (2, 7)
    assert await a.used(org, next_month) == (5, 5)
    # A run counts on the day it was accepted: ending after midnight changes nothing.
    assert await a.used(org, next_month + timedelta(hours=1)) == (5, 5)


async def test_one_batch_of_two_orgs_and_two_days_counts_each_org_and_day_exactly(
    replicas: Factory,
) -> None:
    # One statement admits all 32 (asked for together on one replica), the orgs and days interleaved:
    # each org's counters are read once per org and day and written back before the next.
    a = await replicas()
    orgs = [org_slug("mixa"), org_slug("mixb")]
    days = [datetime(2026, 3, 9, 23, 59, 59, tzinfo=UTC), datetime(2026, 3, 10, 0, 0, 1, tzinfo=UTC)]
    runs = [new_run(orgs[i % 2], at=days[(i // 2) % 2]) for i in range(32)]
    results = await admit_all([a], runs, limits(daily=3, monthly=5))
    outcomes = Counter(
        (run.org_slug, run.create_time.day, r.outcome) for run, r in zip(runs, results, strict=True)
    )
    for org in orgs:
        assert outcomes[(org, 9, "ACCEPTED")] == 3 and outcomes[(org, 9, "DAILY_LIMIT_EXCEEDED")] == 5
        assert outcomes[(org, 10, "ACCEPTED")] == 2 and outcomes[(org, 10, "MONTHLY_LIMIT_EXCEEDED")] == 6
        assert await a.used(org, days[0]) == (3, 5)
        assert await a.used(org, days[1]) == (2, 5)
        assert await a.active_runs(org) == 5


async def test_a_slot_freed_by_a_write_serves_an_admission_of_the_same_batch(replicas: Factory) -> None:
    # A run's end and another run's admission asked for together go out as one statement, the writes
    # first: the slot the end gives back is there for the admission.
    a = await replicas()
    org = org_slug("handover")
    lim = limits(concurrent=1)
    first, second = new_run(org), new_run(org)
    assert (await a.admit(first, lim)).outcome == "ACCEPTED"
    assert (await a.admit(new_run(org), lim)).outcome == "CONCURRENT_LIMIT_EXCEEDED"
    ended, admitted = await asyncio.gather(end(a, first), a.admit(second, lim))
    assert ended and admitted.outcome == "ACCEPTED"
    assert await a.active_runs(org) == 1


async def test_a_lone_admission_goes_out_at_once_whatever_the_commit_delay(replicas: Factory) -> None:
    a = await replicas(commit_delay=1.0)
    org = org_slug("lone")
    for _ in range(3):  # one call after the other: each batch carries one entry, none waits
        began = time.monotonic()
        assert (await a.admit(new_run(org), limits())).outcome == "ACCEPTED"
        assert time.monotonic() - began < 0.5


async def test_under_concurrent_calls_the_commit_delay_groups_what_arrives(replicas: Factory) -> None:
    # Four admissions queued behind a batch in flight say calls are concurrent: the next batch goes out
    # a commit delay after that one was sent, with the admission asked for meanwhile.
    delay = 0.3
    a = await replicas(commit_delay=delay)
    org = org_slug("grouped")
    before = a.batches
    began = time.monotonic()

    async def admit_timed() -> tuple[Admission, float]:
        asked = time.monotonic()
        return await a.admit(new_run(org), limits()), time.monotonic() - asked

    first = asyncio.gather(a.admit(new_run(org), limits()), a.admit(new_run(org), limits()))
    await asyncio.sleep(0)  # the first batch is on its way
    queued = [asyncio.create_task(admit_timed()) for _ in range(4)]
    await asyncio.sleep(0.05)
    late = asyncio.create_task(admit_timed())
    assert [r.outcome for r in await first] == ["ACCEPTED", "ACCEPTED"]
    results = [await t for t in [*queued, late]]
    assert [r.outcome for r, _ in results] == ["ACCEPTED"] * 5
    assert a.batches - before == 2, "the five later admissions went out as one statement"
    assert time.monotonic() - began >= delay * 0.9
    assert results[0][1] >= delay * 0.5  # the queued ones waited for the late one


async def test_callers_taking_turns_are_not_delayed(replicas: Factory) -> None:
    # Two callers, each asking again as soon as it is answered: fewer than four entries are ever queued
    # behind a batch, so no batch waits for the commit delay.
    a = await replicas(commit_delay=0.5)
    org = org_slug("turns")

    async def caller() -> None:
        for _ in range(5):
            run = new_run(org)
            assert (await a.admit(run, limits())).outcome == "ACCEPTED"
            assert await end(a, run)

    began = time.monotonic()
    await asyncio.gather(caller(), caller())
    assert time.monotonic() - began < 0.5


async def test_rate_limit_is_shared_by_the_replicas(replicas: Factory) -> None:
    a, b = await replicas(), await replicas()
    org = org_slug("rate")
    results = await admit_all([a, b], [new_run(org) for _ in range(40)], limits(rate=10))
    assert Counter(r.outcome for r in results) == {"ACCEPTED": 10, "RATE_LIMITED": 30}
    waits = [r.wait for r in results if r.outcome == "RATE_LIMITED"]
    assert all(0 < w <= 6.0 for w in waits), waits  # one token comes back every 6 s


async def test_replay_and_duplicates_take_no_rate_token(replicas: Factory) -> None:
    a = await replicas()
    org = org_slug("ratefree")
    first = new_run(org, dedupe=f"{org}-d", request_id="r1")
    assert (await a.admit(first, limits(rate=2))).outcome == "ACCEPTED"
    for _ in range(5):
        assert (await a.admit(new_run(org, request_id="r1"), limits(rate=2))).outcome == "REPLAY"
        assert (await a.admit(new_run(org, dedupe=f"{org}-d"), limits(rate=2))).outcome == "ACTIVE"
    assert (await a.admit(new_run(org), limits(rate=2))).outcome == "ACCEPTED"
    assert (await a.admit(new_run(org), limits(rate=2))).outcome == "RATE_LIMITED"


async def test_a_run_admitted_running_has_both_transitions_in_the_admission(replicas: Factory) -> None:
    a, b = await replicas(), await replicas()
    org = org_slug("started")
    run = new_run(org)
    run.state, run.start_time = "RUNNING", run.create_time
    assert (await a.admit(run, limits(concurrent=1))).outcome == "ACCEPTED"
    stored = await b.get_run(org, run.run_id)  # another replica sees it RUNNING, without a second write
    assert stored is not None and (stored.state, stored.start_time) == ("RUNNING", run.create_time)
    transitions = [(e["from_state"], e["to_state"], e["at"]) for e in await b.events(run.run_id)]
    assert transitions == [(None, "PENDING", run.create_time), ("PENDING", "RUNNING", run.create_time)]
    assert (await b.admit(new_run(org), limits(concurrent=1))).outcome == "CONCURRENT_LIMIT_EXCEEDED"
    assert await end(a, run)
    assert await b.active_runs(org) == 0
    assert [e["to_state"] for e in await b.events(run.run_id)] == ["PENDING", "RUNNING", "COMPLETED"]


async def test_the_previous_releases_admission_still_works_during_a_rolling_upgrade(
    replicas: Factory, database: str
) -> None:
    # 0005 adds an overload of admit_run(); a replica of the previous release calls 0001's signature.
    a = await replicas()
    org = org_slug("rolling")
    run = new_run(org)
    conn = await asyncpg.connect(database)
    try:
        row = await conn.fetchrow(
            "SELECT * FROM admit_run($1, $2, '', $3, $4, $5, 100, 10, 100, 1000, 'engine/runs/quick', "
            "'quick', 'API', 'old', '{}'::jsonb, '[]'::jsonb, '{}')",
            run.run_id,
            org,
            run.dedupe_key,
            a.replica_id,
            run.create_time,
        )
    finally:
        await conn.close()
    assert row is not None and (row["outcome"], row["run_id"]) == ("ACCEPTED", run.run_id)
    stored = await a.get_run(org, run.run_id)
    assert stored is not None and stored.state == "PENDING" and stored.start_time is None
    assert [e["to_state"] for e in await a.events(run.run_id)] == ["PENDING"]


async def test_an_admitted_run_is_started_even_when_its_caller_went_away(replicas: Factory) -> None:
    a = await replicas()
    org = org_slug("gone")
    started: list[str] = []
    all_started = asyncio.Event()
    runs = [new_run(org) for _ in range(5)]
    refused = new_run(org, dedupe=runs[0].dedupe_key)  # a duplicate of the first: never started

    def on_accept(run: Run) -> None:
        started.append(run.run_id)
        if len(started) == len(runs):
            all_started.set()

    calls = [
        asyncio.ensure_future(a.admit(run, limits(), on_accept=lambda run=run: on_accept(run)))
        for run in [*runs, refused]
    ]
    await asyncio.sleep(0)  # the admissions are queued; their callers go away before the commit
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    async with asyncio.timeout(10):
        await all_started.wait()
    await asyncio.sleep(0.2)
    assert sorted(started) == sorted(r.run_id for r in runs)  # each once, the refused one never
    assert await a.active_runs(org) == len(runs)


async def test_admissions_are_started_outside_any_callers_context(replicas: Factory) -> None:
    # The batch that starts accepted runs serves every caller: it must not run in the first caller's
    # context (its request id, its principal), or runs would carry another caller's log fields.
    a = await replicas()
    org = org_slug("context")
    caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="")
    seen: list[str] = []

    async def call(name: str) -> str:
        caller.set(name)
        run = new_run(org)
        return (await a.admit(run, limits(), on_accept=lambda: seen.append(caller.get()))).outcome

    assert await asyncio.gather(call("first"), call("second")) == ["ACCEPTED", "ACCEPTED"]
    assert seen == ["", ""]


async def test_a_broken_connection_of_a_batch_loop_is_replaced(replicas: Factory, database: str) -> None:
    a = await replicas()
    org = org_slug("broken")
    run = new_run(org)
    assert (await a.admit(run, limits())).outcome == "ACCEPTED"
    run.state = "RUNNING"
    assert await a.write(run, [])  # the batch loop now keeps a connection
    admin = await asyncpg.connect(database)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert killed >= 1
    finally:
        await admin.close()
    await asyncio.sleep(0.2)
    outcomes: list[str] = []
    for _ in range(2):  # a kept connection known closed is replaced; one killed unnoticed fails once
        try:
            outcomes.append((await a.admit(new_run(org), limits())).outcome)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            outcomes.append(type(exc).__name__)
    assert outcomes[-1] == "ACCEPTED", outcomes
    written = False
    for _ in range(2):
        try:
            written = await end(a, run)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            continue
        break
    assert written
    assert await a.active_runs(org) == len([o for o in outcomes if o == "ACCEPTED"])


# --- leases ---------------------------------------------------------------------------------------------


async def test_runs_of_a_live_replica_are_never_closed(replicas: Factory) -> None:
    a, b = await replicas(lease=1.0), await replicas()
    org = org_slug("alive")
    run = new_run(org)
    assert (await a.admit(run, limits())).outcome == "ACCEPTED"
    for _ in range(6):  # 1.8 s, longer than the lease, renewed every 0.3 s
        await asyncio.sleep(0.3)
        assert await a.renew() == []
        assert run.run_id not in await b.sweep()
    stored = await b.get_run(org, run.run_id)
    assert stored is not None and stored.state == "PENDING"


async def test_a_dead_replicas_runs_are_closed_once_after_its_lease_expired(replicas: Factory) -> None:
    dead, b, c = await replicas(lease=1.5), await replicas(), await replicas()
    org = org_slug("dead")
    runs = [new_run(org) for _ in range(3)]
    for run in runs:
        assert (await dead.admit(run, limits())).outcome == "ACCEPTED"
    running = runs[0]
    running.state, running.start_time = "RUNNING", datetime.now(UTC)
    running.steps["only"].state = "RUNNING"
    assert await dead.write(running, [])
    assert not {r.run_id for r in runs} & {*(await b.sweep()), *(await c.sweep())}  # not yet expired

    loop = asyncio.get_running_loop()
    began = loop.time()
    ours = {r.run_id for r in runs}
    closed: list[str] = []  # by either replica; runs left by earlier tests' replicas may be among them
    while not ours <= set(closed) and loop.time() - began < 5:  # two replicas race to close them
        for swept in await asyncio.gather(b.sweep(), c.sweep()):
            closed += swept
        await asyncio.sleep(0.05)
    assert Counter(r for r in closed if r in ours) == dict.fromkeys(ours, 1)  # each once
    assert loop.time() - began > 1.0  # only after the lease ran out
    assert not ours & {*(await b.sweep()), *(await c.sweep())}

    stored = await b.get_run(org, running.run_id)
    assert stored is not None and (stored.state, stored.reason) == ("FAILED", "INTERRUPTED")
    assert stored.steps["only"].state == "NOT_RUN" and stored.end_time is not None
    transitions = [(e["from_state"], e["to_state"]) for e in await b.events(running.run_id)]
    assert transitions == [(None, "PENDING"), ("RUNNING", "FAILED")]
    assert await b.active_runs(org) == 0
    # The dead replica, should it come back: its lease is gone and its writes are refused.
    assert await dead.renew() is None
    running.state = "COMPLETED"
    assert not await dead.write(
        running, [{"kind": "RUN_TRANSITION", "to_state": "COMPLETED", "at": datetime.now(UTC)}]
    )
    assert len(await b.events(running.run_id)) == 2


async def test_cancel_requested_on_another_replica_reaches_the_owner(replicas: Factory) -> None:
    owner, other = await replicas(), await replicas()
    org = org_slug("remote")
    run = new_run(org)
    assert (await owner.admit(run, limits())).outcome == "ACCEPTED"
    assert await owner.renew() == []
    assert await other.request_cancel(org, run.run_id)
    assert not await other.request_cancel(org_slug("stranger"), run.run_id)
    assert await owner.renew() == [run.run_id]
    assert await end(owner, run, "CANCELLED")
    assert await owner.renew() == []
    assert not await other.request_cancel(org, run.run_id)  # ended: nothing to cancel


# --- token bucket and migrations ------------------------------------------------------------------------


async def test_token_bucket_starts_with_its_initial_tokens_and_refills(replicas: Factory) -> None:
    a, b = await replicas(register=False), await replicas(register=False)
    bucket = f"test:{uuid.uuid4().hex}"
    first = await asyncio.gather(*(s.take_token(bucket, 2.0, 3.0, 1.0) for s in (a, b) for _ in range(5)))
    assert sorted(w == 0 for w in first) == [False] * 9 + [True]
    await asyncio.sleep(0.6)  # 1.2 tokens came back
    again = await asyncio.gather(*(s.take_token(bucket, 2.0, 3.0, 1.0) for s in (a, b) for _ in range(5)))
    assert sum(w == 0 for w in again) == 1


async def test_migrations_apply_once_when_replicas_start_together(postgres: Postgres) -> None:
    async with scratch_database(postgres, "migrations") as url:
        conns = [await asyncpg.connect(url) for _ in range(3)]
        try:
            applied = await asyncio.gather(*(migrate.upgrade(c) for c in conns))
            assert sorted(len(a) for a in applied) == [0, 0, len(migrate.available())]
            status = await migrate.status(conns[0])
            assert [m.version for m in status] == [m.version for m in migrate.available()]
            assert all(m.applied_at is not None for m in status)
            await conns[0].execute("UPDATE schema_migrations SET checksum = 'changed' WHERE version = 1")
            with pytest.raises(RuntimeError, match="changed after it was applied"):
                await migrate.upgrade(conns[1])
        finally:
            for conn in conns:
                await conn.close()
