"""The embedded warehouse: the `bqemulator` BigQuery emulator as a child process on 127.0.0.1.

It runs from its own virtualenv (`.venv-bqemulator`, made by `make install`) because its pins clash with
the service's grpc packages, and with a project-owned HOME holding DuckDB's offline spatial extension.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from server.localstack.process import ChildProcess, http_ok
from server.settings import PROJECT_ROOT, Settings

BQE_BIN = PROJECT_ROOT / ".venv-bqemulator" / "bin" / "bqemulator"
BQE_HOME = PROJECT_ROOT / ".state" / "bqemulator" / "home"


class Emulator:
    """A running emulator; `endpoint` is its REST URL."""

    def __init__(
        self,
        *,
        rest_port: int,
        grpc_port: int,
        project: str,
        data_dir: Path | None,
        log_path: Path,
        timeout: float = 60.0,
    ) -> None:
        if not BQE_BIN.exists():
            raise RuntimeError(f"{BQE_BIN} is missing: run `make install` first")
        storage = ["--persistent", "--data-dir", str(data_dir)] if data_dir else ["--ephemeral"]
        if data_dir:
            data_dir.mkdir(parents=True, exist_ok=True)
        self.endpoint = f"http://127.0.0.1:{rest_port}"
        self._child = ChildProcess(
            "bqemulator",
            [
                str(BQE_BIN),
                "start",
                "--rest-host",
                "127.0.0.1",
                "--rest-port",
                str(rest_port),
                "--grpc-host",
                "127.0.0.1",
                "--grpc-port",
                str(grpc_port),
                *storage,
                "--project",
                project,
                "--log-level",
                "warning",
                "--log-format",
                "json",
                "--no-admin",
            ],
            log_path,
            env={"HOME": str(BQE_HOME)},
        )
        self._child.wait_until(lambda: is_running(self.endpoint), timeout)

    @property
    def pid(self) -> int:
        """The emulator's process id."""
        return self._child.process.pid

    def stop(self) -> None:
        """Stop the emulator (its data stays in the data dir)."""
        self._child.stop()


def is_running(endpoint: str) -> bool:
    """Whether an emulator (or anything healthy) answers at `endpoint`."""
    return http_ok(f"{endpoint}/healthz", '"ok"')


@asynccontextmanager
async def embedded(settings: Settings) -> AsyncIterator[Emulator | None]:
    """Start the local emulator for the duration of the block unless it already runs (or is not wanted)."""
    if not settings.emulator_embedded or is_running(settings.bigquery_endpoint):
        yield None
        return
    emu = await asyncio.to_thread(
        Emulator,
        rest_port=settings.emulator_rest_port,
        grpc_port=settings.emulator_grpc_port,
        project=settings.gcp_project_id,
        data_dir=settings.emulator_data_dir / "data",
        log_path=settings.state_dir / "logs" / "bqemulator.log",
    )
    try:
        yield emu
    finally:
        await asyncio.to_thread(emu.stop)
