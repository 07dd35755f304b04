"""Credentials end to end on the session's real server: a test processor (tests/processors/testprovider)
reads the org's credential through its context (envelope-decrypted with the fake Cloud KMS driven by the
official async client), calls the fake provider through the HTTP client, survives 429 and 5xx, and writes
rows. Tampered rows, rows copied to another org and a KMS outage fail the step cleanly; a known secret
appears in no log line, ledger row, response or metric."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY, generate_latest

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from server import app
from server.credentials import envelope
from server.credentials.store import b64
from server.credentials.vault import CredentialVault
from server.errors import TerminalError
from server.localstack.emulator import Emulator
from server.logs import JsonFormatter
from server.settings import Settings
from server.warehouse.bigquery import Typed
from server.warehouse.schema import TableSchema
from tests.conftest import Org, make_org
from tests.fakes.kms import FakeKms
from tests.fakes.provider import FakeProvider, Reply
from tests.integration.cli_runner import run_cli

RS = pipeline_run_pb2
Stub = pipeline_service_pb2_grpc.PipelineServiceStub
WINDOW = {"start_date": "2026-03-01", "end_date": "2026-03-02"}
USAGE = TableSchema(
    name="provider_usage",
    description="test processor output",
    fields=(
        {"name": "usage_date", "type": "DATE", "mode": "REQUIRED"},
        {"name": "model", "type": "STRING", "mode": "REQUIRED"},
        {"name": "cost", "type": "NUMERIC", "mode": "REQUIRED"},
        {"name": "x_run_id", "type": "STRING", "mode": "REQUIRED"},
        {"name": "x_credential_id", "type": "STRING", "mode": "REQUIRED"},
    ),
)
PAGES: dict[str | None, dict[str, Any]] = {
    None: {
        "data": [
            {"date": "2026-03-01", "model": "gpt-a", "cost": 0.000000001},
            {"date": "2026-03-01", "model": "gpt-b", "cost": 12345.678901234},
            {"date": "2026-03-02", "model": "gpt-a", "cost": 0.1},
        ],
        "has_more": True,
        "next_page": "cursor-2",
    },
    "cursor-2": {
        "data": [
            {"date": "2026-03-02", "model": "gpt-b", "cost": 0.2},
            {"date": "2026-03-02", "model": "gpt-c", "cost": 3},
        ],
        "has_more": False,
        "next_page": None,
    },
}
EXPECTED = sorted(
    (d["date"], d["model"], Decimal(str(d["cost"]))) for page in PAGES.values() for d in page["data"]
)


def new_secret() -> str:
    return "tok-live-" + uuid.uuid4().hex + uuid.uuid4().hex


def usage_api(secret: str) -> Callable[[Any], Reply]:
    """The fake usage endpoint: pages by cursor for the right bearer token; 401 echoing the key otherwise."""

    def reply(request: Any) -> Reply:
        sent = request.headers.get("Authorization", "")
        if sent != f"Bearer {secret}":
            return Reply(
                401, {"error": {"message": f"Incorrect API key provided: {sent.removeprefix('Bearer ')}"}}
            )
        return Reply(200, PAGES[request.query.get("page")])

    return reply


async def org_with_credential(service: app.Service, prefix: str, secret: str) -> Org:
    org = await make_org(service, prefix)
    await service.warehouse.ensure_table(org.dataset, USAGE)
    await service.vault.store.set(org.slug, "generic", {"token": secret})
    return org


async def run_usage(pipelines: Stub, org: Org) -> RS.PipelineRun:
    request = pipeline_service_pb2.RunPipelineRequest(
        org_slug=org.slug, provider="testprovider", domain="usage", pipeline="daily", wait=True, **WINDOW
    )
    response = await pipelines.RunPipeline(request, metadata=org.metadata, timeout=60)
    return response.run


async def usage_rows(service: app.Service, org: Org) -> list[tuple[str, str, Decimal]]:
    rows = await service.warehouse.query(
        f"SELECT usage_date, model, cost FROM {service.warehouse.table_ref(org.dataset, 'provider_usage')}"
    )
    return sorted((r["usage_date"].isoformat(), r["model"], r["cost"]) for r in rows)


async def credential_row(service: app.Service, org: Org) -> dict[str, Any]:
    table = service.warehouse.table_ref(service.settings.meta_dataset, "org_integration_credentials")
    rows = await service.warehouse.query(f"SELECT * FROM {table} WHERE org_slug = @org", {"org": org.slug})
    assert len(rows) == 1
    return rows[0]


@pytest.fixture
def captured_logs() -> Iterator[list[str]]:
    """Every log line of the process while the test runs, formatted as the service writes them."""
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Capture(logging.DEBUG)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.removeHandler(handler)
    root.setLevel(level)


async def test_a_processor_reads_its_credential_survives_429_and_5xx_and_writes_rows(
    service: app.Service, pipelines: Stub, fake_provider: FakeProvider
) -> None:
    secret = new_secret()
    org = await org_with_credential(service, "usage", secret)
    pages = usage_api(secret)
    in_four_seconds = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=4), usegmt=True)
    fake_provider.script(
        "/v1/usage",
        Reply(429, {"error": "slow down"}, {"Retry-After": "1"}),
        Reply(429, b"", {"Retry-After": in_four_seconds}),
        Reply(503, b"upstream busy"),
        pages,  # page 1
        Reply(500, b"oops"),
        pages,  # page 2, then every later call
    )
    first = len(fake_provider.seen)
    before_429 = REGISTRY.get_sample_value("provider_http_throttled_total", {"provider": "generic"}) or 0

    run = await run_usage(pipelines, org)

    assert run.state == RS.RUN_STATE_COMPLETED, (
        run.reason,
        run.error,
        [(s.error_reason, s.error) for s in run.steps],
    )
    assert run.steps[0].rows_written == 5 and run.steps[0].attempts == 1
    assert await usage_rows(service, org) == EXPECTED  # NUMERIC exact, never through a float
    calls = fake_provider.seen[first:]
    assert len(calls) == 6
    assert all(c.headers["Authorization"] == f"Bearer {secret}" for c in calls)
    assert calls[1].at - calls[0].at >= 0.95  # Retry-After: 1
    assert calls[2].at - calls[1].at >= 1.0  # Retry-After: an HTTP-date 4 s after the script (1 s resolution)
    assert calls[3].query == {"start_date": "2026-03-01", "end_date": "2026-03-02"}
    assert calls[5].query["page"] == "cursor-2"
    after_429 = REGISTRY.get_sample_value("provider_http_throttled_total", {"provider": "generic"})
    assert after_429 == before_429 + 2

    for _ in range(40):  # the use is recorded in the background, batched
        if (await credential_row(service, org))["last_used_at"] is not None:
            break
        await asyncio.sleep(0.5)
    else:
        pytest.fail("last_used_at was not recorded")

    fake_provider.script("/v1/usage", pages)
    again = await run_usage(pipelines, org)  # the same window again: the same rows, not twice as many
    assert again.state == RS.RUN_STATE_COMPLETED
    assert await usage_rows(service, org) == EXPECTED


async def test_replacing_a_secret_keeps_the_id_and_bumps_the_version(service: app.Service) -> None:
    org = await make_org(service, "rotate")
    first = await service.vault.store.set(org.slug, "generic", {"token": new_secret()})
    row1 = await credential_row(service, org)
    second = await service.vault.store.set(org.slug, "generic", {"token": new_secret()})
    row2 = await credential_row(service, org)
    assert second.credential_id == first.credential_id and (first.version, second.version) == (1, 2)
    assert row2["ciphertext"] != row1["ciphertext"] and row2["wrapped_data_key"] != row1["wrapped_data_key"]
    assert second.rotated_at is not None and row2["kek_version"].startswith(service.settings.kms_key_name)


async def _failed_step(pipelines: Stub, org: Org) -> RS.StepRun:
    run = await run_usage(pipelines, org)
    assert run.state == RS.RUN_STATE_FAILED, run
    return run.steps[0]


async def test_a_tampered_ciphertext_fails_the_step_cleanly(
    service: app.Service, pipelines: Stub, fake_provider: FakeProvider
) -> None:
    secret = new_secret()
    org = await org_with_credential(service, "tamper", secret)
    fake_provider.script("/v1/usage", usage_api(secret))
    row = await credential_row(service, org)
    changed = bytearray(row["ciphertext"])
    changed[20] ^= 0x01
    table = service.warehouse.table_ref(service.settings.meta_dataset, "org_integration_credentials")
    await service.warehouse.query(
        f"UPDATE {table} SET ciphertext = FROM_BASE64(@c) WHERE credential_id = @id",
        {"c": b64(bytes(changed)), "id": row["credential_id"]},
    )
    step = await _failed_step(pipelines, org)
    assert step.error_reason == "CREDENTIAL_UNREADABLE" and step.attempts == 1
    assert secret not in step.error and "cannot be decrypted" in step.error


async def test_a_row_copied_to_another_org_does_not_decrypt(
    service: app.Service, pipelines: Stub, fake_provider: FakeProvider
) -> None:
    secret = new_secret()
    victim = await org_with_credential(service, "victim", secret)
    thief = await make_org(service, "thief")
    await service.warehouse.ensure_table(thief.dataset, USAGE)
    row = await credential_row(service, victim)
    table = service.warehouse.table_ref(service.settings.meta_dataset, "org_integration_credentials")
    await service.warehouse.query(
        f"INSERT INTO {table} (credential_id, org_slug, provider, credential_name, version, envelope_format, "
        "ciphertext, wrapped_data_key, kek_version, fingerprint, status, created_at) VALUES (@id, @org, "
        "'generic', 'default', 1, 1, FROM_BASE64(@c), FROM_BASE64(@k), @v, @f, 'ACTIVE', "
        "CURRENT_TIMESTAMP())",
        {
            "id": row["credential_id"],
            "org": thief.slug,
            "c": b64(row["ciphertext"]),
            "k": b64(row["wrapped_data_key"]),
            "v": row["kek_version"],
            "f": row["fingerprint"],
        },
    )
    fake_provider.script("/v1/usage", usage_api(secret))
    step = await _failed_step(pipelines, thief)
    assert step.error_reason == "CREDENTIAL_UNREADABLE" and secret not in step.error
    assert (await run_usage(pipelines, victim)).state == RS.RUN_STATE_COMPLETED  # the owner still reads it


async def test_a_kms_outage_fails_the_step_as_transient_after_its_retries(
    service: app.Service, pipelines: Stub, fake_provider: FakeProvider, fake_kms: FakeKms
) -> None:
    secret = new_secret()
    org = await org_with_credential(service, "outage", secret)
    fake_provider.script("/v1/usage", usage_api(secret))
    fake_kms.down = True
    try:
        step = await _failed_step(pipelines, org)
    finally:
        fake_kms.down = False
    assert step.error_reason == "KMS_UNAVAILABLE" and step.attempts == 2  # transient: the step's retry ran
    assert secret not in step.error
    assert (await run_usage(pipelines, org)).state == RS.RUN_STATE_COMPLETED  # failures are not cached


async def test_an_org_without_the_credential(service: app.Service, pipelines: Stub) -> None:
    org = await make_org(service, "nocred")
    step = await _failed_step(pipelines, org)
    assert step.error_reason == "CREDENTIAL_NOT_FOUND" and "credentials set" in step.error


async def test_a_known_secret_appears_nowhere(
    service: app.Service,
    pipelines: Stub,
    fake_provider: FakeProvider,
    captured_logs: list[str],
    http: aiohttp.ClientSession,
    settings: Settings,
    emulator: Emulator,
) -> None:
    secret = new_secret()
    org = await org_with_credential(service, "leak", secret)
    fake_provider.script("/v1/usage", usage_api(secret))
    ok = await run_usage(pipelines, org)
    assert ok.state == RS.RUN_STATE_COMPLETED
    # The provider now rejects the key and echoes it back in its error message.
    fake_provider.script("/v1/usage", usage_api("another-" + secret))
    failed = await run_usage(pipelines, org)
    assert failed.state == RS.RUN_STATE_FAILED and failed.steps[0].error_reason == "CREDENTIAL_REJECTED"
    assert "Incorrect API key provided: ***" in failed.steps[0].error

    texts: list[str] = [str(ok), str(failed)]
    for run in (ok, failed):
        got = await pipelines.GetPipelineRun(
            pipeline_service_pb2.GetPipelineRunRequest(run_id=run.run_id), metadata=org.metadata
        )
        texts.append(str(got))
        async with http.get(f"/api/v1/pipelines/runs/{run.run_id}", headers=org.headers) as r:
            texts.append(await r.text())
        async with http.get(f"/api/v1/pipelines/runs/{run.run_id}/events", headers=org.headers) as r:
            texts.append(await r.text())
    ledger_rows: list[str] = []
    async with asyncio.timeout(20):
        while len(ledger_rows) < 2:  # both runs' rows are written by the ledger's next flushes
            await asyncio.sleep(0.3)
            runs_table = service.warehouse.table_ref(settings.meta_dataset, "pipeline_runs")
            ledger_rows = [
                r["j"]
                for r in await service.warehouse.query(
                    f"SELECT TO_JSON_STRING(t) AS j FROM {runs_table} AS t WHERE run_id IN UNNEST(@ids)",
                    {"ids": Typed("ARRAY<STRING>", [ok.run_id, failed.run_id])},
                )
            ]
    events_table = service.warehouse.table_ref(settings.meta_dataset, "pipeline_run_events")
    events = await service.warehouse.query(
        f"SELECT TO_JSON_STRING(t) AS j FROM {events_table} AS t WHERE run_id IN UNNEST(@ids)",
        {"ids": Typed("ARRAY<STRING>", [ok.run_id, failed.run_id])},
    )
    assert len(events) >= 6 and any("CREDENTIAL_REJECTED" in e["j"] for e in events)
    texts += ledger_rows + [e["j"] for e in events]
    texts.append(generate_latest().decode())
    code, listing = await run_cli(settings, emulator, "credentials", "list", org.slug)
    assert code == 0 and f'"fingerprint": "...{secret[-4:]}"' in listing
    texts.append(listing)
    texts += captured_logs
    assert any("pulling usage with Credential(" in line for line in captured_logs)
    assert any(org.slug in line and "CREDENTIAL_REJECTED" in line for line in captured_logs)

    for text in texts:
        assert secret not in text
        assert secret[:-4] not in text  # not even most of it
    assert len(texts) > 10


def test_the_envelope_aad_is_documented_byte_for_byte() -> None:
    # README "Credentials" promises this layout to other writers of the table.
    assert envelope.aad("acme", "openai", "cred_0123") == b"cloudact.credential.v1|acme|openai|cred_0123"


async def test_decrypted_credentials_are_cached_per_org_for_the_ttl(
    service: app.Service, fake_kms: FakeKms
) -> None:
    secret = new_secret()
    org = await org_with_credential(service, "cache", secret)
    now = [1000.0]
    vault = CredentialVault(service.vault.store, ttl=60.0, clock=lambda: now[0])
    decrypts = fake_kms.calls.count("Decrypt")
    first, second = await asyncio.gather(
        vault.for_org(org.slug).get("generic"), vault.for_org(org.slug).get("generic")
    )
    assert first is second and fake_kms.calls.count("Decrypt") == decrypts + 1  # one decryption for both
    now[0] += 59
    assert await vault.for_org(org.slug).get("generic") is first
    now[0] += 2
    again = await vault.for_org(org.slug).get("generic")
    assert again is not first and fake_kms.calls.count("Decrypt") == decrypts + 2
    assert again.secret("token").get_secret_value() == secret and again.version == 1
    other = await make_org(service, "cacheother")
    with pytest.raises(TerminalError) as caught:  # the cache is per org: another org never gets it
        await vault.for_org(other.slug).get("generic")
    assert caught.value.reason == "CREDENTIAL_NOT_FOUND"
