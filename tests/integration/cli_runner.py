"""Running the real `pipeline-service` console script against the session's emulator."""

from __future__ import annotations

import asyncio
import json
import os

from server.localstack.emulator import Emulator
from server.settings import PROJECT_ROOT, Settings

CLI = PROJECT_ROOT / ".venv" / "bin" / "pipeline-service"


def cli_env(settings: Settings, emulator: Emulator, **overrides: str) -> dict[str, str]:
    """The variables that point the script at the session's emulator, meta dataset and configs."""
    return {
        "PIPELINE_ENV": "local",
        "BIGQUERY_ENDPOINT": emulator.endpoint,
        "GCP_PROJECT_ID": settings.gcp_project_id,
        "META_DATASET": settings.meta_dataset,
        "EMULATOR_EMBEDDED": "false",
        "POSTGRES_EMBEDDED": "false",
        "DATABASE_URL": settings.database_url.get_secret_value(),
        "REPLICA_LEASE_SECONDS": str(settings.replica_lease_seconds),
        "BIGQUERY_RETRY_DEADLINE_SECONDS": "5",
        "CONFIGS_DIR": str(settings.configs_dir),
        "PROCESSOR_DIRS": json.dumps([str(p) for p in settings.processor_dirs]),
        "KMS_KEY_NAME": settings.kms_key_name,
        "KMS_ENDPOINT": settings.kms_endpoint,
        "KMS_INSECURE": str(settings.kms_insecure).lower(),
        "KMS_TIMEOUT_SECONDS": str(settings.kms_timeout_seconds),
        "LOCAL_KEK_FILE": str(settings.local_kek_file),
        "PROVIDER_BASE_URL_GENERIC": os.environ.get("PROVIDER_BASE_URL_GENERIC", ""),
        **overrides,
    }


async def run_cli(
    settings: Settings, emulator: Emulator, *args: str, stdin: bytes | None = None, **overrides: str
) -> tuple[int, str]:
    """Run one command with the session's settings; return its exit code and standard output."""
    env = {**os.environ, **cli_env(settings, emulator, **overrides)}
    proc = await asyncio.create_subprocess_exec(
        CLI,
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 60)
    return proc.returncode or 0, out.decode()
