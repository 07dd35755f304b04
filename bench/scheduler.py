"""The scheduler at scale: ORGS orgs x 3 pipelines due at the same minute.

Two replicas (each its own state store pool, run manager and scheduler, in this process) tick at the
same instant, twice each, against one PostgreSQL (pgserver, not durable); then both execute the queue
(`generic.noop` runs) at the configured global concurrency for at most EXECUTE_SECONDS. Prints the
enqueue time, jobs and runs per scheduled time (duplicates), the most jobs seen running at once, and the
start lag (claim time minus enqueue time) p50 / p99 of the jobs started.

    python -m bench.scheduler [ORGS] [EXECUTE_SECONDS]
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from server import app
from server.engine.manager import RunManager
from server.engine.processor import ProcessorRegistry
from server.engine.runner import StepRunner
from server.localstack.postgres import Postgres
from server.localstack.process import free_port
from server.orgs import OrgContext
from server.pipelines.catalog import PipelineCatalog
from server.providers import ProviderRegistry
from server.scheduler.scheduler import Scheduler, SchedulerSettings
from server.settings import load_settings
from server.state.scheduling import Caps
from server.state.store import StateStore
from server.warehouse.bigquery import BigQueryWarehouse

CONFIGS = Path(__file__).parent / "configs" / "scheduler"
GLOBAL_CAP = 50
PER_ORG_CAP = 2


def orgs(n: int) -> list[OrgContext]:
    return [
        OrgContext(f"org_{i:05d}", "", f"org_{i:05d}_local", frozenset(), 10**6, 10**7, 10, 10**6)
        for i in range(n)
    ]


async def main(n_orgs: int, execute_seconds: float) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-sched-"))
    pg = Postgres(port=free_port(), data_dir=folder / "data", log_path=folder / "pg.log", durable=False)
    contexts = orgs(n_orgs)

    async def source(now: datetime) -> list[OrgContext]:
        return contexts

    catalog = PipelineCatalog.load(CONFIGS)
    settings = load_settings(state_dir=folder, local_kek_file=folder / "kek.json")
    # Built as the service builds them; generic.noop uses none of them.
    warehouse = BigQueryWarehouse(project="bench-project", location="US", endpoint="http://127.0.0.1:9")
    providers = ProviderRegistry.load(settings.providers_file)
    http = app.build_http(settings, providers)
    vault = app.build_vault(settings, warehouse, providers)
    replicas = []
    try:
        for _ in range(2):
            store = await StateStore.connect(dsn=pg.dsn, pool_size=10, lease_seconds=30.0)
            runs = RunManager(
                catalog=catalog,
                runner=StepRunner(ProcessorRegistry(), global_limit=asyncio.Semaphore(64), per_run_limit=4),
                store=store,
                warehouse=warehouse,
                meta_dataset="organizations",
                http=http,
                vault=vault,
            )
            await runs.start()
            settings = SchedulerSettings(
                tick_seconds=0, poll_seconds=0.05, caps=Caps(GLOBAL_CAP, PER_ORG_CAP)
            )
            replicas.append(
                (
                    store,
                    runs,
                    Scheduler(catalog=catalog, runs=runs, store=store, orgs=source, settings=settings),
                )
            )
        due = datetime(2026, 11, 30, 2, 0, 20, tzinfo=UTC)
        await replicas[0][2].tick(datetime(2026, 11, 30, 1, 59, tzinfo=UTC))
        began = time.perf_counter()
        results = await asyncio.gather(*(s.tick(due) for _, _, s in replicas * 2))
        enqueue = time.perf_counter() - began
        store = replicas[0][0]
        async with store.connection() as conn:
            jobs = await conn.fetchval("SELECT count(*) FROM scheduled_jobs")
            keys = await conn.fetchval(
                "SELECT count(DISTINCT (org_slug, pipeline_key, scheduled_for)) FROM scheduled_jobs"
            )
        print(f"orgs {n_orgs}, pipelines 3, replicas 2, ticks 4 at once")
        print(
            f"enqueue: {enqueue:.2f} s for {sum(r.enqueued for r in results)} jobs "
            f"(due per tick {[r.due for r in results]}, inserted {[r.enqueued for r in results]})"
        )
        print(f"jobs {jobs}, distinct (org, pipeline, time) {keys}, duplicate jobs {jobs - keys}")

        peak = 0

        async def sample() -> None:
            nonlocal peak
            while True:
                async with store.connection() as conn:
                    peak = max(
                        peak,
                        await conn.fetchval("SELECT count(*) FROM scheduled_jobs WHERE state = 'RUNNING'"),
                    )
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        began = time.perf_counter()
        for _, _, s in replicas:
            s.start()
        while time.perf_counter() - began < execute_seconds:
            await asyncio.sleep(1)
            async with store.connection() as conn:
                if not await conn.fetchval(
                    "SELECT count(*) FROM scheduled_jobs WHERE state IN ('QUEUED', 'RUNNING')"
                ):
                    break
        elapsed = time.perf_counter() - began
        sampler.cancel()
        for _, _, s in replicas:
            s.stop_claiming()
        async with store.connection() as conn:
            lags = [
                r["lag"]
                for r in await conn.fetch(
                    "SELECT extract(epoch FROM started_at - created_at)::float8 AS lag FROM scheduled_jobs "
                    "WHERE started_at IS NOT NULL ORDER BY started_at"
                )
            ]
            done = await conn.fetchval("SELECT count(*) FROM scheduled_jobs WHERE state = 'SUCCEEDED'")
            dup_runs = await conn.fetchval(
                "SELECT count(*) FROM (SELECT split_part(request_id, '-', 2) FROM runs "
                "WHERE trigger = 'SCHEDULER' GROUP BY 1 HAVING count(*) > 1) d"
            )
        first_wave = max(lags[:GLOBAL_CAP], default=0.0)
        lags.sort()
        print(
            f"executed {done} of {jobs} in {elapsed:.1f} s ({done / elapsed:.0f} runs/s), "
            f"max running at once {peak} (global cap {GLOBAL_CAP}), duplicate runs {dup_runs}"
        )
        if lags:
            p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
            print(
                f"start lag (claim - enqueue), {len(lags)} started: p50 {statistics.median(lags):.2f} s, "
                f"p99 {p99:.2f} s; the first {GLOBAL_CAP} started within {first_wave:.3f} s"
            )
    finally:
        for store, runs, s in replicas:
            s.stop_claiming()
            await runs.close()
            await s.close()
            await store.close()
        await http.close()
        await vault.store.close()
        await warehouse.close()
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(
        main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 10_000,
            float(sys.argv[2]) if len(sys.argv) > 2 else 60.0,
        )
    )
