"""The benchmark's local stack: emulator, PostgreSQL, real service (in this process), echo server and its
floor variant (each in its own process), and one Envoy in front of the service and of the echo server.

Everything binds 127.0.0.1 on free ports and lives in a temporary folder; `Stack.stop` stops what was
started, in reverse order, even after a partial start.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench.echo import EchoProcess
from cloudact.pipeline.v1 import pipeline_service_pb2
from server import app
from server.localstack.emulator import Emulator
from server.localstack.envoy import Envoy
from server.localstack.postgres import Postgres
from server.localstack.process import free_port
from server.orgs import IssuedKey, Plan
from server.settings import Settings

BENCH_DIR = Path(__file__).resolve().parent
CONFIGS = BENCH_DIR / "configs"
UNLIMITED = Plan(
    name="BENCH", daily_limit=10**9, monthly_limit=10**9, concurrent_limit=10**6, requests_per_minute=10**9
)


@dataclass
class Stack:
    """What the benchmark started; fields stay None until started."""

    folder: Path
    emulator: Emulator | None = None
    postgres: Postgres | None = None
    service: app.Service | None = None
    envoy: Envoy | None = None
    echo: EchoProcess | None = None
    echo_envoy: Envoy | None = None
    floor: EchoProcess | None = None
    org_slug: str = ""
    key: IssuedKey | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def api_key(self) -> str:
        """The org's API key."""
        assert self.key is not None
        return self.key.api_key

    async def stop(self) -> None:
        """Stop everything started, in reverse order; errors are reported, not raised."""
        steps: list[tuple[str, object]] = [
            ("echo envoy", self.echo_envoy),
            ("echo server", self.echo),
            ("floor server", self.floor),
            ("envoy", self.envoy),
            ("service", self.service),
            ("postgres", self.postgres),
            ("emulator", self.emulator),
        ]
        for name, part in steps:
            if part is None:
                continue
            try:
                if isinstance(part, Envoy | Emulator | Postgres):
                    await asyncio.to_thread(part.stop)
                elif isinstance(part, EchoProcess | app.Service):
                    await part.stop()
            except Exception as exc:  # keep stopping the rest
                print(f"  warning: stopping {name} failed: {type(exc).__name__}: {exc}")
        shutil.rmtree(self.folder, ignore_errors=True)


def bench_settings(endpoint: str, state_dir: Path, database_url: str) -> Settings:
    """The service's settings for the benchmark: defaults except ports, paths, project and root key and
    the state store; the ledger is exported at its production cadence (`ledger_flush_seconds`, once a
    minute) without a daily load budget (the emulator has no quota): each real cell ends with a flush of
    its runs, whose cost is in the cell's CPU per call and reported on its own."""
    return Settings(
        database_url=database_url,
        pipeline_env="local",
        gcp_project_id="bench-project",
        bigquery_endpoint=endpoint,
        meta_dataset="organizations",
        grpc_host="127.0.0.1",
        grpc_port=0,
        grpc_grace_seconds=1.0,
        ca_root_api_key="bench-root-key-" + secrets.token_hex(16),
        configs_dir=CONFIGS,
        state_dir=state_dir,
        metrics_port=0,
        ledger_loads_per_day=0,
    )


async def start_stack(stack: Stack) -> None:
    """Start emulator, service, org, Envoy; the echo server and its Envoy come from `start_echo`."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    folder = stack.folder
    stack.emulator = await asyncio.to_thread(
        Emulator,
        rest_port=free_port(),
        grpc_port=free_port(),
        project="bench-project",
        data_dir=folder / "emulator" / "data",
        log_path=folder / "emulator" / "bqemulator.log",
    )
    stack.timings["emulator"] = loop.time() - began
    began = loop.time()
    # Durable (fsync on, the defaults): a commit costs what it costs in production.
    stack.postgres = await asyncio.to_thread(
        Postgres, port=free_port(), data_dir=folder / "postgres", log_path=folder / "postgres.log"
    )
    stack.timings["postgres"] = loop.time() - began
    began = loop.time()
    stack.service = await app.start(
        bench_settings(stack.emulator.endpoint, folder / "state", stack.postgres.dsn)
    )
    app.settle_heap()  # as `pipeline-service serve` does once started
    stack.timings["service"] = loop.time() - began
    began = loop.time()
    stack.org_slug = f"bench_{uuid.uuid4().hex[:8]}"
    _, stack.key = await stack.service.orgs.create_org(stack.org_slug, company_name="Bench", plan=UNLIMITED)
    stack.timings["org"] = loop.time() - began
    began = loop.time()
    stack.envoy = await asyncio.to_thread(Envoy, grpc_port=stack.service.port, work_dir=folder / "envoy")
    stack.timings["envoy"] = loop.time() - began


async def start_echo(stack: Stack, response: pipeline_service_pb2.RunPipelineResponse) -> None:
    """Start the echo server answering `response`, an Envoy in front of it, and the floor server."""
    echo = await EchoProcess.start(response)
    stack.echo = echo
    stack.floor = await EchoProcess.start(response, floor=True)
    stack.echo_envoy = await asyncio.to_thread(
        Envoy, grpc_port=echo.port, work_dir=stack.folder / "echo-envoy"
    )


def new_stack() -> Stack:
    """A stack with its own temporary folder."""
    return Stack(folder=Path(tempfile.mkdtemp(prefix="pipeline-bench-")))


async def finish_runs(service: app.Service, max_seconds: float = 20.0) -> None:
    """Wait until no run is active (at most `max_seconds`)."""
    tasks = [live.run.task for live in list(service.runs._active.values()) if live.run.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=max_seconds)


async def drain(service: app.Service, max_seconds: float = 20.0) -> float:
    """Wait until no run is active and the ledger is exported; return the seconds waited."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    await finish_runs(service, max_seconds)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(service.ledger.flush(), max(1.0, began + max_seconds - loop.time()))
    return loop.time() - began
