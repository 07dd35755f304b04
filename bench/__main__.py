"""`python -m bench`: RunPipeline throughput against a bare baseline, engine overhead per step, warehouse
jobs per run and the SaaS cost pipeline at scale against a DuckDB floor, in one bounded run (under 8
minutes), then OpenAI usage ingestion against dlt and a floor (bench/genai.py, 1,000,000 rows, at most
170 s more), then the GCP billing export ETL against a DuckDB floor (bench/gcp_billing.py, 1,000,000
rows, at most 420 s more), printed as tables and Markdown summaries. `python -m bench saas` runs only the
SaaS part, `python -m bench genai [ROWS]` only the OpenAI usage part (1,000,000 rows by default and in
`make bench`), `python -m bench gcp [ROWS]` only the GCP part (default 1,000,000 rows).

Throughput cells run in rounds; within a round each real cell and its bare twin run back to back (the
order alternates between rounds), and the summary reports the median over the rounds, because on a
2-core machine one short cell is at the mercy of whatever else runs (GC, the emulator, Envoy).
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

from grpc import aio

from bench import admission, cores, cpu, engine_overhead, gcp_billing, genai, jobs, saas_cost
from bench.lag import LagMonitor
from bench.load import Cell, CellResult, Transport, run_in_subprocess
from bench.stack import CONFIGS, Stack, drain, finish_runs, new_stack, start_echo, start_stack
from cloudact.pipeline.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc

# Bounds. The hard limit is 6 minutes; a normal run on 2 cores takes under 2. No cell starts after
# BUDGET - RESERVE seconds; a cell is capped at CELL_SECONDS (+15 s for its client to start), a drain at
# DRAIN_SECONDS, the engine-overhead part at ENGINE_SECONDS and each jobs-per-run part at JOBS_SECONDS
# (and skipped after JOBS_LATEST seconds), which keeps the worst case under 6 minutes.
BUDGET_SECONDS = 300.0
RESERVE_SECONDS = 75.0
CELL_SECONDS = 30.0
DRAIN_SECONDS = 20.0
ENGINE_SECONDS = 45.0
JOBS_SECONDS = 12.0
JOBS_LATEST = 320.0
# The SaaS part (bench/saas_cost.py) gets at most saas_cost.SAAS_SECONDS, less when the parts before it
# took long: everything ends by TOTAL_SECONDS (less STOP_SECONDS to stop the servers); it is skipped when
# fewer than SAAS_MIN_SECONDS are left.
TOTAL_SECONDS = 480.0
STOP_SECONDS = 20.0
SAAS_MIN_SECONDS = 90.0
ROUNDS = 5
WARMUP = 200
CALLS = 2000


@dataclass(frozen=True)
class Route:
    """One way of calling RunPipeline, measured against the real and the bare server."""

    label: str
    transport: Transport
    via_envoy: bool
    concurrency: int
    pinned: bool = False  # the server under test alone on a core, PostgreSQL and the client on the rest

    def letter(self, target: str) -> str:
        """The brief's (a)-(d) names, (e)/(f) for the extra gRPC-through-Envoy pair, (g) for the floor,
        (h)/(i) for gRPC direct with the server on a core of its own."""
        if target == "floor":
            return "(g)"
        if self.pinned:
            return "(h)" if target == "real" else "(i)"
        base = {("grpc", False): "ac", ("rest", True): "bd", ("grpc", True): "ef"}[
            (self.transport, self.via_envoy)
        ]
        return f"({base[0] if target == 'real' else base[1]})"


PATHS = [
    Route("gRPC direct", "grpc", False, 1),
    Route("gRPC direct", "grpc", False, 32),
    Route("REST via Envoy", "rest", True, 1),
    Route("REST via Envoy", "rest", True, 32),
    Route("gRPC via Envoy", "grpc", True, 32),
]
PINNED_PATH = Route("gRPC direct, server on its own core", "grpc", False, 32, pinned=True)
if cores.can_pin():
    PATHS.append(PINNED_PATH)
FLOOR_PATH = PATHS[1]  # the floor server (bench/echo.py) is measured on the target's path only
CPU_PARTS = ("server", "envoy", "emulator", "postgres", "client")


@dataclass
class Measured:
    """A cell's result with what the server side saw meanwhile."""

    path: Route
    target: str  # "real", "bare" or "floor"
    round: int
    result: CellResult
    stall_ms: float | None = None
    drain_s: float = 0.0
    jobs: int = 0
    runs: int = 0
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU milliseconds per successful call
    foreign_cores: float = 0.0  # CPU used meanwhile by processes that are not the benchmark's, in cores
    # The ledger's export of the cell's runs (its flush after the cell): CPU ms per exported run by
    # process, and how many runs it exported; part of `cpu_ms` too.
    export_ms: dict[str, float] = field(default_factory=dict)
    exported: int = 0
    # The server's event-loop thread over the cell: its CPU ms per call, and the share of the time it was
    # runnable that it spent waiting for a core (taken by another process or thread).
    loop_ms: float = 0.0
    loop_waiting: float = 0.0


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


def _target(stack: Stack, path: Route, target: str) -> str:
    assert stack.service is not None and stack.envoy is not None
    assert stack.echo is not None and stack.echo_envoy is not None
    if path.via_envoy:
        envoy = stack.envoy if target == "real" else stack.echo_envoy
        return envoy.rest_url if path.transport == "rest" else f"127.0.0.1:{envoy.rest_port}"
    assert stack.floor is not None
    port = {"real": stack.service.port, "bare": stack.echo.port, "floor": stack.floor.port}[target]
    return f"127.0.0.1:{port}"


def _server_pid(stack: Stack, target: str) -> int:
    """The process of the server under test: this one (real), the bare or the floor server."""
    assert stack.echo is not None and stack.floor is not None
    return {"real": os.getpid(), "bare": stack.echo.pid, "floor": stack.floor.pid}[target]


def _cpu_snapshot(stack: Stack, target: str) -> dict[str, float]:
    assert stack.emulator is not None and stack.envoy is not None
    assert stack.echo_envoy is not None
    envoy = stack.envoy if target == "real" else stack.echo_envoy
    return {
        "server": cpu.self_seconds() if target == "real" else cpu.tree_seconds(_server_pid(stack, target)),
        "envoy": cpu.tree_seconds(envoy.pid),
        "emulator": cpu.tree_seconds(stack.emulator.pid),
        "postgres": cpu.tree_seconds(stack.postgres.pid) if stack.postgres else 0.0,
    }


def _ours_seconds(stack: Stack) -> float:
    """CPU seconds of every process the benchmark runs (ended load clients included)."""
    assert stack.emulator is not None and stack.envoy is not None
    assert stack.echo is not None and stack.echo_envoy is not None
    assert stack.floor is not None
    pids = (stack.emulator.pid, stack.envoy.pid, stack.echo_envoy.pid, stack.echo.pid, stack.floor.pid)
    pids += (stack.postgres.pid,) if stack.postgres else ()
    return cpu.self_seconds() + cpu.waited_children_seconds() + sum(cpu.tree_seconds(p) for p in pids)


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


async def _load(stack: Stack, path: Route, cell: Cell, server: int) -> CellResult:
    """Run the cell's load client; on a pinned path with `server` alone on a core of its own and
    PostgreSQL and the client on the other cores (see bench/cores.py)."""
    if not path.pinned:
        return await run_in_subprocess(cell)
    others = [stack.postgres.pid] if stack.postgres else []
    with cores.server_alone(server, others) as rest:
        return await run_in_subprocess(cell, rest)


async def _cell(stack: Stack, path: Route, target: str, round_: int, seconds: float) -> Measured:
    assert stack.service is not None
    name = f"r{round_}-{target}-{path.transport}-{'envoy' if path.via_envoy else 'direct'}-{path.concurrency}"
    cell = Cell(
        name=name,
        transport=path.transport,
        target=_target(stack, path, target),
        api_key=stack.api_key,
        org_slug=stack.org_slug,
        concurrency=path.concurrency,
        warmup=WARMUP,
        count=CALLS,
        deadline_seconds=seconds,
    )
    wh = stack.service.warehouse
    jobs_before = wh.jobs_started
    cpu_before = _cpu_snapshot(stack, target)
    server = _server_pid(stack, target)
    loop_before = cpu.loop_seconds(server)
    busy_before, ours_before, wall_before = (
        cpu.machine_busy_seconds(),
        _ours_seconds(stack),
        time.perf_counter(),
    )
    export_ms: dict[str, float] = {}
    exported = 0
    if target == "real":
        async with LagMonitor() as lag:
            result = await _load(stack, path, cell, server)
        loop_after = cpu.loop_seconds(server)
        finishing = time.perf_counter()
        await finish_runs(stack.service, DRAIN_SECONDS)
        # The export runs once a minute in production; here each cell's runs are exported after it, and
        # that cost is part of the calls' (cpu_ms) and reported per exported run (export_ms).
        before, exported = _cpu_snapshot(stack, target), stack.service.ledger.exported
        await drain(stack.service, DRAIN_SECONDS)
        drained = time.perf_counter() - finishing
        exported = stack.service.ledger.exported - exported
        after = _cpu_snapshot(stack, target)
        export_ms = {k: (after[k] - before[k]) * 1000.0 / max(exported, 1) for k in before}
        stall: float | None = lag.max_ms
    else:
        result = await _load(stack, path, cell, server)
        loop_after = cpu.loop_seconds(server)
        drained, stall = 0.0, None
    cpu_after = _cpu_snapshot(stack, target)
    foreign = (cpu.machine_busy_seconds() - busy_before) - (_ours_seconds(stack) - ours_before)
    foreign_cores = max(0.0, foreign) / max(time.perf_counter() - wall_before, 1e-9)
    served = result.warmup_ok + result.calls + result.errors
    cpu_ms = {k: (cpu_after[k] - cpu_before[k]) * 1000.0 / max(served, 1) for k in cpu_before}
    cpu_ms["client"] = result.client_cpu_seconds * 1000.0 / max(result.calls, 1)
    runs = result.warmup_ok + result.calls if target == "real" else 0
    jobs_count = wh.jobs_started - jobs_before
    ran, waited = loop_after[0] - loop_before[0], loop_after[1] - loop_before[1]
    return Measured(
        path,
        target,
        round_,
        result,
        stall,
        drained,
        jobs_count,
        runs,
        cpu_ms,
        foreign_cores,
        export_ms,
        exported,
        loop_ms=ran * 1000.0 / max(served, 1),
        loop_waiting=waited / max(ran + waited, 1e-9),
    )


def _fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


TABLE_HEADER = (
    "| rnd | cell                 | srv  | in | calls | err |   calls/s |  p50 ms |  p99 ms | stall ms "
    "| drain s | jobs/run | CPU ms/call srv / envoy / emu / pg / client | other |"
)


def cell_row(m: Measured) -> str:
    """One line of the per-round throughput table."""
    r = m.result
    jobs_per_run = f"{m.jobs / m.runs:.3f}" if m.runs else "-"
    note = "*" if r.timed_out else " "
    stall = f"{m.stall_ms:8.1f}" if m.stall_ms is not None else "       -"
    cpu_ms = " / ".join(f"{m.cpu_ms[k]:.3f}" for k in CPU_PARTS)
    return (
        f"| {m.round:>3} | {m.path.letter(m.target)} {m.path.label:<16} | {m.target:<4} "
        f"| {m.path.concurrency:>2} | {r.calls:>4}{note} | {r.errors:>3} | {_fmt(r.calls_per_second):>9} "
        f"| {r.p50_ms:7.2f} | {r.p99_ms:7.2f} | {stall} | {m.drain_s:7.2f} | {jobs_per_run:>8} "
        f"| {cpu_ms:<38} | {m.foreign_cores:5.2f} |"
    )


@dataclass
class Summary:
    """Medians over the rounds of one path and target."""

    rounds: int
    calls: int
    errors: int
    cps: float
    cps_min: float
    cps_max: float
    p50: float
    p99: float
    cpu_ms: dict[str, float]


def summarize(measured: list[Measured], path: Route, target: str) -> Summary | None:
    """The median cell of `path` against `target` over the rounds that ran."""
    cells = [m for m in measured if m.path == path and m.target == target]
    if not cells:
        return None
    cps = [m.result.calls_per_second for m in cells]
    return Summary(
        rounds=len(cells),
        calls=sum(m.result.calls for m in cells),
        errors=sum(m.result.errors for m in cells),
        cps=statistics.median(cps),
        cps_min=min(cps),
        cps_max=max(cps),
        p50=statistics.median(m.result.p50_ms for m in cells),
        p99=statistics.median(m.result.p99_ms for m in cells),
        cpu_ms={k: statistics.median(m.cpu_ms[k] for m in cells) for k in CPU_PARTS},
    )


def _ratio(real: Summary | None, bare: Summary | None) -> float | None:
    return real.cps / bare.cps if real and bare and bare.cps else None


def throughput_markdown(measured: list[Measured]) -> list[str]:
    """The median table (Markdown)."""
    lines = [
        "| path | in flight | real calls/s (min-max) | real p50 / p99 ms | bare calls/s (min-max) "
        "| bare p50 / p99 ms | real/bare |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for path in PATHS:
        real, bare = summarize(measured, path, "real"), summarize(measured, path, "bare")

        def cps(s: Summary | None) -> str:
            return f"{s.cps:,.0f} ({s.cps_min:,.0f}-{s.cps_max:,.0f})" if s else "-"

        def lat(s: Summary | None) -> str:
            return f"{s.p50:.2f} / {s.p99:.2f}" if s else "-"

        ratio = _ratio(real, bare)
        lines.append(
            f"| {path.letter('real')}/{path.letter('bare')} {path.label} | {path.concurrency} | {cps(real)} "
            f"| {lat(real)} | {cps(bare)} | {lat(bare)} | {'-' if ratio is None else f'{ratio:.2f}'} |"
        )
        floor = summarize(measured, path, "floor") if path == FLOOR_PATH else None
        if floor:
            ratio = _ratio(floor, bare)
            lines.append(
                f"| {path.letter('floor')}/{path.letter('bare')} floor server, {path.label} "
                f"| {path.concurrency} | {cps(floor)} | {lat(floor)} | {cps(bare)} | {lat(bare)} "
                f"| {'-' if ratio is None else f'{ratio:.2f}'} |"
            )
    return lines


def cpu_markdown(measured: list[Measured]) -> list[str]:
    """CPU milliseconds per call by process, medians (Markdown)."""
    lines = [
        "| path | in flight | server | Envoy | emulator | PostgreSQL | client | server real - bare |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in PATHS:
        real, bare = summarize(measured, path, "real"), summarize(measured, path, "bare")
        floor = summarize(measured, path, "floor")
        for target, s in (("real", real), ("bare", bare), ("floor", floor)):
            if s is None:
                continue
            extra = f"{real.cpu_ms['server'] - bare.cpu_ms['server']:+.3f}" if real and bare else "-"
            lines.append(
                f"| {path.label} ({target}) | {path.concurrency} | "
                + " | ".join(f"{s.cpu_ms[k]:.3f}" for k in CPU_PARTS)
                + f" | {extra if target == 'real' else ''} |"
            )
    return lines


def export_note(measured: list[Measured]) -> str:
    """CPU per run of the ledger's export to BigQuery (after the real cells), by process, medians."""
    cells = [m for m in measured if m.target == "real" and m.exported]
    if not cells:
        return ""
    parts = ", ".join(
        f"{name} {statistics.median(m.export_ms[k] for m in cells):.3f}"
        for k, name in (("server", "server"), ("postgres", "PostgreSQL"), ("emulator", "emulator"))
    )
    runs = statistics.median(m.exported for m in cells)
    return (
        f"Ledger export to BigQuery (once a minute by default; here the runs of each real cell, a median "
        f"{runs:,.0f}, in one export after it): CPU ms per exported run: {parts} (included above)."
    )


def loop_note(measured: list[Measured]) -> str:
    """The servers' event-loop threads at 32 in flight gRPC direct: CPU per call, and how much of the time
    they had work they waited for a core (medians)."""
    parts = []
    for path in (FLOOR_PATH, PINNED_PATH):
        for target in ("real", "bare"):
            cells = [m for m in measured if m.path == path and m.target == target and m.loop_ms]
            if cells:
                ms = statistics.median(m.loop_ms for m in cells)
                waiting = statistics.median(m.loop_waiting for m in cells)
                parts.append(f"{path.letter(target)} {target} {ms:.3f} ms/call, waited {waiting:.0%}")
    if not parts:
        return ""
    return (
        "Event-loop thread of the server under test (the one thread every call goes through), 32 in "
        "flight gRPC direct: its CPU per call and the share of its runnable time spent waiting for a core "
        f"(medians): {'; '.join(parts)}."
    )


def foreign_note(measured: list[Measured]) -> str:
    """How busy the machine was with other processes while the cells ran."""
    if not measured:
        return ""
    loads = sorted(m.foreign_cores for m in measured)
    return (
        f"Other processes on the machine used a median {statistics.median(loads):.2f} and at most "
        f"{loads[-1]:.2f} cores while the cells ran (of {os.cpu_count()})."
    )


def summary_markdown(
    host: str,
    measured: list[Measured],
    overhead: engine_overhead.Overhead | None,
    per_run: list[jobs.JobsPerRun],
    load_jobs: float | None,
) -> str:
    """The Markdown block for the README."""
    rounds = max((m.round for m in measured), default=0)
    lines = [
        "### Benchmarks (`make bench`)",
        "",
        f"One run of `python -m bench` on {host}.",
        "Client, server, Envoy (1 worker each) and emulator share the machine; the load client runs in its",
        "own process. RunPipeline of a one-step `generic.noop` pipeline with unique parameters per call;",
        f"per cell {WARMUP} warm-up then {CALLS} measured calls; median of {rounds} rounds (min-max of",
        "calls/s in brackets); client-side latency, nearest-rank p50/p99. *Bare* is a grpc.aio",
        "`PipelineService` in its own process whose RunPipeline returns a captured real response at once",
        "(no guard, auth, engine, ledger or warehouse), behind an identical Envoy. *Floor* (g) is the same",
        "server doing per call only what any RunPipeline must: a new run message (id, time, names,",
        "parameters, steps) and a task for it (`bench/echo.py`); gRPC direct at 32 in flight only.",
        "",
        *throughput_markdown(measured),
        "",
        foreign_note(measured),
        "",
        loop_note(measured),
        "",
        "CPU milliseconds per call, by process (medians; the real server's includes running the run and",
        "its ledger flush):",
        "",
        *cpu_markdown(measured),
        "",
        export_note(measured),
        "",
    ]
    if overhead:
        lines.append(
            f"Engine overhead, {engine_overhead.STEPS} chained `generic.noop` steps "
            f"({overhead.repeats} runs, median): **{overhead.rpc_wall_ms:.3f} ms/step** "
            f"RunPipeline `wait=true` wall time ({overhead.rpc_server_ms:.3f} ms/step run start→end on "
            f"the server, {overhead.runner_ms:.3f} ms/step `StepRunner` alone, best run "
            f"{overhead.best_runner_ms:.3f}); floor "
            f"{overhead.floor_ms * 1000:.1f} µs per bare `await processor.execute()`."
        )
        lines.append("")
    if per_run:
        parts = [
            f"{j.label} {j.total:g} (call {j.call_jobs:g} + ledger {j.ledger_jobs:g}, worst {j.max_total})"
            for j in per_run
        ]
        load = f"; under load (32 in flight) {load_jobs:.3f} jobs/run" if load_jobs is not None else ""
        lines.append(
            "Warehouse jobs per run, isolated (one run per ledger flush, the worst case): "
            + "; ".join(parts)
            + load
            + ". `generic.noop` issues none itself."
        )
    return "\n".join(lines)


async def throughput(stack: Stack, deadline: float) -> list[Measured]:
    """ROUNDS rounds of every path against both servers, within the budget."""
    measured: list[Measured] = []
    print(
        "RunPipeline throughput, every cell ("
        "stall = worst event-loop oversleep of the real server; drain = wait for its runs and ledger "
        "flush; other = cores busy with processes that are not the benchmark's; * = cut by the deadline)"
    )
    print(TABLE_HEADER)
    print("|" + "|".join("-" * len(c) for c in TABLE_HEADER.split("|")[1:-1]) + "|")
    for round_ in range(1, ROUNDS + 1):
        order = ("real", "bare") if round_ % 2 else ("bare", "real")
        for path in PATHS:
            targets = (*order, "floor") if path == FLOOR_PATH else order
            for target in targets:
                left = deadline - time.perf_counter() - RESERVE_SECONDS
                if left < 10:
                    print(f"| {round_:>3} | round cut short: time budget reached")
                    return measured
                m = await _cell(stack, path, target, round_, min(CELL_SECONDS, left))
                measured.append(m)
                print(cell_row(m), flush=True)
                for error in m.result.error_samples:
                    print(f"    error: {error}")
    return measured


async def main() -> int:
    started = time.perf_counter()
    deadline = started + BUDGET_SECONDS
    host = machine()
    print(f"machine: {host}")
    print(f"python:  {sys.version.split()[0]} at {sys.executable}")
    print(
        f"plan:    {ROUNDS} rounds x {len(PATHS) * 2 + 1} cells of {WARMUP} warm-up + {CALLS} calls "
        f"({CELL_SECONDS:.0f} s cap per cell), budget {BUDGET_SECONDS:.0f} s"
    )
    engine_overhead.write_config(CONFIGS)
    stack = new_stack()
    measured: list[Measured] = []
    overhead: engine_overhead.Overhead | None = None
    per_run: list[jobs.JobsPerRun] = []
    load_jobs: float | None = None
    saas = saas_cost.SaasResult()
    try:
        await start_stack(stack)
        assert stack.service is not None
        await start_echo(stack, await _sample_response(stack))
        await drain(stack.service)
        print(
            "startup: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in stack.timings.items())
            + f" (total {time.perf_counter() - started:.1f}s)"
        )
        print()
        measured = await throughput(stack, deadline)
        print()
        print("Medians over the rounds:")
        print("\n".join(throughput_markdown(measured)))
        print()
        for path in PATHS:
            if path.concurrency != 32:
                continue
            ratio = _ratio(summarize(measured, path, "real"), summarize(measured, path, "bare"))
            verdict = "-" if ratio is None else f"{ratio:.2f} ({'meets' if ratio >= 0.50 else 'BELOW'} 0.50)"
            print(f"real/bare calls/s at 32 in flight, {path.label}: {verdict}")
        floor_ratio = _ratio(
            summarize(measured, FLOOR_PATH, "floor"), summarize(measured, FLOOR_PATH, "bare")
        )
        if floor_ratio is not None:
            print(
                f"floor/bare calls/s at 32 in flight, {FLOOR_PATH.label}: {floor_ratio:.2f} (a new run "
                "message and a task per call, nothing else: the ceiling of any real RunPipeline here)"
            )
        print()
        print(foreign_note(measured))
        print(loop_note(measured))
        print()
        print("CPU ms per call by process (medians):")
        print("\n".join(cpu_markdown(measured)))
        print(export_note(measured))
        print()

        try:
            overhead = await asyncio.wait_for(
                engine_overhead.measure(stack.service, stack.org_slug, stack.api_key), ENGINE_SECONDS
            )
        except TimeoutError:
            print(f"Engine overhead: did not finish within {ENGINE_SECONDS:.0f} s")
        if overhead:
            print(
                f"Engine overhead ({engine_overhead.STEPS} chained generic.noop steps, {overhead.repeats} "
                f"runs after a warm-up, medians; run states {sorted(set(overhead.states))}):"
            )
            print(
                f"  RunPipeline wait=true, client wall   {overhead.rpc_wall_ms:8.3f} ms/step "
                f"(best run {overhead.best_rpc_wall_ms:.3f})"
            )
            print(f"  run start_time -> end_time (server)  {overhead.rpc_server_ms:8.3f} ms/step")
            print(
                f"  StepRunner.run alone                 {overhead.runner_ms:8.3f} ms/step "
                f"(best run {overhead.best_runner_ms:.3f})"
            )
            print(f"  floor: await processor.execute()     {overhead.floor_ms:8.4f} ms/call")
        print()

        print("Warehouse jobs per run (isolated: flush, one run with wait=true, flush):")
        for label, pipeline, request_id in (
            ("1-step noop", ("bench", "runs", "noop"), False),
            ("1-step noop with request_id", ("bench", "runs", "noop"), True),
            (f"{engine_overhead.STEPS}-step noop", ("bench", "engine", engine_overhead.PIPELINE), False),
        ):
            if time.perf_counter() - started > JOBS_LATEST:
                print(f"  {label}: skipped (time budget)")
                continue
            try:
                j = await asyncio.wait_for(
                    jobs.measure(
                        stack.service,
                        stack.org_slug,
                        stack.api_key,
                        label=label,
                        pipeline=pipeline,
                        request_id=request_id,
                    ),
                    JOBS_SECONDS,
                )
            except TimeoutError:
                print(f"  {label}: did not finish within {JOBS_SECONDS:.0f} s")
                continue
            per_run.append(j)
            print(
                f"  {label:<30} {j.total:5g} jobs/run (during the call {j.call_jobs:g}, ledger flush "
                f"{j.ledger_jobs:g}; worst {j.max_total}; {j.runs} runs)"
            )
        loaded = [m for m in measured if m.target == "real" and m.path.concurrency == 32 and m.runs]
        if loaded:
            load_jobs = sum(m.jobs for m in loaded) / sum(m.runs for m in loaded)
            print(
                f"  under load (real cells at 32 in flight)  {load_jobs:.3f} jobs/run "
                f"({sum(m.jobs for m in loaded)} jobs / {sum(m.runs for m in loaded)} runs)"
            )
        worst = max((j.total for j in per_run), default=0.0)
        print(
            f"  target <= 3 jobs/run beyond the steps' own work: {'met' if worst <= 3 else 'NOT met'} "
            f"(worst median {worst:g})"
        )
        print()

        assert stack.postgres is not None
        print("State store admissions (the admission transaction alone, 100 orgs, 32 in flight per replica):")
        for replicas in (1, 2):
            try:
                a = await admission.measure(stack.postgres.dsn, replicas=replicas)
            except Exception as exc:  # reported, the rest of the benchmark goes on
                print(f"  {replicas} replica(s): failed ({type(exc).__name__})")
                continue
            print(
                f"  {replicas} replica(s) x 32 in flight: {a.per_second:,.0f} admissions/s, "
                f"p50 {a.p50_ms:.2f} ms, p99 {a.p99_ms:.2f} ms ({a.refused} refused)"
            )
        print()

        saas_seconds = min(
            saas_cost.SAAS_SECONDS, TOTAL_SECONDS - STOP_SECONDS - 15 - (time.perf_counter() - started)
        )
        if saas_seconds < SAAS_MIN_SECONDS:
            print(f"SaaS cost pipeline: skipped (time budget, {saas_seconds:.0f} s left)")
        else:
            await drain(stack.service)
            await saas_cost.report(stack.service, saas, saas_seconds)
    finally:
        await stack.stop()
    print()
    print(f"total time {time.perf_counter() - started:.1f}s; all servers stopped")
    print()
    # OpenAI usage ingestion against dlt and a floor (its own fake API and emulator, at most GENAI_SECONDS)
    try:
        usage = await genai.report(genai.DEFAULT_ROWS)
    except Exception as exc:  # reported; the summaries of the other parts still print
        print(f"OpenAI usage ingestion: failed ({type(exc).__name__}: {str(exc)[:200]})")
        usage = genai.GenAIResult()
    print()
    # GCP billing export ETL against a DuckDB floor (its own emulator, at most gcp_billing.GCP_SECONDS)
    gcp = await gcp_billing.report(gcp_billing.DEFAULT_ROWS)
    print()
    print(summary_markdown(host, measured, overhead, per_run, load_jobs))
    if saas.plans:
        print()
        print(saas_cost.markdown(saas, host))
    print()
    if usage.outcomes:
        print(genai.markdown(usage, host))
    print()
    print(gcp_billing.markdown(gcp, host))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["genai"] and set(sys.argv[3:]) <= set(genai.CONTENDERS):
        rows = int(sys.argv[2]) if sys.argv[2:] else genai.DEFAULT_ROWS
        only = tuple(sys.argv[3:]) or genai.CONTENDERS
        raise SystemExit(asyncio.run(genai.main(rows, machine(), only)))
    if sys.argv[1:] == ["saas"]:
        raise SystemExit(asyncio.run(saas_cost.main(machine())))
    if sys.argv[1:2] == ["gcp"] and len(sys.argv) <= 3:
        rows = int(sys.argv[2]) if sys.argv[2:] else gcp_billing.DEFAULT_ROWS
        raise SystemExit(asyncio.run(gcp_billing.main(rows, machine())))
    if sys.argv[1:]:
        raise SystemExit("usage: python -m bench [saas | genai [ROWS [ours|dlt|floor ...]] | gcp [ROWS]]")
    raise SystemExit(asyncio.run(main()))
