"""The load generator: RunPipeline over gRPC or REST at a fixed number of calls in flight.

It runs in its own process (`python -m bench.load`, a JSON `Cell` on stdin, a JSON `CellResult` on
stdout) so the client's CPU is not taken from the server's event loop. Every call carries unique
parameters (`{"i": "<tag>-<n>"}`) so the service never refuses one as a duplicate of an active run.
Bounded twice: by the number of calls and by a deadline.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

Transport = Literal["grpc", "rest"]


@dataclass(frozen=True)
class Cell:
    """One measurement: where to call, how, and how many times."""

    name: str
    transport: Transport
    target: str  # "127.0.0.1:port" for gRPC, "http://127.0.0.1:port" for REST
    api_key: str
    org_slug: str
    concurrency: int
    warmup: int
    count: int
    deadline_seconds: float
    provider: str = "bench"
    domain: str = "runs"
    pipeline: str = "noop"


@dataclass
class CellResult:
    """What one cell measured (latencies in milliseconds, of successful calls only)."""

    name: str
    concurrency: int
    calls: int
    errors: int
    seconds: float
    calls_per_second: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    timed_out: bool
    warmup_ok: int = 0
    client_cpu_seconds: float = 0.0  # this process's CPU during the measured calls
    error_samples: list[str] = field(default_factory=list)


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


Call = Callable[[int], Awaitable[str | None]]  # returns an error text, or None on success


async def _drive(
    call: Call, *, concurrency: int, start: int, count: int, deadline: float
) -> tuple[list[float], list[str], float, bool]:
    """`count` calls numbered from `start`, `concurrency` at a time, stopping early at `deadline`."""
    latencies: list[float] = []
    errors: list[str] = []
    next_n = start
    end = start + count
    timed_out = False

    async def worker() -> None:
        nonlocal next_n, timed_out
        while next_n < end:
            if time.perf_counter() > deadline:
                timed_out = True
                return
            n = next_n
            next_n += 1
            began = time.perf_counter()
            try:
                error = await call(n)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
            took = time.perf_counter() - began
            if error is None:
                latencies.append(took * 1000.0)
            else:
                errors.append(error)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - began, timed_out


async def _with_grpc(cell: Cell, body: Callable[[Call], Awaitable[CellResult]]) -> CellResult:
    import grpc
    from grpc import aio

    from cloudact.pipeline.v1 import pipeline_service_pb2, pipeline_service_pb2_grpc

    metadata = (("x-api-key", cell.api_key),)
    async with aio.insecure_channel(cell.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)

        async def call(n: int) -> str | None:
            request = pipeline_service_pb2.RunPipelineRequest(
                org_slug=cell.org_slug,
                provider=cell.provider,
                domain=cell.domain,
                pipeline=cell.pipeline,
                parameters={"i": f"{cell.name}-{n}"},
            )
            try:
                response = await stub.RunPipeline(request, metadata=metadata, timeout=30)
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()}"[:300]
            return None if response.run.run_id else "empty run_id"

        return await body(call)


async def _with_rest(cell: Cell, body: Callable[[Call], Awaitable[CellResult]]) -> CellResult:
    import aiohttp

    url = f"{cell.target}/api/v1/pipelines/run/{cell.org_slug}/{cell.provider}/{cell.domain}/{cell.pipeline}"
    headers = {"X-API-Key": cell.api_key, "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=32)  # keep-alive is aiohttp's default
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def call(n: int) -> str | None:
            payload = json.dumps({"parameters": {"i": f"{cell.name}-{n}"}})
            async with session.post(url, data=payload, headers=headers) as response:
                text = await response.read()
                if response.status != 200:
                    return f"HTTP {response.status}: {text[:200].decode(errors='replace')}"
                return None if b'"run_id"' in text else "no run_id in body"

        return await body(call)


async def measure(cell: Cell) -> CellResult:
    """Warm up, then measure `cell.count` calls (or as many as fit before the deadline)."""

    async def body(call: Call) -> CellResult:
        deadline = time.perf_counter() + cell.deadline_seconds
        warm, _, _, _ = await _drive(
            call, concurrency=cell.concurrency, start=0, count=cell.warmup, deadline=deadline
        )
        cpu_before = time.process_time()
        latencies, errors, seconds, timed_out = await _drive(
            call, concurrency=cell.concurrency, start=cell.warmup, count=cell.count, deadline=deadline
        )
        client_cpu = time.process_time() - cpu_before
        latencies.sort()
        done = len(latencies)
        return CellResult(
            name=cell.name,
            concurrency=cell.concurrency,
            calls=done,
            errors=len(errors),
            seconds=seconds,
            calls_per_second=done / seconds if seconds > 0 else 0.0,
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            mean_ms=sum(latencies) / done if done else 0.0,
            timed_out=timed_out,
            warmup_ok=len(warm),
            client_cpu_seconds=client_cpu,
            error_samples=sorted(set(errors))[:3],
        )

    runner = _with_grpc if cell.transport == "grpc" else _with_rest
    return await runner(cell, body)


async def run_in_subprocess(cell: Cell, cores: set[int] | None = None) -> CellResult:
    """Measure `cell` in a fresh `python -m bench.load` process (bounded by the cell's deadline), on
    `cores` if given."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.load",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    if cores is not None:  # set before it starts gRPC's threads (they inherit it): its imports take longer
        os.sched_setaffinity(process.pid, cores)
    try:
        out, err = await asyncio.wait_for(
            process.communicate(json.dumps(asdict(cell)).encode()), cell.deadline_seconds + 15
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RuntimeError(f"load generator for {cell.name} did not finish") from None
    if process.returncode != 0:
        raise RuntimeError(f"load generator for {cell.name} failed:\n{err.decode(errors='replace')[-2000:]}")
    return CellResult(**json.loads(out))


def main() -> None:
    """Subprocess entry: a JSON `Cell` on stdin, a JSON `CellResult` on stdout."""
    cell = Cell(**json.loads(sys.stdin.read()))
    result = asyncio.run(measure(cell))
    sys.stdout.write(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
