"""The scheduler against the real PostgreSQL and the real run manager: exactly one run per (org, pipeline,
scheduled time) with two replicas ticking and the trigger delivered twice, DST in the org's timezone with
an injected clock, missed ticks after downtime, overrides, backfills with bounded concurrency, retries
with backoff for transient failures, none for terminal ones, and deferral by quotas.

Each test has a database of its own (fresh scheduler clock and queue); "replicas" are separate state
stores, run managers and schedulers on it, ticking only for the test's orgs."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from server import app
from server.engine.manager import RunManager, RunRequest
from server.engine.processor import ProcessorRegistry
from server.engine.runner import StepRunner
from server.http.client import HttpSettings, OutboundHttp
from server.localstack.postgres import Postgres
from server.localstack.process import free_port
from server.notify.alert import Alert
from server.notify.config import EmailConfig, NotificationConfig
from server.notify.notifier import Notifier
from server.notify.webhooks import SlackWebhooks
from server.orgs import OrgContext, Plan
from server.providers import ProviderRegistry
from server.scheduler.scheduler import Scheduler, SchedulerSettings
from server.state.notifications import OrgNotificationSettings
from server.state.scheduling import Caps, Job, Override
from server.state.store import StateStore
from tests.conftest import Org, make_org, scratch_database
from tests.integration.standins import SmtpServer, Webhook, self_signed

NIGHTLY = "engine/runs/nightly"
FAILING = "engine/runs/failing"
NEEDS_OPENAI = "engine/runs/needs_openai"
LATE = "engine/runs/late"


@dataclass
class Replica:
    store: StateStore
    runs: RunManager
    scheduler: Scheduler
    alerts: list[Alert]


Factory = Callable[..., Awaitable[Replica]]


@pytest.fixture
async def database(postgres: Postgres) -> AsyncIterator[str]:
    async with scratch_database(postgres, "sched") as url:
        yield url


@pytest.fixture(scope="module")
async def orgs(service: app.Service) -> list[Org]:
    return [await make_org(service, "sched"), await make_org(service, "sched")]


@pytest.fixture
async def replicas(service: app.Service, database: str, orgs: list[Org]) -> AsyncIterator[Factory]:
    made: list[Replica] = []
    slugs = {o.slug for o in orgs}

    async def only_test_orgs(now: datetime) -> list[OrgContext]:
        return [o for o in await service.orgs.active_contexts(now) if o.org_slug in slugs]

    async def make(
        notify: Callable[[Alert], None] | None = None, also: tuple[Org, ...] = (), **settings: object
    ) -> Replica:
        slugs.update(o.slug for o in also)
        store = await StateStore.connect(dsn=database, pool_size=8, lease_seconds=2.0)
        runs = RunManager(
            catalog=service.catalog,
            runner=StepRunner(
                ProcessorRegistry(service.settings.processor_dirs),
                global_limit=asyncio.Semaphore(32),
                per_run_limit=4,
            ),
            store=store,
            warehouse=service.warehouse,
            meta_dataset=service.settings.meta_dataset,
            http=service.http,
            vault=service.vault,
        )
        await runs.start()
        alerts: list[Alert] = []

        def tell(alert: Alert) -> None:
            alerts.append(alert)
            if notify is not None:
                notify(alert)

        defaults: dict[str, object] = {"tick_seconds": 0.0, "poll_seconds": 0.05, "retry_base_seconds": 0.2}
        scheduler = Scheduler(
            catalog=service.catalog,
            runs=runs,
            store=store,
            orgs=only_test_orgs,
            settings=SchedulerSettings(**{**defaults, **settings}),  # type: ignore[arg-type]
            credentials=service.vault.store.holders,
            notify=tell,
        )
        replica = Replica(store, runs, scheduler, alerts)
        made.append(replica)
        return replica

    yield make
    for r in made:
        r.scheduler.stop_claiming()
        await r.runs.close()
        await r.scheduler.close()
        await r.store.close()


def ny(day: int, hour: int, minute: int = 0, month: int = 3) -> datetime:
    """A UTC instant given as New York wall-clock time in 2026 (EST before Mar 8, EDT after)."""
    offset = 5 if (month, day) < (3, 8) or (month, day) > (11, 1) else 4
    return datetime(2026, month, day, hour, minute, tzinfo=UTC) + timedelta(hours=offset)


async def jobs_of(r: Replica, org: Org, pipeline: str = NIGHTLY) -> list[tuple[datetime, str]]:
    return [(j.scheduled_for, j.state) for j in await r.store.scheduling.jobs(org.slug, pipeline)]


async def wait_jobs(
    r: Replica, org: Org, pipeline: str, done: Callable[[list[str]], bool], within: float = 20
) -> list[Job]:
    async with asyncio.timeout(within):
        while True:
            states = [s for _, s in await jobs_of(r, org, pipeline)]
            if done(states):
                return await r.store.scheduling.jobs(org.slug, pipeline)
            await asyncio.sleep(0.05)


async def scheduler_runs(r: Replica, org: Org) -> list[asyncpg.Record]:
    async with r.store.connection() as conn:
        return list(
            await conn.fetch(
                "SELECT run_id, state, parameters, request_id FROM runs WHERE org_slug = $1 "
                "AND trigger = 'SCHEDULER' ORDER BY create_time",
                org.slug,
            )
        )


async def test_exactly_once_with_two_replicas_and_a_doubled_trigger(
    replicas: Factory, orgs: list[Org]
) -> None:
    a, b = await replicas(), await replicas()
    due = ny(8, 3, 0, month=4)  # 02:30 New York fell due half an hour before
    await a.scheduler.tick(due - timedelta(hours=1))  # the clock starts before 02:30
    results = await asyncio.gather(*(r.scheduler.tick(due) for r in (a, b, a, b)))
    assert sum(t.enqueued for t in results) == len(orgs)  # one job per org, whichever tick inserted it
    again = await asyncio.gather(a.scheduler.tick(due), b.scheduler.tick(due + timedelta(seconds=30)))
    assert [t.enqueued for t in again] == [0, 0]
    a.scheduler.start()
    b.scheduler.start()
    for org in orgs:
        jobs = await wait_jobs(a, org, NIGHTLY, lambda s: s == ["SUCCEEDED"])
        assert jobs[0].scheduled_for == ny(8, 2, 30, month=4) and jobs[0].attempts == 1
        runs = await scheduler_runs(a, org)
        assert len(runs) == 1 and runs[0]["state"] == "COMPLETED" and runs[0]["run_id"] == jobs[0].run_id


async def test_dst_neither_skips_nor_doubles(replicas: Factory, orgs: list[Org]) -> None:
    r = await replicas()
    org = orgs[0]
    # Every 20 minutes over four days around each transition, as a ticking replica would; between the two,
    # the replica is down from March to October (the latest missed time runs, once).
    for start in (ny(6, 0), ny(30, 0, month=10)):
        now = start
        await r.scheduler.tick(now)
        for _ in range(4 * 72):
            now += timedelta(minutes=20)
            await r.scheduler.tick(now)
    got = [t for t, _ in await jobs_of(r, org)]
    assert got == [
        ny(6, 2, 30),
        ny(7, 2, 30),
        datetime(2026, 3, 8, 7, 30, tzinfo=UTC),  # 02:30 does not exist: 03:30 EDT, once
        ny(9, 2, 30),
        ny(29, 2, 30, month=10),  # after the downtime: the latest missed time
        ny(30, 2, 30, month=10),
        ny(31, 2, 30, month=10),
        datetime(2026, 11, 1, 7, 30, tzinfo=UTC),  # 02:30 EST on the day clocks go back, once
        ny(2, 2, 30, month=11),
    ], got


async def test_missed_ticks_run_once_for_the_latest(replicas: Factory, orgs: list[Org]) -> None:
    r = await replicas()
    await r.scheduler.tick(ny(1, 0, month=6))
    result = await r.scheduler.tick(ny(5, 12, month=6))  # down for four days and a half
    # Nightly and saas_cost for every org (needs_openai too for an org holding that credential).
    assert result.enqueued >= 2 * len(orgs)
    for org in orgs:
        assert [t for t, _ in await jobs_of(r, org)] == [ny(5, 2, 30, month=6)]
        assert [t for t, _ in await jobs_of(r, org, "saas_subscription/costs/saas_cost")] == [
            datetime(2026, 6, 5, 2, 30, tzinfo=UTC)
        ]


async def test_override_disable_and_back_to_default(replicas: Factory, orgs: list[Org]) -> None:
    r = await replicas()
    jobs = r.store.scheduling
    one, two = orgs
    await jobs.put_override(Override(one.slug, NIGHTLY, "0 6 * * *", "Europe/Berlin", True, {"label": "x"}))
    await jobs.put_override(Override(two.slug, NIGHTLY, "30 2 * * *", "America/New_York", False, {}))
    schedules = dict((c.key, e) for c, e in await r.scheduler.schedules(two.slug))
    assert schedules[NIGHTLY] is not None and schedules[NIGHTLY].source == "OVERRIDE"
    assert not schedules[NIGHTLY].enabled
    assert schedules["engine/runs/quick"] is None  # no default schedule
    await r.scheduler.tick(datetime(2026, 6, 1, tzinfo=UTC))
    await r.scheduler.tick(datetime(2026, 6, 2, tzinfo=UTC))
    assert [t for t, _ in await jobs_of(r, one)] == [datetime(2026, 6, 1, 4, tzinfo=UTC)]  # 06:00 CEST
    assert (await jobs.job(f"S|{one.slug}|{NIGHTLY}|2026-06-01T04:00:00+00:00")).parameters == {"label": "x"}
    assert await jobs_of(r, two) == []
    assert await jobs.delete_override(two.slug, NIGHTLY)
    await r.scheduler.tick(datetime(2026, 6, 3, tzinfo=UTC))
    assert [t for t, _ in await jobs_of(r, two)] == [ny(2, 2, 30, month=6)]


async def test_backfill_one_run_per_day_bounded_and_idempotent(replicas: Factory, orgs: list[Org]) -> None:
    r = await replicas(caps=Caps(total=20, per_org=10))
    org = orgs[0]
    nightly = next(c for c in r.scheduler.scheduled_configs() if c.key == NIGHTLY)
    start = date.today() - timedelta(days=30)
    backfill, inserted = await r.scheduler.backfill(
        org.slug, nightly, start, start + timedelta(days=29), 3, "test"
    )
    assert inserted == 30
    again, inserted_again = await r.scheduler.backfill(
        org.slug, nightly, start, start + timedelta(days=29), 3, "test"
    )
    assert again.backfill_id == backfill.backfill_id and inserted_again == 0
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            async with r.store.connection() as conn:
                n = await conn.fetchval(
                    "SELECT count(*) FROM runs WHERE org_slug = $1 AND state IN ('PENDING', 'RUNNING')",
                    org.slug,
                )
            peak = max(peak, n)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    r.scheduler.start()
    try:
        await wait_jobs(r, org, NIGHTLY, lambda s: len(s) == 30 and set(s) == {"SUCCEEDED"}, within=60)
    finally:
        watcher.cancel()
    assert 1 <= peak <= 3
    runs = await scheduler_runs(r, org)
    days = Counter(run["parameters"]["date"] for run in runs)
    assert len(days) == 30 and set(days.values()) == {1}
    progress = await r.store.scheduling.backfill(org.slug, backfill.backfill_id)
    assert progress is not None and progress.counts == {"SUCCEEDED": 30}


async def test_backfill_cancel(replicas: Factory, orgs: list[Org]) -> None:
    r = await replicas(caps=Caps(total=1, per_org=1))
    org = orgs[1]
    nightly = next(c for c in r.scheduler.scheduled_configs() if c.key == NIGHTLY)
    start = date.today() - timedelta(days=10)
    backfill, _ = await r.scheduler.backfill(org.slug, nightly, start, start + timedelta(days=9), 1, "t")
    cancelled = await r.scheduler.cancel_backfill(org.slug, backfill.backfill_id)
    assert cancelled.cancelled and cancelled.counts == {"CANCELLED": 10}
    r.scheduler.start()
    await asyncio.sleep(0.5)
    assert await scheduler_runs(r, org) == []


async def test_transient_failure_retried_with_backoff_then_failed(replicas: Factory, orgs: list[Org]) -> None:
    r = await replicas(retry_base_seconds=0.3)
    org = orgs[0]
    await r.store.scheduling.put_override(Override(org.slug, LATE, "0 3 * * *", "UTC", True, {}))
    await r.scheduler.tick(datetime(2026, 7, 1, 2, 59, tzinfo=UTC))
    assert (await r.scheduler.tick(datetime(2026, 7, 1, 3, 0, 30, tzinfo=UTC))).enqueued == 1
    r.scheduler.start()
    [job] = await wait_jobs(r, org, LATE, lambda s: s == ["FAILED"])
    assert job.attempts == 3 and job.reason == "PIPELINE_TIMEOUT"
    runs = [x for x in await scheduler_runs(r, org) if x["request_id"].startswith(f"job-{job.job_id}-")]
    assert [x["state"] for x in runs] == ["TIMEOUT"] * 3
    assert [x["request_id"] for x in runs] == [f"job-{job.job_id}-{n}" for n in (1, 2, 3)]
    assert [(a.event, a.org_slug, a.attempt) for a in r.alerts] == [("RUN_TIMED_OUT", org.slug, 3)]
    # The next day it is told to hurry: it succeeds, and that is news after a failure.
    await r.store.scheduling.put_override(Override(org.slug, LATE, "0 3 * * *", "UTC", True, {"nap": "0"}))
    await r.scheduler.tick(datetime(2026, 7, 2, 3, 0, 30, tzinfo=UTC))
    await wait_jobs(r, org, LATE, lambda s: s == ["FAILED", "SUCCEEDED"])
    # (The day's tick also ran the other scheduled pipeline of both orgs; only this one's alerts count.)
    assert [(a.event, a.state) for a in r.alerts if a.pipeline_key == LATE] == [
        ("RUN_TIMED_OUT", "TIMEOUT"),
        ("RUN_RECOVERED", "COMPLETED"),
    ]


async def test_quota_defers_and_does_not_drop(
    replicas: Factory, service: app.Service, orgs: list[Org]
) -> None:
    r = await replicas()
    org = orgs[1]
    # Fill the org's concurrent limit with active runs of another replica, so the job is refused.
    blocker = await replicas()

    ctx = next(o for o in await service.orgs.active_contexts(datetime.now(UTC)) if o.org_slug == org.slug)
    held = [
        await blocker.runs.submit(
            ctx, RunRequest("engine", "runs", "sleepy", parameters={"sleep": "30", "n": str(i)}), "t"
        )
        for i in range(ctx.concurrent_limit)
    ]
    nightly = next(c for c in r.scheduler.scheduled_configs() if c.key == NIGHTLY)
    day = date.today() - timedelta(days=1)
    await r.scheduler.backfill(org.slug, nightly, day, day, 1, "t")
    r.scheduler.start()
    [job] = await wait_jobs(r, org, NIGHTLY, lambda s: s == ["QUEUED"], within=5)
    async with asyncio.timeout(5):
        while job.deferrals == 0:
            await asyncio.sleep(0.05)
            found = await r.store.scheduling.job(job.job_key)
            assert found is not None
            job = found
    assert job.state == "QUEUED" and job.attempts == 0
    assert job.reason == "CONCURRENT_LIMIT_EXCEEDED"
    for run in held:
        await blocker.runs.cancel(org.slug, run.run_id)
    async with r.store.connection() as conn:  # no waiting for the deferral's 5 s
        await conn.execute("UPDATE scheduled_jobs SET run_after = now() WHERE job_id = $1", job.job_id)
    [done] = await wait_jobs(r, org, NIGHTLY, lambda s: s == ["SUCCEEDED"])
    assert done.attempts == 1 and done.deferrals >= 1


@pytest.mark.parametrize("mail_server", ["up", "refused"])
async def test_a_failing_scheduled_run_notifies_and_is_never_affected_by_it(
    replicas: Factory,
    service: app.Service,
    database: str,
    orgs: list[Org],
    tmp_path: Path,
    mail_server: str,
) -> None:
    smtp = SmtpServer(*self_signed(tmp_path))
    await smtp.start()
    hook = Webhook()
    await hook.start()
    store = await StateStore.connect(dsn=database, pool_size=2)
    config = NotificationConfig(
        enabled=True,
        email=EmailConfig(
            smtp_host="127.0.0.1",
            smtp_port=smtp.port if mail_server == "up" else free_port(),
            username="svc",
            password="s3cret",
            sender="pipelines@cloudact.test",
            default_recipients=["admin@cloudact.test"],
            timeout_seconds=1.0,
            ca_file=str(smtp.cert),
        ),
        backoff_seconds=0.05,
    )
    org = orgs[0]
    registry = ProviderRegistry.load(
        service.settings.providers_file, {"PROVIDER_BASE_URL_SLACK": hook.url.split("/services/")[0]}
    )
    http = OutboundHttp(registry, HttpSettings(max_attempts=2, backoff_initial=0.01, backoff_max=0.05))
    slack = SlackWebhooks(service.vault, http)
    await store.notifications.put_settings(
        OrgNotificationSettings(
            org.slug,
            ["ops@acme.test"],
            ["RUN_FAILED"],
            3600,
            {},
            slack_webhook=await slack.put(org.slug, hook.url),
        )
    )
    notifier = Notifier(config, store.notifications, slack=slack)
    r = await replicas(notify=notifier.publish)
    failing = next(c for c in r.scheduler.scheduled_configs() if c.key == FAILING)
    day = date.today() - timedelta(days=2)
    await r.scheduler.backfill(org.slug, failing, day, day, 1, "t")
    r.scheduler.start()
    [job] = await wait_jobs(r, org, FAILING, lambda s: s == ["FAILED"])
    await notifier.drain()
    # The run and the job are the same whether the mail server answers or not.
    assert job.attempts == 1 and job.reason == "WAREHOUSE_NOT_FOUND", job
    runs = await scheduler_runs(r, org)
    assert [x["state"] for x in runs if x["run_id"] == job.run_id] == ["FAILED"]
    log = {
        e.channel: (e.outcome, e.reason)
        for e in await store.notifications.entries(org.slug, before=None, limit=9)
    }
    assert log["SLACK"] == ("SENT", "") and job.run_id in hook.received[0]["text"]
    if mail_server == "up":
        [mail] = smtp.received
        assert job.run_id in mail.content and "WAREHOUSE_NOT_FOUND" in mail.content and mail.tls
        assert log["EMAIL"] == ("SENT", "")
    else:
        assert smtp.received == [] and log["EMAIL"] == ("FAILED", "SMTP_UNREACHABLE")
    await notifier.close()
    await http.close()
    await store.close()
    await hook.stop()
    await smtp.stop()


async def test_a_job_of_a_replica_without_a_lease_goes_back_to_the_queue(
    replicas: Factory, orgs: list[Org]
) -> None:
    r = await replicas()
    org = orgs[1]
    nightly = next(c for c in r.scheduler.scheduled_configs() if c.key == NIGHTLY)
    day = date.today() - timedelta(days=3)
    await r.scheduler.backfill(org.slug, nightly, day, day, 1, "t")
    [claimed] = await r.store.scheduling.claim("ghost-replica", Caps(total=10, per_org=10), 10)
    assert claimed.state == "RUNNING" and claimed.attempts == 1
    assert await r.store.scheduling.claim(r.store.replica_id, Caps(total=10, per_org=10), 10) == []
    assert await r.store.scheduling.reap(timedelta(0)) == 1
    job = await r.store.scheduling.job(claimed.job_key)
    assert job is not None and (job.state, job.reason, job.owner) == ("QUEUED", "INTERRUPTED", "")
    r.scheduler.start()
    [done] = await wait_jobs(r, org, NIGHTLY, lambda s: s == ["SUCCEEDED"])
    assert done.attempts == 2 and done.run_id and done.owner == r.store.replica_id


async def test_a_default_schedule_applies_to_the_orgs_holding_what_it_needs(
    replicas: Factory, service: app.Service, orgs: list[Org]
) -> None:
    holder, other = orgs
    await service.vault.store.set(holder.slug, "openai", {"admin_api_key": "sk-admin-0123456789abcdef"})
    r = await replicas()
    mine = dict((c.key, e) for c, e in await r.scheduler.schedules(holder.slug))
    theirs = dict((c.key, e) for c, e in await r.scheduler.schedules(other.slug))
    assert mine[NEEDS_OPENAI] is not None and mine[NEEDS_OPENAI].source == "DEFAULT"
    assert theirs[NEEDS_OPENAI] is None
    await r.scheduler.tick(datetime(2026, 8, 1, 3, 59, tzinfo=UTC))
    await r.scheduler.tick(datetime(2026, 8, 1, 4, 0, 30, tzinfo=UTC))
    assert [t for t, _ in await jobs_of(r, holder, NEEDS_OPENAI)] == [datetime(2026, 8, 1, 4, tzinfo=UTC)]
    assert await jobs_of(r, other, NEEDS_OPENAI) == []


async def test_a_daily_quota_defers_and_tells_the_org(replicas: Factory, service: app.Service) -> None:
    org = await make_org(service, "sched", plan=Plan(daily_limit=1))
    r = await replicas(also=(org,))
    nightly = next(c for c in r.scheduler.scheduled_configs() if c.key == NIGHTLY)
    day = date.today() - timedelta(days=5)
    await r.scheduler.backfill(org.slug, nightly, day, day + timedelta(days=1), 2, "t")
    r.scheduler.start()
    jobs = await wait_jobs(r, org, NIGHTLY, lambda s: sorted(s) == ["QUEUED", "SUCCEEDED"])
    for _ in range(200):  # the alert is handed over right after the deferral is written
        if any(a.event == "QUOTA_EXCEEDED" for a in r.alerts):
            break
        await asyncio.sleep(0.05)
    [deferred] = [j for j in await r.store.scheduling.jobs(org.slug, NIGHTLY) if j.state == "QUEUED"]
    assert deferred.attempts == 0 and deferred.deferrals >= 1 and deferred.reason == "DAILY_LIMIT_EXCEEDED"
    assert deferred.run_after > datetime.now(UTC) + timedelta(minutes=30)  # next UTC day, capped at 1 h
    [alert] = [a for a in r.alerts if a.event == "QUOTA_EXCEEDED"]
    assert (alert.org_slug, alert.reason, alert.run_id) == (org.slug, "DAILY_LIMIT_EXCEEDED", "")
    assert len(jobs) == 2
