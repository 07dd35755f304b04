"""`python -m bench`: RunPipeline throughput against a bare baseline, engine overhead per step and
warehouse jobs per run, in one bounded run (about 6 minutes at most), printed as tables and a Markdown
summary."""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from dataclasses import dataclass

from grpc import aio

from bench import engine_overhead, jobs
from bench.lag import LagMonitor
from bench.load import Cell, CellResult, Transport, run_in_subprocess
from bench.stack import CONFIGS, Stack, drain, new_stack, start_echo, start_stack
from cloudact.pipeline.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc

BUDGET_SECONDS = 340.0  # whole run, startup included; the hard limit is 6 minutes
RESERVE_SECONDS = 45.0  # kept for engine overhead, jobs per run and shutdown
CELL_SECONDS = 40.0  # one cell at most (warm-up included)
WARMUP = 200
CALLS = 2000


@dataclass(frozen=True)
class Plan:
    """One throughput cell to run."""

    label: str
    target: str  # "real" or "bare"
    transport: Transport
    via_envoy: bool
    concurrency: int


PLANS = [
    Plan("(a) gRPC direct", "real", "grpc", False, 1),
    Plan("(a) gRPC direct", "real", "grpc", False, 32),
    Plan("(b) REST via Envoy", "real", "rest", True, 1),
    Plan("(b) REST via Envoy", "real", "rest", True, 32),
    Plan("(c) gRPC direct", "bare", "grpc", False, 1),
    Plan("(c) gRPC direct", "bare", "grpc", False, 32),
    Plan("(d) REST via Envoy", "bare", "rest", True, 1),
    Plan("(d) REST via Envoy", "bare", "rest", True, 32),
    Plan("(e) gRPC via Envoy", "real", "grpc", True, 32),
    Plan("(f) gRPC via Envoy", "bare", "grpc", True, 32),
]


PATHS: list[tuple[str, Transport, bool]] = [
    ("gRPC direct", "grpc", False),
    ("REST via Envoy", "rest", True),
    ("gRPC via Envoy", "grpc", True),
]


@dataclass
class Measured:
    """A cell's result with what the server side saw meanwhile."""

    plan: Plan
    result: CellResult | None
    stall_ms: float = 0.0
    drain_s: float = 0.0
    jobs: int = 0
    runs: int = 0


def machine() -> str:
    """nproc, CPU model, Python and OS."""
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(
                (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), ""
            )
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"nproc {usable} ({model or platform.processor() or 'unknown CPU'}), "
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()}"
    )


def _target(stack: Stack, plan: Plan) -> str:
    assert stack.service is not None and stack.envoy is not None
    assert stack.echo is not None and stack.echo_envoy is not None
    if plan.via_envoy:
        envoy = stack.envoy if plan.target == "real" else stack.echo_envoy
        return envoy.rest_url if plan.transport == "rest" else f"127.0.0.1:{envoy.rest_port}"
    port = stack.service.port if plan.target == "real" else stack.echo.port
    return f"127.0.0.1:{port}"


async def _sample_response(stack: Stack) -> pipeline_service_pb2.RunPipelineResponse:
    """One real RunPipeline response: what the echo server answers to every call."""
    assert stack.service is not None
    async with aio.insecure_channel(f"127.0.0.1:{stack.service.port}") as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        request = pipeline_service_pb2.RunPipelineRequest(
            org_slug=stack.org_slug,
            provider="bench",
            domain="runs",
            pipeline="noop",
            parameters={"i": "sample"},
        )
        response: pipeline_service_pb2.RunPipelineResponse = await stub.RunPipeline(
            request, metadata=(("x-api-key", stack.api_key),), timeout=30
        )
        return response


async def _cell(stack: Stack, plan: Plan, deadline: float) -> Measured:
    assert stack.service is not None
    remaining = deadline - time.perf_counter() - RESERVE_SECONDS
    if remaining < 5:
        return Measured(plan, None)
    name = f"{plan.target}-{plan.transport}-{'envoy' if plan.via_envoy else 'direct'}-{plan.concurrency}"
    cell = Cell(
        name=name,
        transport=plan.transport,
        target=_target(stack, plan),
        api_key=stack.api_key,
        org_slug=stack.org_slug,
        concurrency=plan.concurrency,
        warmup=WARMUP,
        count=CALLS,
        deadline_seconds=min(CELL_SECONDS, remaining),
    )
    wh = stack.service.warehouse
    jobs_before = wh.jobs_started
    async with LagMonitor() as lag:
        result = await run_in_subprocess(cell)
    drained = await drain(stack.service) if plan.target == "real" else 0.0
    runs = result.warmup_ok + result.calls if plan.target == "real" else 0
    return Measured(plan, result, lag.max_ms, drained, wh.jobs_started - jobs_before, runs)


def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def cell_row(m: Measured) -> str:
    """One line of the throughput table."""
    p = m.plan
    head = f"| {p.label:<20} | {p.target:<4} | {p.concurrency:>2} "
    r = m.result
    if r is None:
        return head + "| skipped (time budget) |" + " |" * 7
    jobs_per_run = f"{m.jobs / m.runs:.3f}" if m.runs else "-"
    note = " (deadline)" if r.timed_out else ""
    return (
        head + f"| {r.calls:>5}{note} | {r.errors:>3} | {_fmt(r.calls_per_second):>9} | {r.p50_ms:7.2f} "
        f"| {r.p99_ms:7.2f} | {m.stall_ms:7.1f} | {m.drain_s:5.2f} | {jobs_per_run:>6} |"
    )


def _find(
    measured: list[Measured], target: str, transport: Transport, via_envoy: bool, concurrency: int
) -> CellResult | None:
    for m in measured:
        p = m.plan
        if (p.target, p.transport, p.via_envoy, p.concurrency) == (target, transport, via_envoy, concurrency):
            return m.result
    return None


def ratios(measured: list[Measured]) -> list[tuple[str, float | None]]:
    """real/bare calls per second at 32 in flight, per path."""
    out: list[tuple[str, float | None]] = []
    for label, transport, via in PATHS:
        real = _find(measured, "real", transport, via, 32)
        bare = _find(measured, "bare", transport, via, 32)
        value = (
            real.calls_per_second / bare.calls_per_second if real and bare and bare.calls_per_second else None
        )
        out.append((label, value))
    return out


def summary(
    measured: list[Measured],
    overhead: engine_overhead.Overhead | None,
    per_run: list[jobs.JobsPerRun],
    load_jobs: float | None,
    host: str,
) -> str:
    """The Markdown block for the README."""
    lines = [
        "### Benchmarks (`make bench`)",
        "",
        f"One run of `python -m bench` on {host}.",
        "The client runs in its own process; server, Envoy (1 worker) and emulator share the machine.",
        "RunPipeline of a one-step `generic.noop` pipeline, unique parameters per call,",
        f"{WARMUP} warm-up calls then up to {CALLS} measured calls per cell; client-side latencies,",
        "nearest-rank p50/p99. *Bare* is a grpc.aio server whose RunPipeline returns a captured",
        "response at once (no auth, engine, ledger or warehouse), behind its own identical Envoy.",
        "",
        "| path | in flight | real calls/s | real p50 / p99 ms | bare calls/s | bare p50 / p99 ms "
        "| real/bare |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, transport, via in PATHS:
        for concurrency in (1, 32):
            real = _find(measured, "real", transport, via, concurrency)
            bare = _find(measured, "bare", transport, via, concurrency)
            if real is None and bare is None:
                continue

            def cps(r: CellResult | None) -> str:
                return _fmt(r.calls_per_second, 0) if r else "-"

            def lat(r: CellResult | None) -> str:
                return f"{r.p50_ms:.2f} / {r.p99_ms:.2f}" if r else "-"

            ratio = (
                f"{real.calls_per_second / bare.calls_per_second:.2f}"
                if real and bare and bare.calls_per_second
                else "-"
            )
            lines.append(
                f"| {label} | {concurrency} | {cps(real)} | {lat(real)} | {cps(bare)} | {lat(bare)} "
                f"| {ratio} |"
            )
    lines.append("")
    if overhead:
        lines.append(
            f"Engine overhead, {engine_overhead.STEPS} chained `generic.noop` steps "
            f"({overhead.repeats} runs, median): **{overhead.rpc_wall_ms:.3f} ms/step** "
            "RunPipeline `wait=true` wall time "
            f"({overhead.rpc_server_ms:.3f} ms/step run start→end on the server, "
            f"{overhead.runner_ms:.3f} ms/step `StepRunner` alone); floor: "
            f"{overhead.floor_ms * 1000:.1f} µs per bare `await processor.execute()`."
        )
        lines.append("")
    if per_run:
        parts = [
            f"{j.label}: {j.total:g} (call {j.call_jobs:g} + ledger {j.ledger_jobs:g}, worst {j.max_total})"
            for j in per_run
        ]
        load = f"; under load (32 in flight) {load_jobs:.3f} jobs/run" if load_jobs is not None else ""
        lines.append(
            "Warehouse jobs per isolated run (one run per ledger flush, the worst case): "
            + "; ".join(parts)
            + load
            + ". `generic.noop` issues none itself."
        )
    return "\n".join(lines)


async def main() -> int:
    started = time.perf_counter()
    deadline = started + BUDGET_SECONDS
    host = machine()
    print(f"machine: {host}")
    print(f"python:  {sys.version.split()[0]} at {sys.executable}")
    print(
        f"budget:  {BUDGET_SECONDS:.0f} s; {WARMUP} warm-up + {CALLS} calls per cell, "
        f"{CELL_SECONDS:.0f} s cap per cell"
    )
    engine_overhead.write_config(CONFIGS)
    stack = new_stack()
    measured: list[Measured] = []
    overhead: engine_overhead.Overhead | None = None
    per_run: list[jobs.JobsPerRun] = []
    load_jobs: float | None = None
    try:
        await start_stack(stack)
        assert stack.service is not None
        sample = await _sample_response(stack)
        await start_echo(stack, sample)
        await drain(stack.service)
        print(
            "startup: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in stack.timings.items())
            + f" (total {time.perf_counter() - started:.1f}s)"
        )
        print()
        print(
            "RunPipeline throughput (stall = worst event-loop oversleep in the server process; drain = "
            "wait for runs + ledger flush after the cell)"
        )
        header = (
            "| path                 | srv  | in | calls | err |   calls/s |  p50 ms |  p99 ms | stall ms "
            "| drain s | jobs/run |"
        )
        print(header)
        print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
        for plan in PLANS:
            m = await _cell(stack, plan, deadline)
            measured.append(m)
            print(cell_row(m), flush=True)
            if m.result and m.result.error_samples:
                for sample_error in m.result.error_samples:
                    print(f"    error: {sample_error}")
        print()
        for label, value in ratios(measured):
            verdict = "-" if value is None else f"{value:.2f} ({'meets' if value >= 0.70 else 'below'} 0.70)"
            print(f"real/bare calls/s at 32 in flight, {label}: {verdict}")
        print()
        overhead = await engine_overhead.measure(stack.service, stack.org_slug, stack.api_key)
        print(
            f"Engine overhead ({engine_overhead.STEPS} chained generic.noop steps, {overhead.repeats} runs "
            f"after a warm-up, medians; run states {sorted(set(overhead.states))}):"
        )
        print(
            f"  RunPipeline wait=true, client wall   {overhead.rpc_wall_ms:8.3f} ms/step "
            f"(best run {overhead.best_rpc_wall_ms:.3f})"
        )
        print(f"  run start_time -> end_time (server)  {overhead.rpc_server_ms:8.3f} ms/step")
        print(f"  StepRunner.run alone                 {overhead.runner_ms:8.3f} ms/step")
        print(f"  floor: await processor.execute()     {overhead.floor_ms:8.4f} ms/call")
        print()
        print("Warehouse jobs per run (isolated: flush, one run with wait=true, flush):")
        for label, pipeline, request_id in (
            ("1-step noop", ("bench", "runs", "noop"), False),
            ("1-step noop with request_id", ("bench", "runs", "noop"), True),
            (f"{engine_overhead.STEPS}-step noop", ("bench", "engine", engine_overhead.PIPELINE), False),
        ):
            if time.perf_counter() > deadline + 10:
                print(f"  {label}: skipped (time budget)")
                continue
            j = await jobs.measure(
                stack.service,
                stack.org_slug,
                stack.api_key,
                label=label,
                pipeline=pipeline,
                request_id=request_id,
            )
            per_run.append(j)
            print(
                f"  {label:<30} {j.total:5g} jobs/run (during the call {j.call_jobs:g}, ledger flush "
                f"{j.ledger_jobs:g}; worst {j.max_total}; {j.runs} runs)"
            )
        loaded = [m for m in measured if m.plan.target == "real" and m.plan.concurrency == 32 and m.runs]
        load_jobs = sum(m.jobs for m in loaded) / sum(m.runs for m in loaded) if loaded else None
        if load_jobs is not None:
            print(
                f"  under load (real cells at 32 in flight)  {load_jobs:.3f} jobs/run "
                f"({sum(m.jobs for m in loaded)} jobs / {sum(m.runs for m in loaded)} runs)"
            )
        target = max((j.total for j in per_run), default=0.0)
        print(
            f"  target <= 3 jobs/run beyond the steps' own work: {'met' if target <= 3 else 'NOT met'} "
            f"(worst median {target:g})"
        )
    finally:
        await stack.stop()
    print()
    print(f"total time {time.perf_counter() - started:.1f}s; all servers stopped")
    print()
    print(summary(measured, overhead, per_run, load_jobs, host))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
