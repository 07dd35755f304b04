"""Process settings: one pydantic-settings class, read from `.env.{PIPELINE_ENV}` and the environment.

`PIPELINE_ENV` (`local` by default, or `stage`, `prod`) picks the file; a plain `.env` is never read.
Real environment variables win over the file. Secrets (the root key) come from the environment in
stage and prod; `.env.local` carries a development-only root key.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Environment(StrEnum):
    """The deployment environment; it names the `.env.*` file and the org dataset suffix."""

    LOCAL = "local"
    STAGE = "stage"
    PROD = "prod"


def env_file(environment: str | None = None) -> Path:
    """The settings file for `environment` (default: the `PIPELINE_ENV` variable, else local)."""
    name = Environment(environment or os.environ.get("PIPELINE_ENV", Environment.LOCAL.value))
    return PROJECT_ROOT / f".env.{name.value}"


class Settings(BaseSettings):
    """Every setting of the service, the CLI and the local stack."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, case_sensitive=False)

    pipeline_env: Environment = Field(Environment.LOCAL, description="Which environment this is.")
    gcp_project_id: str = Field("cloudact-local", description="Project that owns the datasets.")
    bigquery_location: str = Field("US", description="Location of datasets and jobs.")
    bigquery_endpoint: str = Field(
        "", description="BigQuery REST endpoint; empty for Google's, the emulator's URL locally."
    )
    meta_dataset: str = Field("organizations", description="Central dataset with the meta tables.")
    bigquery_job_timeout_seconds: float = Field(300.0, description="Deadline of one warehouse job.")
    bigquery_retry_deadline_seconds: float = Field(30.0, description="How long API calls are retried.")

    emulator_embedded: bool = Field(False, description="Start the bqemulator child process (local only).")
    emulator_rest_port: int = Field(9050, description="Emulator REST port.")
    emulator_grpc_port: int = Field(9060, description="Emulator gRPC port.")
    emulator_data_dir: Path = Field(PROJECT_ROOT / ".state" / "bqemulator", description="Emulator data.")

    database_url: SecretStr = Field(
        SecretStr(""), description="PostgreSQL DSN of the state store; empty with cloud_sql_instance set."
    )
    cloud_sql_instance: str = Field(
        "", description="Cloud SQL instance `project:region:instance`, reached with the Python Connector."
    )
    database_user: str = Field("", description="Cloud SQL IAM database user (the service account's name).")
    database_name: str = Field("pipeline_service", description="Cloud SQL database name.")
    database_pool_size: int = Field(10, ge=1, description="Connections per replica to the state store.")
    replica_lease_seconds: float = Field(
        15.0, gt=0, description="A replica that has not renewed its lease for this long is dead."
    )
    state_commit_delay_ms: float = Field(
        2.0,
        ge=0,
        le=50,
        description="Under concurrent calls (4+ entries queued behind a batch), the next batch of state "
        "writes and admissions goes out this long after the one before it (group commit); 0: at once.",
    )
    postgres_embedded: bool = Field(False, description="Start the local PostgreSQL child (local only).")
    postgres_port: int = Field(5433, description="Port of the local PostgreSQL.")
    postgres_data_dir: Path = Field(
        PROJECT_ROOT / ".state" / "postgres", description="Local PostgreSQL data."
    )

    grpc_host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    grpc_port: int = Field(50051, description="Port the gRPC server binds; 0 picks a free one.")
    grpc_grace_seconds: float = Field(10.0, description="How long shutdown lets in-flight calls finish.")
    envoy_port: int = Field(8001, description="Envoy REST listener (local stack).")
    provider_sandbox_port: int = Field(
        0,
        description="Local stack only: port of the OpenAI/Anthropic sandbox `make run` starts (0: none); "
        "PROVIDER_BASE_URL_OPENAI/_ANTHROPIC point at it unless set in the environment.",
    )
    envoy_admin_port: int = Field(9901, description="Envoy admin listener (local stack).")

    ca_root_api_key: SecretStr = Field(SecretStr(""), description="Root key for admin calls.")
    auth_cache_ttl_seconds: float = Field(10.0, description="How long a verified org key is trusted.")
    trusted_proxies: list[str] = Field(
        ["127.0.0.1", "::1"], description="Peers whose x-forwarded-for is believed (the Envoy sidecar)."
    )
    auth_failures_per_minute: int = Field(30, description="Failed auth attempts allowed per client.")

    max_concurrent_steps: int = Field(32, description="Step attempts executing at once, over all runs.")
    max_parallel_steps_per_run: int = Field(4, description="Independent steps of one run executing at once.")
    ledger_flush_seconds: float = Field(
        60.0,
        gt=0,
        description="How often the run history is exported from PostgreSQL to BigQuery (one load job per "
        "table each time): 60 s is 1,440 a day, within BigQuery's 1,500 per table; the runs are read from "
        "PostgreSQL meanwhile, so the copy's lag costs no reader anything.",
    )
    ledger_loads_per_day: int = Field(
        1400,
        ge=0,
        description="Ledger exports (one load job per table each) allowed per day over all replicas; "
        "BigQuery allows 1,500 load jobs per table per day. 0: no limit (the emulator has none).",
    )
    state_prune_seconds: float = Field(
        3600.0, ge=0, description="How often a replica prunes the state store (retention); 0 = never."
    )
    run_retention_days: int = Field(
        90, ge=0, description="Finished runs (once exported to BigQuery) stay this long; 0 = forever."
    )
    job_retention_days: int = Field(
        90, ge=0, description="Finished scheduler jobs and backfills stay this long; 0 = forever."
    )
    notification_log_retention_days: int = Field(
        90, ge=0, description="The notification log keeps entries this long; 0 = forever."
    )
    scheduler_tick_seconds: float = Field(
        60.0,
        ge=0,
        description="Scheduler tick period in-process; 0 = none (Cloud Scheduler calls it).",
    )
    scheduler_max_running: int = Field(50, ge=1, description="Scheduled runs at once over every replica.")
    scheduler_org_max_running: int = Field(3, ge=1, description="Scheduled runs at once per org.")
    scheduler_retry_base_seconds: float = Field(60.0, gt=0, description="First retry delay (doubles).")
    scheduler_retry_max_seconds: float = Field(3600.0, gt=0, description="Longest retry delay or deferral.")
    scheduler_catch_up_hours: float = Field(24.0, gt=0, description="How far back missed times are looked.")
    metrics_port: int = Field(0, description="Prometheus /metrics port on grpc_host; 0 disables it.")
    notifications_config: Path = Field(
        PROJECT_ROOT / "configs" / "notifications" / "config.json",
        description="Global notification settings (JSON, ${ENV_VAR} values); no file = no notifications.",
    )
    notify_sinks_embedded: bool = Field(
        False, description="Run a local SMTP sink and Slack receiver with the stack (local only)."
    )
    smtp_sink_port: int = Field(2525, description="Local SMTP sink port.")
    webhook_sink_port: int = Field(8025, description="Local Slack webhook receiver port.")

    http_connect_timeout_seconds: float = Field(10.0, description="Outbound HTTP connect timeout.")
    http_read_timeout_seconds: float = Field(60.0, description="Outbound HTTP: longest wait for body bytes.")
    http_total_timeout_seconds: float = Field(300.0, description="Outbound HTTP: one attempt, whole body.")
    http_max_attempts: int = Field(5, ge=1, description="Outbound HTTP attempts per call (429/5xx/errors).")
    http_backoff_initial_seconds: float = Field(
        1.0, description="First retry's backoff ceiling (full jitter)."
    )
    http_backoff_max_seconds: float = Field(
        30.0, description="Longest wait before one retry; a longer Retry-After ends the call (transient)."
    )
    http_retry_budget_seconds: float = Field(120.0, description="Total waiting between retries of one call.")
    http_max_response_bytes: int = Field(
        64 * 1024 * 1024, description="Largest body read whole (not streamed)."
    )
    http_max_connections: int = Field(100, description="Outbound connection pool size (per host: a fifth).")
    providers_file: Path = Field(
        PROJECT_ROOT / "configs" / "system" / "providers.yml", description="The provider registry."
    )
    credential_cache_ttl_seconds: float = Field(
        60.0, ge=0, description="How long a decrypted credential stays in memory (per credential version)."
    )
    kms_key_name: str = Field(
        "",
        description="Cloud KMS CryptoKey wrapping data keys: projects/P/locations/L/keyRings/R/cryptoKeys/K.",
    )
    kms_endpoint: str = Field("", description="Cloud KMS endpoint override (host:port); empty for Google's.")
    kms_insecure: bool = Field(False, description="Plaintext gRPC to kms_endpoint (tests' fake KMS only).")
    kms_timeout_seconds: float = Field(10.0, description="Deadline of one KMS call (retries included).")
    local_kek_file: Path = Field(
        PROJECT_ROOT / ".state" / "credentials-kek.json",
        description="Local key-encryption key (created on first use, mode 0600); local environment only.",
    )

    configs_dir: Path = Field(PROJECT_ROOT / "configs", description="Pipeline configs and schemas.")
    processor_dirs: list[Path] = Field(
        [], description="Extra folders of {provider}/{domain}.py processors (tests' test-only processors)."
    )
    schemas_dir: Path = Field(PROJECT_ROOT / "configs" / "schemas", description="Table schema files.")
    procedures_dir: Path = Field(PROJECT_ROOT / "procedures", description="Stored procedure sources.")
    state_dir: Path = Field(PROJECT_ROOT / ".state", description="Local runtime state (git-ignored).")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.pipeline_env is not Environment.LOCAL and (
            self.emulator_embedded or self.postgres_embedded or self.notify_sinks_embedded
        ):
            raise ValueError(
                "emulator_embedded, postgres_embedded and notify_sinks_embedded are only allowed locally"
            )
        if self.pipeline_env is Environment.PROD and len(self.ca_root_api_key.get_secret_value()) < 32:
            raise ValueError("CA_ROOT_API_KEY must be set (at least 32 characters) in prod")
        if self.pipeline_env is not Environment.LOCAL and (not self.kms_key_name or self.kms_insecure):
            raise ValueError("KMS_KEY_NAME must be set (and KMS_INSECURE off) outside the local environment")
        return self


def load_settings(environment: str | None = None, **overrides: Any) -> Settings:
    """Read the settings of `environment` (default from `PIPELINE_ENV`) with explicit overrides."""
    path = env_file(environment)
    return Settings(_env_file=path if path.exists() else None, **overrides)
