"""Running the real `pipeline-service` console script against the session's emulator."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from server.localstack.emulator import Emulator
from server.settings import Settings

CLI = str(Path(".venv/bin/pipeline-service").resolve())


async def run_cli(settings: Settings, emulator: Emulator, *args: str) -> tuple[int, str]:
    """Run one command with the session's settings; return its exit code and standard output."""
    env = {
        **os.environ,
        "PIPELINE_ENV": "local",
        "BIGQUERY_ENDPOINT": emulator.endpoint,
        "GCP_PROJECT_ID": settings.gcp_project_id,
        "META_DATASET": settings.meta_dataset,
        "EMULATOR_EMBEDDED": "false",
        "BIGQUERY_RETRY_DEADLINE_SECONDS": "5",
        "CONFIGS_DIR": str(settings.configs_dir),
    }
    proc = await asyncio.create_subprocess_exec(
        CLI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()
