"""Shared fixtures: one emulator, one gRPC server and one Envoy per test session, all real processes or
servers on free 127.0.0.1 ports, stopped at the end of the session."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from grpc import aio

from cloudact.pipeline.v1 import pipeline_service_pb2_grpc, procedure_service_pb2_grpc
from server import app
from server.errors import TerminalError
from server.localstack.emulator import Emulator
from server.localstack.envoy import Envoy
from server.localstack.postgres import Postgres, dsn
from server.localstack.process import free_port
from server.localstack.providers import ProviderSandbox
from server.orgs import IssuedKey
from server.settings import Settings
from tests.fakes.google import FakeGoogle
from tests.fakes.kms import FakeKms
from tests.fakes.provider import FakeProvider

ROOT_KEY = "test-root-key-" + uuid.uuid4().hex
# The provider sandbox (fake OpenAI and Anthropic admin APIs) of the session; the service's provider
# registry reads these when it starts, so they are set before any fixture builds it.
SANDBOX_PORT = free_port()
for _provider in ("OPENAI", "ANTHROPIC"):
    os.environ[f"PROVIDER_BASE_URL_{_provider}"] = f"http://127.0.0.1:{SANDBOX_PORT}"
DATA = Path(__file__).parent / "data"
TEST_PROCESSORS = Path(__file__).parent / "processors"  # test-only ps_types (testprovider.*)
KMS_KEY = "projects/test-project/locations/us/keyRings/pipeline-service/cryptoKeys/credentials"


@pytest.fixture(scope="session")
async def provider_sandbox() -> AsyncIterator[ProviderSandbox]:
    sandbox = await ProviderSandbox().start(SANDBOX_PORT)
    yield sandbox
    await sandbox.stop()


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    # Persistent mode on a temporary folder: the ephemeral (in-memory) mode loses tables between
    # connections of the emulator.
    folder = tmp_path_factory.mktemp("emulator")
    emu = Emulator(
        rest_port=free_port(),
        grpc_port=free_port(),
        project="test-project",
        data_dir=folder / "data",
        log_path=folder / "bqemulator.log",
    )
    yield emu
    emu.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    # A folder of its own under /tmp: PostgreSQL runs as the `pgserver` user when we are root, and pytest's
    # temporary folders are private to root.
    folder = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    server = Postgres(
        port=free_port(), data_dir=folder / "data", log_path=folder / "postgres.log", durable=False
    )
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
async def fake_kms() -> AsyncIterator[FakeKms]:
    """Cloud KMS for the session's server: the stage/prod code path (official async client, CRC32C)."""
    fake = FakeKms([KMS_KEY])
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(scope="session")
async def fake_provider() -> AsyncIterator[FakeProvider]:
    """The provider `generic` of the registry points here (PROVIDER_BASE_URL_GENERIC, read at start)."""
    fake = FakeProvider()
    await fake.start()
    os.environ["PROVIDER_BASE_URL_GENERIC"] = fake.url
    yield fake
    os.environ.pop("PROVIDER_BASE_URL_GENERIC", None)
    await fake.stop()


# The Google APIs of the registry and their token endpoint point at the fake (read at start).
GOOGLE_PROVIDERS = ("GCP", "GCP_BILLING_CATALOG", "GCP_RESOURCE_MANAGER")


@pytest.fixture(scope="session")
async def fake_google() -> AsyncIterator[FakeGoogle]:
    """Google's token endpoint, Cloud Billing Catalog and Resource Manager for the session's server."""
    fake = FakeGoogle()
    await fake.start()
    for provider in GOOGLE_PROVIDERS:
        os.environ[f"PROVIDER_TOKEN_URL_{provider}"] = f"{fake.url}/token"
        if provider != "GCP":
            os.environ[f"PROVIDER_BASE_URL_{provider}"] = fake.url
    yield fake
    for provider in GOOGLE_PROVIDERS:
        os.environ.pop(f"PROVIDER_TOKEN_URL_{provider}", None)
        os.environ.pop(f"PROVIDER_BASE_URL_{provider}", None)
    await fake.stop()


@pytest.fixture(scope="session")
def settings(
    emulator: Emulator,
    postgres: Postgres,
    tmp_path_factory: pytest.TempPathFactory,
    fake_kms: FakeKms,
    fake_provider: FakeProvider,
    fake_google: FakeGoogle,
) -> Settings:
    state = tmp_path_factory.mktemp("state")
    return Settings(
        pipeline_env="local",
        gcp_project_id="test-project",
        bigquery_endpoint=emulator.endpoint,
        meta_dataset="organizations",
        grpc_port=0,
        grpc_grace_seconds=1.0,
        ca_root_api_key=ROOT_KEY,
        auth_cache_ttl_seconds=0.5,
        auth_failures_per_minute=10_000,
        bigquery_retry_deadline_seconds=5.0,
        ledger_loads_per_day=0,  # as .env.local: the emulator has no load-job quota
        ledger_flush_seconds=0.5,  # tests read the BigQuery copy soon after a run
        database_url=postgres.dsn,
        replica_lease_seconds=2.0,
        scheduler_tick_seconds=0,  # scheduler tests tick themselves, with their own clock and orgs
        notifications_config=DATA / "notifications" / "config.json",  # tests build their own notifiers
        configs_dir=DATA / "configs",
        processor_dirs=[TEST_PROCESSORS],
        state_dir=state,
        local_kek_file=state / "credentials-kek.json",
        kms_key_name=KMS_KEY,
        kms_endpoint=f"127.0.0.1:{fake_kms.port}",
        kms_insecure=True,
        kms_timeout_seconds=1.0,
        http_backoff_initial_seconds=0.05,
        http_backoff_max_seconds=5.0,
        http_read_timeout_seconds=5.0,
    )


@pytest.fixture(scope="session")
async def service(settings: Settings) -> AsyncIterator[app.Service]:
    svc = await app.start(settings)
    yield svc
    await svc.stop()


@pytest.fixture(scope="session")
def envoy(service: app.Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    proxy = Envoy(grpc_port=service.port, work_dir=tmp_path_factory.mktemp("envoy"))
    yield proxy
    proxy.stop()


@dataclass
class Org:
    slug: str
    dataset: str
    key: IssuedKey

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key.api_key}

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.key.api_key),)


@asynccontextmanager
async def scratch_database(postgres: Postgres, prefix: str) -> AsyncIterator[str]:
    """A database of its own named `{prefix}_{8 hex}` on the session's PostgreSQL, for the block (so no
    other test's service sweeps, prunes or reads its rows): its DSN. Dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres.dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            yield dsn(postgres.port, name)
        finally:
            await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


async def make_org(service: app.Service, prefix: str, **fields: Any) -> Org:
    """A fresh org named `{prefix}_{8 hex}`; `fields` go to `create_org` (plan, fiscal year, ...)."""
    slug = f"{prefix}_{uuid.uuid4().hex[:8]}"
    fields.setdefault("company_name", prefix.title())
    dataset, key = await service.orgs.create_org(slug, **fields)
    return Org(slug, dataset, key)


@pytest.fixture(scope="session")
async def acme(service: app.Service) -> Org:
    return await make_org(service, "acme")


@pytest.fixture(scope="session")
async def globex(service: app.Service) -> Org:
    return await make_org(service, "globex")


@contextmanager
def warehouse_rejects(pattern: str) -> Iterator[None]:
    """The block raises TerminalError whose operator detail (the warehouse's own words, e.g. a
    procedure's ERROR() text) matches `pattern`; callers only ever see the message."""
    with pytest.raises(TerminalError) as caught:
        yield
    assert re.search(pattern, caught.value.detail), caught.value.detail
    assert not re.search(pattern, caught.value.message)


ROOT_HEADERS = {"X-CA-Root-Key": ROOT_KEY}
ROOT_METADATA = (("x-ca-root-key", ROOT_KEY),)


@pytest.fixture(scope="session")
async def channel(service: app.Service) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        yield ch


@pytest.fixture(scope="session")
def pipelines(channel: aio.Channel) -> pipeline_service_pb2_grpc.PipelineServiceStub:
    return pipeline_service_pb2_grpc.PipelineServiceStub(channel)


@pytest.fixture(scope="session")
def procedures(channel: aio.Channel) -> procedure_service_pb2_grpc.ProcedureServiceStub:
    return procedure_service_pb2_grpc.ProcedureServiceStub(channel)


@pytest.fixture(scope="session")
async def http(envoy: Envoy) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=envoy.rest_url) as session:
        yield session


__all__ = ["ROOT_HEADERS", "ROOT_METADATA", "Org", "grpc", "make_org", "warehouse_rejects"]
