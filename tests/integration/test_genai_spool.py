"""The GenAI ingestion path on the emulator: Parquet spool files loaded into staging while pulling, one MERGE.

- every type round-trips exactly through the spool's Parquet files (NUMERIC digit for digit, INT64 at
  its bounds, microseconds, JSON, Unicode, NULLs);
- a block that fails after some files were loaded into the staging table leaves the target as it was;
- `openai.usage` with several page streams side by side: a page failing mid-pull leaves the previous
  run's rows, and a re-run lands the same rows.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from processors.base import RunIdentity, StepContext
from processors.genai import ingest
from processors.openai import usage as openai_usage
from server import app
from server.errors import TerminalError
from server.localstack.providers import ProviderSandbox
from server.warehouse.schema import TableSchema
from tests.conftest import make_org

SCHEMA = TableSchema(
    "spool_roundtrip",
    "every column type the raw tables use",
    (
        {"name": "day", "type": "DATE", "mode": "REQUIRED"},
        {"name": "id", "type": "STRING", "mode": "REQUIRED"},
        {"name": "count", "type": "INT64", "mode": "NULLABLE"},
        {"name": "flag", "type": "BOOL", "mode": "NULLABLE"},
        {"name": "at", "type": "TIMESTAMP", "mode": "NULLABLE"},
        {"name": "amount", "type": "NUMERIC", "mode": "NULLABLE"},
        {"name": "ratio", "type": "FLOAT64", "mode": "NULLABLE"},
        {"name": "extra", "type": "JSON", "mode": "NULLABLE"},
    ),
)
DAY = date(2026, 11, 2)


def sample() -> list[dict[str, Any]]:
    return [
        {
            "day": DAY,
            "id": "a",
            "count": 2**63 - 1,
            "flag": True,
            "at": datetime(2026, 11, 2, 23, 59, 59, 999_999, tzinfo=UTC),
            "amount": Decimal("12345678901234567890.123456789"),
            "ratio": 0.1,
            "extra": {"note": 'quote " and\nnewline, ünïcødé ✓', "nested": [1, {"x": None}]},
        },
        {
            "day": DAY,
            "id": "b",
            "count": -(2**63),
            "flag": False,
            "at": datetime(1970, 1, 1, tzinfo=UTC),
            "amount": Decimal("-0.000000001"),
            "ratio": None,
            "extra": {"price": Decimal("0.30")},  # a Decimal inside JSON is written as its exact text
        },
        {"day": DAY, "id": "c", "amount": Decimal("1.0000000015")},  # 10 decimals: half-even to 1e-9
        {"day": DAY, "id": "d", "amount": Decimal("1.0000000025")},
        {"day": DAY, "id": "e"},  # every nullable column NULL
    ]


async def table_rows(service: app.Service, dataset: str, table: str, order: str) -> list[dict[str, Any]]:
    wh = service.warehouse
    return await wh.query(f"SELECT * FROM {wh.table_ref(dataset, table)} ORDER BY {order}")


async def staging_tables(service: app.Service, dataset: str) -> list[str]:
    wh = service.warehouse
    found = await wh.query(f"SELECT table_name FROM `{wh.project}.{dataset}.INFORMATION_SCHEMA.TABLES`")
    return sorted(r["table_name"] for r in found if r["table_name"].startswith("_stage_"))


async def test_spool_round_trips_exact_values(service: app.Service) -> None:
    wh = service.warehouse
    dataset = f"spool_{uuid.uuid4().hex[:8]}"
    await wh.ensure_dataset(dataset)
    async with ingest.Spool(wh, dataset, SCHEMA, rows_per_file=2) as spool:
        for row in sample():
            await spool.write([row])
        assert await spool.swap(column="day", start=DAY, end=DAY) == 5
    assert spool.files == 3  # 2 + 2 + 1 rows: three load jobs into one staging table
    got = {r["id"]: r for r in await table_rows(service, dataset, SCHEMA.name, "id")}
    assert got["a"]["count"] == 2**63 - 1 and got["b"]["count"] == -(2**63)
    assert got["a"]["amount"] == Decimal("12345678901234567890.123456789")
    assert got["b"]["amount"] == Decimal("-0.000000001")
    assert got["c"]["amount"] == Decimal("1.000000002") and got["d"]["amount"] == Decimal("1.000000002")
    assert got["a"]["at"] == datetime(2026, 11, 2, 23, 59, 59, 999_999, tzinfo=UTC)
    assert got["b"]["at"] == datetime(1970, 1, 1, tzinfo=UTC)
    assert got["a"]["flag"] is True and got["b"]["flag"] is False and got["e"]["flag"] is None
    assert got["a"]["ratio"] == 0.1 and got["a"]["day"] == DAY
    assert got["e"]["count"] is None and got["e"]["amount"] is None and got["e"]["extra"] is None
    texts = await wh.query(
        f"SELECT id, JSON_VALUE(extra, '$.note') AS note, JSON_VALUE(extra, '$.price') AS price, "
        f"JSON_VALUE(extra, '$.nested[0]') AS first FROM {wh.table_ref(dataset, SCHEMA.name)} ORDER BY id"
    )
    assert texts[0] == {"id": "a", "note": 'quote " and\nnewline, ünïcødé ✓', "price": None, "first": "1"}
    assert texts[1]["price"] == "0.30"
    assert await staging_tables(service, dataset) == []


async def test_a_failure_after_loads_leaves_the_target_untouched(service: app.Service) -> None:
    wh = service.warehouse
    dataset = f"spool_{uuid.uuid4().hex[:8]}"
    await wh.ensure_dataset(dataset)
    async with ingest.Spool(wh, dataset, SCHEMA) as spool:
        await spool.write(sample())
        await spool.swap(column="day", start=DAY, end=DAY)
    before = await table_rows(service, dataset, SCHEMA.name, "id")
    assert len(before) == 5
    with pytest.raises(RuntimeError, match="pull failed"):
        async with ingest.Spool(wh, dataset, SCHEMA, rows_per_file=1) as spool:
            await spool.write([{"day": DAY, "id": "new1"}])
            await spool.write([{"day": DAY, "id": "new2"}])
            for _ in range(200):  # both files are in the staging table before the failure
                if spool.loaded == 2:
                    break
                await asyncio.sleep(0.05)
            assert spool.loaded == 2
            raise RuntimeError("pull failed")
    assert await table_rows(service, dataset, SCHEMA.name, "id") == before
    assert await staging_tables(service, dataset) == []
    # a row the target refuses (NULL in a REQUIRED column) fails before anything is loaded
    with pytest.raises(TerminalError) as caught:
        async with ingest.Spool(wh, dataset, SCHEMA) as spool:
            await spool.write([{"day": DAY, "id": None}])
    assert caught.value.reason == "ROW_REJECTED"
    assert await table_rows(service, dataset, SCHEMA.name, "id") == before


def content(rows: list[dict[str, Any]], without: tuple[str, ...] = ()) -> list[str]:
    """The rows as sorted text (the table has no order), without the named columns."""
    return sorted(repr(sorted((k, v) for k, v in r.items() if k not in without)) for r in rows)


def usage_context(service: app.Service, org: str, dataset: str, run_id: str) -> StepContext:
    return StepContext(
        run=RunIdentity(run_id, org, dataset, "openai_usage_cost", "openai/cost/usage_cost"),
        step_id="usage",
        attempt=1,
        parameters={},
        steps={},
        warehouse=service.warehouse,
        meta_dataset="organizations",
        log=logging.LoggerAdapter(logging.getLogger("tests.genai_spool"), {}),
        http=service.http.bind(org, run_id, "usage"),
        secrets=service.vault.for_org(org),
    )


@pytest.mark.timeout(240)
async def test_concurrent_streams_failing_mid_pull_keep_the_previous_rows(
    service: app.Service, provider_sandbox: ProviderSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    org = await make_org(service, "genai_streams")
    key = "sk-admin-" + uuid.uuid4().hex
    provider_sandbox.openai.keys[key] = uuid.uuid4().hex[:8]
    await service.vault.store.set(org.slug, "openai", {"admin_api_key": key})
    monkeypatch.setattr(ingest, "ROWS_PER_FILE", 1)  # every page is its own file and load job
    end = datetime.now(UTC).date() - timedelta(days=1)
    config = {
        "start_date": (end - timedelta(days=5)).isoformat(),  # 6 days, 2 a page: 2 slices x 2 endpoints
        "end_date": end.isoformat(),
        "endpoints": ["completions", "embeddings"],
        "bucket_limit": 2,
        "concurrency": 2,
    }
    processor = openai_usage.get_engine()
    first = await processor.execute(config, usage_context(service, org.slug, org.dataset, "run_first"))
    assert first["pages"] == 6 and first["rows_written"] > 0
    before = await table_rows(service, org.dataset, openai_usage.TABLE, "x_run_id")
    # an embeddings page is cut off while the completions streams run beside it
    provider_sandbox.faults.add("/usage/embeddings", "malformed")
    with pytest.raises(TerminalError) as caught:
        await processor.execute(config, usage_context(service, org.slug, org.dataset, "run_broken"))
    provider_sandbox.faults.clear()
    assert caught.value.reason == "PROVIDER_BAD_RESPONSE"
    assert content(await table_rows(service, org.dataset, openai_usage.TABLE, "x_run_id")) == content(before)
    assert await staging_tables(service, org.dataset) == []
    again = await processor.execute(config, usage_context(service, org.slug, org.dataset, "run_again"))
    assert again["rows_written"] == first["rows_written"]
    after = await table_rows(service, org.dataset, openai_usage.TABLE, "x_run_id")
    assert content(after, ("x_run_id", "x_ingested_at")) == content(before, ("x_run_id", "x_ingested_at"))
    assert {r["x_run_id"] for r in after} == {"run_again"}
