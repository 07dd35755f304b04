"""`pipeline-service serve` child processes for the tests that need whole servers (replicas, crashes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.localstack.emulator import Emulator
from server.localstack.process import free_port
from server.settings import PROJECT_ROOT, Settings
from tests.integration.cli_runner import CLI, cli_env

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
        """SIGKILL: no shutdown code runs. Return the exit status."""
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


def server_env(settings: Settings, emulator: Emulator, **overrides: str) -> dict[str, str]:
    """The environment of a `pipeline-service serve` on the session's emulator and PostgreSQL."""
    return cli_env(
        settings,
        emulator,
        CA_ROOT_API_KEY=settings.ca_root_api_key.get_secret_value(),
        SCHEMAS_DIR=str(settings.schemas_dir),
        LEDGER_FLUSH_SECONDS="0.2",
        GRPC_GRACE_SECONDS="1",
        METRICS_PORT="0",
        **overrides,
    )
