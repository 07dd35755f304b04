"""A run whose server process is killed (SIGKILL) is closed as FAILED, reason INTERRUPTED, by the next
server process that starts on the same meta dataset.

The servers here are real `pipeline-service serve` processes on the session's emulator. They use their
own meta dataset: a starting server closes every run of its meta dataset that has a PENDING event and no
`pipeline_runs` row, which on the session's dataset would include the in-process `service`'s live runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from server import app, meta
from server.localstack.emulator import Emulator
from server.localstack.process import free_port
from server.orgs import OrgRepository
from server.settings import PROJECT_ROOT, Settings
from tests.conftest import Org, make_org
from tests.integration.cli_runner import CLI, cli_env
from tests.integration.runs import wait_terminal

PS = pipeline_service_pb2
RS = pipeline_run_pb2
READY_SECONDS = 60.0


async def eventually(
    what: str, probe: Callable[[], Awaitable[Any]], within: float = 30.0, interval: float = 0.2
) -> Any:
    """Poll `probe` until it returns something truthy (returned); fail naming `what` after `within` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: Any = None
    while loop.time() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what}: not within {within:g}s (last: {last!r})")


class ServerProcess:
    """One `pipeline-service serve` child process with its stdout and stderr in a log file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = {**env, "GRPC_PORT": str(self.port)}
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the server (the console script's own python process, no shell in between)."""
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                str(CLI),
                "serve",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, **self.env},
                cwd=PROJECT_ROOT,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def tail(self, lines: int = 40) -> str:
        """The last lines of the server's output."""
        if not self.log_path.exists():
            return "(no output)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def wait_serving(self, channel: aio.Channel, within: float = READY_SECONDS) -> None:
        """Poll grpc.health.v1.Health/Check until SERVING; fail at once if the process exits."""
        assert self.process is not None
        health = health_pb2_grpc.HealthStub(channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            if self.process.returncode is not None:
                raise AssertionError(f"server exited with {self.process.returncode} before serving")
            with contextlib.suppress(aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.2)
        raise AssertionError(f"server on {self.address} not SERVING after {within:g}s")

    async def kill(self) -> int:
        """SIGKILL: no shutdown code runs, the ledger's buffers are lost. Return the exit status."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        return await self.process.wait()

    async def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM (graceful shutdown), then SIGKILL after `grace` seconds; return the exit status."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return self.process.returncode


@contextlib.asynccontextmanager
async def running(env: dict[str, str], log_path: Path) -> AsyncIterator[tuple[ServerProcess, aio.Channel]]:
    """A SERVING server process and a channel to it; always stopped (and its log tail printed on failure)."""
    server = ServerProcess(env, log_path)
    try:
        await server.start()
        async with aio.insecure_channel(server.address) as channel:
            await server.wait_serving(channel)
            yield server, channel
    except BaseException:
        print(f"--- {log_path.name} (pid {server.pid if server.process else '-'}), last lines ---")
        print(server.tail())
        raise
    finally:
        await server.stop()


def server_env(settings: Settings, emulator: Emulator, meta_dataset: str) -> dict[str, str]:
    """The environment of a `pipeline-service serve` on the session emulator with its own meta dataset."""
    return cli_env(
        settings,
        emulator,
        META_DATASET=meta_dataset,
        CA_ROOT_API_KEY=settings.ca_root_api_key.get_secret_value(),
        SCHEMAS_DIR=str(settings.schemas_dir),
        LEDGER_FLUSH_SECONDS="0.2",
        GRPC_GRACE_SECONDS="1",
        METRICS_PORT="0",
    )


@pytest.mark.timeout(300)
async def test_killed_server_leaves_its_run_failed_interrupted_after_restart(
    service: app.Service,
    settings: Settings,
    emulator: Emulator,
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub,
    tmp_path: Path,
) -> None:
    wh = service.warehouse
    meta_dataset = f"interrupted_{uuid.uuid4().hex[:8]}"
    await meta.bootstrap(wh, meta_dataset, service.settings.schemas_dir)
    orgs = OrgRepository(wh, meta_dataset, "local", service.settings.schemas_dir)
    slug = f"interrupted_{uuid.uuid4().hex[:8]}"
    dataset, key = await orgs.create_org(slug, company_name="Interrupted")
    org = Org(slug, dataset, key)
    env = server_env(settings, emulator, meta_dataset)
    runs_table = wh.table_ref(meta_dataset, "pipeline_runs")
    events_table = wh.table_ref(meta_dataset, "pipeline_run_events")

    async def run_transitions(run_id: str) -> list[dict[str, Any]]:
        rows = await wh.query(
            f"SELECT from_state, to_state, reason, `at` FROM {events_table} "
            "WHERE run_id = @id AND kind = 'RUN_TRANSITION'",
            {"id": run_id},
        )
        return sorted(rows, key=lambda r: r["at"])

    async def run_rows(run_id: str) -> list[dict[str, Any]]:
        return await wh.query(f"SELECT state, reason FROM {runs_table} WHERE run_id = @id", {"id": run_id})

    # A run of the in-process service on the session meta dataset: it must not notice anything.
    bystander: Org = await make_org(service, "bystander")
    in_process_active_before = set(service.runs._active)
    bystander_run = (
        await pipelines.RunPipeline(
            PS.RunPipelineRequest(
                org_slug=bystander.slug, provider="engine", domain="runs", pipeline="sleepy"
            ),
            metadata=bystander.metadata,
            timeout=30,
        )
    ).run
    try:
        # 1. First server: start sleepy and wait until its RUNNING transition is in the ledger.
        async with running(env, tmp_path / "server-1.log") as (first, channel):
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            run = (
                await stub.RunPipeline(
                    PS.RunPipelineRequest(org_slug=slug, provider="engine", domain="runs", pipeline="sleepy"),
                    metadata=org.metadata,
                    timeout=30,
                )
            ).run
            run_id = run.run_id
            assert run.state in (RS.RUN_STATE_PENDING, RS.RUN_STATE_RUNNING), run

            async def is_running() -> bool:
                got = (
                    await stub.GetPipelineRun(
                        PS.GetPipelineRunRequest(run_id=run_id), metadata=org.metadata, timeout=10
                    )
                ).run
                return got.state == RS.RUN_STATE_RUNNING

            await eventually("GetPipelineRun says RUNNING", is_running, within=20)

            async def running_flushed() -> bool:
                return any(t["to_state"] == "RUNNING" for t in await run_transitions(run_id))

            await eventually("RUNNING transition flushed", running_flushed, within=20)
            assert [t["to_state"] for t in await run_transitions(run_id)] == ["PENDING", "RUNNING"]

            assert await first.kill() == -signal.SIGKILL
        assert await run_rows(run_id) == [], "a killed process cannot have written the run's row"

        # 2. Second server on the same meta dataset: it closes the run at start.
        async with running(env, tmp_path / "server-2.log") as (second, channel):
            assert second.pid != first.pid
            assert "closed 1 interrupted runs" in second.log_path.read_text(errors="replace")
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            got = (
                await stub.GetPipelineRun(
                    PS.GetPipelineRunRequest(run_id=run_id), metadata=org.metadata, timeout=10
                )
            ).run
            assert got.state == RS.RUN_STATE_FAILED and got.reason == "INTERRUPTED", got
            assert got.run_id == run_id and got.org_slug == slug and got.pipeline == "sleepy"
            assert got.parameters["sleep"] == "30"
            assert got.end_time.seconds > 0
            rows = await run_rows(run_id)
            assert len(rows) == 1 and rows[0]["state"] == "FAILED" and rows[0]["reason"] == "INTERRUPTED", (
                rows
            )
            assert [t["to_state"] for t in await run_transitions(run_id)] == ["PENDING", "RUNNING", "FAILED"]

            # The restarted server runs new work to completion.
            fresh = (
                await stub.RunPipeline(
                    PS.RunPipelineRequest(
                        org_slug=slug, provider="engine", domain="runs", pipeline="quick", date="2025-02-28"
                    ),
                    metadata=org.metadata,
                    timeout=30,
                )
            ).run
            done = await wait_terminal(stub, org, fresh.run_id)
            assert done.state == RS.RUN_STATE_COMPLETED, done
            assert [s.state for s in done.steps] == [RS.STEP_STATE_SUCCEEDED] * 2

            # The in-process service: its run still RUNNING, its slot held, its other runs untouched.
            seen = (
                await pipelines.GetPipelineRun(
                    PS.GetPipelineRunRequest(run_id=bystander_run.run_id),
                    metadata=bystander.metadata,
                    timeout=10,
                )
            ).run
            assert seen.state == RS.RUN_STATE_RUNNING, seen
            assert set(service.runs._active) - {bystander_run.run_id} == in_process_active_before
            assert service.runs._quotas.active(bystander.slug) == 1
            assert service.runs._quotas.active(slug) == 0 and service.runs._quotas.used(slug) == (0, 0)
        assert await second.stop() == 0, "SIGTERM is a clean shutdown"

        # A graceful stop and another start change nothing: the run stays closed exactly once.
        async with running(env, tmp_path / "server-3.log"):
            rows = await run_rows(run_id)
            assert len(rows) == 1 and rows[0]["state"] == "FAILED", rows
            assert [t["to_state"] for t in await run_transitions(run_id)] == ["PENDING", "RUNNING", "FAILED"]
            assert [r["state"] for r in await run_rows(fresh.run_id)] == ["COMPLETED"]
    finally:
        with contextlib.suppress(grpc.RpcError):
            await pipelines.CancelPipelineRun(
                PS.CancelPipelineRunRequest(run_id=bystander_run.run_id),
                metadata=bystander.metadata,
                timeout=10,
            )
    cancelled = await wait_terminal(pipelines, bystander, bystander_run.run_id)
    assert cancelled.state == RS.RUN_STATE_CANCELLED, cancelled
    assert service.runs._quotas.active(bystander.slug) == 0
    session_meta = wh.table_ref(service.settings.meta_dataset, "pipeline_runs")
    assert await wh.query(f"SELECT run_id FROM {session_meta} WHERE reason = 'INTERRUPTED'") == []
