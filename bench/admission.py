"""Admissions per second that one PostgreSQL sustains, from one and from two replicas.

Each replica is its own process with its own `StateStore` (pool of 10, a lease of its own) admitting runs
for 100 orgs (limits that never refuse) with `concurrency` admissions in flight for `seconds`: every call
is the whole admission transaction `admit_run()` (advisory lock per org, replay and duplicate checks, the
org's rate bucket, the concurrent count, the day and month counters, the run row, its PENDING and RUNNING
events: the run admitted RUNNING, as the service admits a run it starts at once).
Latency is measured per call in the replica's process.

    python -m bench.admission worker DSN SECONDS CONCURRENCY   (one replica; prints JSON)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from server.engine.run import Run, StepView
from server.ids import new_id
from server.state.store import Limits, StateStore

ORGS = 100
UNLIMITED = Limits(requests_per_minute=10**9, concurrent=10**9, daily=10**9, monthly=10**9)


@dataclass
class Admissions:
    """Admissions/s over all replicas and the per-call latency (ms) of all of them."""

    replicas: int
    concurrency: int
    per_second: float
    p50_ms: float
    p99_ms: float
    refused: int


def _run(org: str) -> Run:
    now = datetime.now(UTC)
    return Run(
        run_id=new_id(),
        org_slug=org,
        pipeline_key="bench/runs/noop",
        pipeline_id="noop",
        trigger="API",
        triggered_by="bench",
        parameters={"i": uuid.uuid4().hex},
        request_id="",
        create_time=now,
        dedupe_key=uuid.uuid4().hex,
        steps={"only": StepView("only", "generic.noop")},
        state="RUNNING",  # admitted as the service admits a run it starts at once
        start_time=now,
    )


async def worker(dsn: str, seconds: float, concurrency: int) -> dict[str, object]:
    store = await StateStore.connect(dsn=dsn, pool_size=10, upgrade=False)
    await store.register(new_id())
    orgs = [f"admit_{i:03d}" for i in range(ORGS)]
    latencies: list[float] = []
    refused = 0
    deadline = time.perf_counter() + seconds

    async def loop(n: int) -> None:
        nonlocal refused
        i = n
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            outcome = (await store.admit(_run(orgs[i % ORGS]), UNLIMITED)).outcome
            latencies.append((time.perf_counter() - began) * 1000.0)
            refused += outcome != "ACCEPTED"
            i += concurrency

    began = time.perf_counter()
    await asyncio.gather(*(loop(n) for n in range(concurrency)))
    elapsed = time.perf_counter() - began
    await store.close()
    return {"calls": len(latencies), "seconds": elapsed, "latencies": latencies, "refused": refused}


async def measure(dsn: str, *, replicas: int, concurrency: int = 32, seconds: float = 4.0) -> Admissions:
    """Run `replicas` worker processes at once and combine what they report."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.admission",
            "worker",
            dsn,
            str(seconds),
            str(concurrency),
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(replicas)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), seconds + 60)
    reports = [json.loads(out) for out, _ in outputs]
    latencies = sorted(x for r in reports for x in r["latencies"])
    calls = sum(r["calls"] for r in reports)
    wall = max(r["seconds"] for r in reports)
    return Admissions(
        replicas=replicas,
        concurrency=concurrency,
        per_second=calls / wall,
        p50_ms=statistics.median(latencies),
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        refused=sum(r["refused"] for r in reports),
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        result = asyncio.run(worker(sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))
        print(json.dumps(result))
