"""`gcp.bq_etl` end to end: the customer's billing export in the emulator (another project), read with the
customer's service account (google-auth against the fake token endpoint), through the real server
(`RunPipeline` of `configs/gcp/cost/billing.yml`), into the org's raw mirror and FOCUS 1.2 table.

The export table is partitioned on `export_time` (the emulator fakes `_PARTITIONTIME`), so `auto` picks
`DATE(export_time)`; the production path (`_PARTITIONDATE`) is checked at the SQL level in
tests/unit/test_gcp_bq_etl.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from google.cloud import bigquery

from cloudact.pipeline.v1 import pipeline_run_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc
from processors.base import RunIdentity, StepContext
from processors.gcp import bq_etl
from processors.gcp.bq_etl import billing_period
from server import app
from server.settings import PROJECT_ROOT
from server.warehouse.schema import TableSchema, load_schema
from tests import focus_validator
from tests import gcp_billing_export as export
from tests.conftest import Org, make_org
from tests.fakes.google import FakeGoogle, ServiceAccount

RS = pipeline_run_pb2
Stub = pipeline_service_pb2_grpc.PipelineServiceStub
FOCUS = load_schema(PROJECT_ROOT / "configs" / "schemas" / "org" / "cost_data_focus_1_2.json")
KNOWN_VALIDATOR_FALSE_POSITIVES = frozenset({"InvoiceId-C-005-C"})


class Customer:
    """One org with its gcp credential and its own export table (a dataset of the customer project)."""

    def __init__(self, org: Org, table_id: str, bq: bigquery.Client, account: ServiceAccount) -> None:
        self.org, self.table_id, self.bq, self.account = org, table_id, bq, account


async def customer(
    service: app.Service,
    fake_google: FakeGoogle,
    prefix: str,
    *,
    register: bool = True,
    table: str | None = None,
) -> Customer:
    org = await make_org(service, prefix)
    bq = export.client(service.settings.bigquery_endpoint)
    dataset = f"billing_{uuid.uuid4().hex[:8]}"
    table_id = await asyncio.to_thread(export.create_export, bq, dataset)
    account = ServiceAccount.generate(
        f"reader@{prefix}-proj.iam.gserviceaccount.com", export.CUSTOMER_PROJECT
    )
    if register:
        fake_google.add_service_account(account)
    await service.vault.store.set(org.slug, "gcp", account.info(billing_export_table=table or table_id))
    return Customer(org, table_id, bq, account)


async def run(pipelines: Stub, org: Org, **window: str) -> RS.PipelineRun:
    request = pipeline_service_pb2.RunPipelineRequest(
        org_slug=org.slug, provider="gcp", domain="cost", pipeline="billing", wait=True, **window
    )
    return (await pipelines.RunPipeline(request, metadata=org.metadata, timeout=120)).run


def completed(run: RS.PipelineRun) -> RS.PipelineRun:
    assert run.state == RS.RUN_STATE_COMPLETED, (run.error, [(s.error_reason, s.error) for s in run.steps])
    return run


async def raw_rows(service: app.Service, org: Org) -> list[dict[str, Any]]:
    table = service.warehouse.table_ref(org.dataset, "gcp_billing_export_raw")
    return await service.warehouse.query(f"SELECT * FROM {table}")


async def focus_rows(service: app.Service, org: Org) -> list[dict[str, Any]]:
    table = service.warehouse.table_ref(org.dataset, "cost_data_focus_1_2")
    return await service.warehouse.query(f"SELECT * FROM {table} WHERE x_SourceSystem = 'gcp'")


def billed_by_month(rows: list[dict[str, Any]]) -> dict[str, Decimal]:
    """Σ BilledCost per invoice month (named by its BillingPeriodStart)."""
    months = {
        billing_period(m)[0]: m for m in {f"{y}{mo:02d}" for y in (2025, 2026, 2027) for mo in range(1, 13)}
    }
    out: dict[str, Decimal] = {}
    for row in rows:
        month = months[row["BillingPeriodStart"]]
        out[month] = out.get(month, Decimal(0)) + row["BilledCost"]
    return out


@pytest.fixture(scope="module")
async def loaded(service: app.Service, fake_google: FakeGoogle, pipelines: Stub) -> dict[str, Any]:
    """An org whose export got the first batch and was copied once."""
    c = await customer(service, fake_google, "gcpbill")
    a = export.anchor()
    first = export.first_batch(a)
    await asyncio.to_thread(export.append, c.bq, c.table_id, first)
    token_calls = len(fake_google.token_calls)
    result = completed(await run(pipelines, c.org))
    return {
        "c": c,
        "a": a,
        "first": first,
        "run": result,
        "token_calls": len(fake_google.token_calls) - token_calls,
    }


async def test_first_run_copies_every_partition_and_converts_every_row(
    service: app.Service, loaded: dict[str, Any]
) -> None:
    c, first = loaded["c"], loaded["first"]
    assert loaded["run"].steps[0].rows_written == len(first) == 12
    assert loaded["token_calls"] >= 1  # the customer's key was exchanged at the fake token endpoint
    raw = await raw_rows(service, c.org)
    assert len(raw) == len(first)
    a = loaded["a"]
    assert Counter(r["x_source_partition"] for r in raw) == {
        a - timedelta(days=2): 3,
        a: 3,
        a + timedelta(days=1): 2,
        a + timedelta(days=2): 4,
    }
    assert {r["x_source_table"] for r in raw} == {c.table_id}
    # FLOAT money of the export is NUMERIC in the mirror, exact to 9 decimals
    assert sorted(r["cost"] for r in raw) == sorted(export.exact(r["cost"]) for r in first)
    focus = await focus_rows(service, c.org)
    assert len(focus) == len(first) + 1  # the commitment fee's effective-cost row
    assert billed_by_month(focus) == export.totals_by_month(first)
    assert sum(r["EffectiveCost"] for r in focus) == sum(r["BilledCost"] for r in focus)


async def test_focus_columns_follow_the_mapping(service: app.Service, loaded: dict[str, Any]) -> None:
    c, a = loaded["c"], loaded["a"]
    focus = await focus_rows(service, c.org)
    by_sku = {}
    for row in focus:
        by_sku.setdefault(row["ChargeDescription"], []).append(row)
    categories = Counter(r["ChargeCategory"] for r in focus)
    assert categories == {"Usage": 9, "Purchase": 1, "Tax": 1, "Credit": 1, "Adjustment": 1}
    tax = by_sku["Tax"][0]
    assert (tax["ChargeFrequency"], tax["PricingCategory"], tax["SkuId"]) == ("One-Time", None, None)
    assert tax["BilledCost"] == Decimal("1.987654")
    # resource CUD: committed, Usage category, the credit's id
    cud = by_sku["N2 Instance Ram running in Americas"][0]
    assert (cud["PricingCategory"], cud["CommitmentDiscountCategory"], cud["CommitmentDiscountStatus"]) == (
        "Committed",
        "Usage",
        "Used",
    )
    assert cud["BilledCost"] == Decimal("3.500001") and cud["ListCost"] == Decimal("7.000001")
    # new spend-based CUD model: discounted usage row, ContractedCost at the default model's price
    flex = by_sku["C3 Instance Core running in Americas"][0]
    assert flex["CommitmentDiscountCategory"] == "Spend"
    assert flex["CommitmentDiscountId"] == "subscriptions/7f1d0a9e-0000-4000-8000-000000000001"
    assert (flex["BilledCost"], flex["ContractedCost"], flex["ListCost"]) == (
        Decimal("3.3"),
        Decimal("5.5"),
        Decimal("6"),
    )
    fee = by_sku["Commitment fee: Compute Flexible CUD 1 Year"][0]
    assert (fee["ChargeCategory"], fee["ChargeFrequency"]) == ("Purchase", "Recurring")
    assert (fee["BilledCost"], fee["EffectiveCost"]) == (Decimal("0.7"), 0)
    unused = by_sku["Commitment fee: Compute Flexible CUD 1 Year (effective cost of the commitment)"][0]
    assert (unused["ChargeCategory"], unused["CommitmentDiscountStatus"]) == ("Usage", "Unused")
    assert (unused["BilledCost"], unused["EffectiveCost"]) == (0, Decimal("0.7"))
    # the first UTC hours of the month belong to the previous (Pacific) invoice month
    prev_start, prev_end = billing_period(export.month_of(a - timedelta(days=1)))
    boundary = [r for r in focus if r["ChargePeriodStart"].hour == 5 and r["ChargePeriodStart"].date() == a]
    assert len(boundary) == 1 and (boundary[0]["BillingPeriodStart"], boundary[0]["BillingPeriodEnd"]) == (
        prev_start,
        prev_end,
    )
    assert prev_start.hour in (7, 8) and prev_end.hour in (7, 8)
    # tags: resource tags over labels over project labels
    web = by_sku["E2 Instance Core running in Americas"]
    tagged = next(r for r in web if r["ChargePeriodStart"].hour == 10 and r["ChargePeriodStart"].date() < a)
    assert tagged["Tags"] == {"cost-center": "cc-7", "app": "web", "env": "staging", "team": "shop"}
    assert tagged["ResourceType"] == "instances" and tagged["SubAccountId"] == "shop-prod"
    goodwill = by_sku["Goodwill credit"][0]
    assert (goodwill["ChargeCategory"], goodwill["ChargeClass"], goodwill["SubAccountId"]) == (
        "Credit",
        None,
        None,
    )


async def test_a_rerun_without_new_data_changes_nothing(
    service: app.Service, loaded: dict[str, Any], pipelines: Stub
) -> None:
    c = loaded["c"]
    before = await focus_rows(service, c.org)
    again = completed(await run(pipelines, c.org))
    assert again.steps[0].rows_written == 0
    after = await focus_rows(service, c.org)
    assert {r["x_RunId"] for r in after} == {r["x_RunId"] for r in before}  # not even rewritten


async def test_late_rows_and_a_correction_recopy_exactly_the_changed_partitions(
    service: app.Service, loaded: dict[str, Any], pipelines: Stub
) -> None:
    c, a, first = loaded["c"], loaded["a"], loaded["first"]
    second = export.second_batch(a)
    await asyncio.to_thread(export.append, c.bq, c.table_id, second)
    result = completed(await run(pipelines, c.org))
    # partition a+1 (2 rows + 1 late) and the new partition a+3 (3 rows); nothing else is copied
    assert result.steps[0].rows_written == 6
    raw = await raw_rows(service, c.org)
    assert len(raw) == len(first) + len(second)
    runs = {r["x_source_partition"]: r["x_run_id"] for r in raw}
    assert runs[a + timedelta(days=1)] == runs[a + timedelta(days=3)] == result.run_id
    assert runs[a] == runs[a - timedelta(days=2)] == runs[a + timedelta(days=2)] != result.run_id
    focus = await focus_rows(service, c.org)
    assert len(focus) == len(first) + len(second) + 1
    assert billed_by_month(focus) == export.totals_by_month(first + second)
    # FOCUS was rebuilt from the changed partitions only: the others keep the first run's rows
    assert {r["x_SourcePartition"] for r in focus} == set(runs)
    rebuilt = {r["x_SourcePartition"]: r["x_RunId"] for r in focus}
    assert rebuilt[a + timedelta(days=1)] == rebuilt[a + timedelta(days=3)] == result.run_id
    assert rebuilt[a] == rebuilt[a - timedelta(days=2)] == rebuilt[a + timedelta(days=2)]
    assert rebuilt[a] == loaded["run"].run_id
    corrections = [r for r in focus if r["ChargeClass"] == "Correction"]
    assert len(corrections) == 2 and sorted(r["BilledCost"] for r in corrections) == [
        Decimal("-11.111111"),
        Decimal("9"),
    ]
    # a dated run re-copies the partitions holding that day's usage (d1: a-2, the late row's a+2 and the
    # correction's a+3) and leaves the same rows
    d1 = a - timedelta(days=2)
    dated = completed(await run(pipelines, c.org, date=d1.isoformat()))
    assert dated.steps[0].rows_written == 3 + 4 + 3
    assert billed_by_month(await focus_rows(service, c.org)) == export.totals_by_month(first + second)
    assert len(await raw_rows(service, c.org)) == len(first) + len(second)


async def test_a_standard_export_in_euros_and_a_date_range(
    service: app.Service, fake_google: FakeGoogle, pipelines: Stub
) -> None:
    """The standard export has no resource or subscription columns; money stays in the billing currency."""
    org = await make_org(service, "gcpeur")
    bq = export.client(service.settings.bigquery_endpoint)
    dataset = f"billing_{uuid.uuid4().hex[:8]}"
    standard = [f for f in export.schema() if f.name not in ("resource", "subscription")]
    table_id = f"{bq.project}.{dataset}.gcp_billing_export_v1_01A2B3_C4D5E6_F7A8B9"
    await asyncio.to_thread(bq.create_dataset, bigquery.Dataset(f"{bq.project}.{dataset}"))
    table = bigquery.Table(table_id, schema=standard)
    table.time_partitioning = bigquery.TimePartitioning(field="export_time")
    await asyncio.to_thread(bq.create_table, table)
    a = export.anchor()
    rows = [
        {k: v for k, v in r.items() if k not in ("resource", "subscription")}
        | {"currency": "EUR", "currency_conversion_rate": 0.921234}
        for r in export.first_batch(a)
    ]
    for row in rows:  # a project created within a day: the export has no name for it yet
        if row["project"] and row["project"]["id"] == "data-lab":
            row["project"] = {**row["project"], "name": None}
    await asyncio.to_thread(export.append, bq, table_id, rows)
    now = datetime.now(UTC)
    await service.warehouse.load_rows(
        org.dataset,
        "gcp_projects",
        [
            {
                "project_id": "data-lab",
                "name": "Data lab (Resource Manager)",
                "x_pipeline_id": "p",
                "x_run_id": "r",
                "x_ingested_at": now,
            }
        ],
    )
    account = ServiceAccount.generate("reader@gcpeur.iam.gserviceaccount.com", export.CUSTOMER_PROJECT)
    fake_google.add_service_account(account)
    await service.vault.store.set(org.slug, "gcp", account.info(billing_export_table=table_id))
    window = {
        "start_date": (a - timedelta(days=2)).isoformat(),
        "end_date": (a - timedelta(days=1)).isoformat(),
    }
    result = completed(await run(pipelines, org, **window))
    assert result.steps[0].rows_written == 12  # every partition from the first day on is new
    focus = await focus_rows(service, org)
    assert {r["BillingCurrency"] for r in focus} == {"EUR"} and {r["ResourceId"] for r in focus} == {None}
    assert billed_by_month(focus) == export.totals_by_month(rows)
    names = {(r["SubAccountId"], r["SubAccountName"]) for r in focus if r["SubAccountId"]}
    assert names == {("shop-prod", "Shop production"), ("data-lab", "Data lab (Resource Manager)")}
    # again: only the partitions holding that usage, a-2 (3 rows), a (3) and a+2 (the late row's, 4)
    again = completed(await run(pipelines, org, **window))
    assert again.steps[0].rows_written == 10
    assert billed_by_month(await focus_rows(service, org)) == export.totals_by_month(rows)


async def test_focus_validator_accepts_the_gcp_rows(
    service: app.Service, loaded: dict[str, Any], tmp_path: Path
) -> None:
    rows = await focus_rows(service, loaded["c"].org)
    data = tmp_path / "gcp.csv"
    assert focus_validator.write_csv(rows, FOCUS.column_names, data) == len(rows)
    report = await asyncio.to_thread(focus_validator.run_validator, data, tmp_path / "out.xml")
    print(report.summary())
    known = [p for p in report.problems if p.name.split(" ::")[0] in KNOWN_VALIDATOR_FALSE_POSITIVES]
    assert report.tests > 500 and report.failures + report.errors - len(known) == 0, report.summary()


async def test_focus_rows_without_a_source_partition_are_rebuilt_by_invoice_month(
    service: app.Service, fake_google: FakeGoogle, pipelines: Stub
) -> None:
    """FOCUS rows written before x_SourcePartition existed (NULL): the first run that touches their invoice
    month rebuilds that whole month once, so no stale row survives and the totals stay exact."""
    c = await customer(service, fake_google, "gcplegacy")
    a = export.anchor()
    first, second = export.first_batch(a), export.second_batch(a)
    await asyncio.to_thread(export.append, c.bq, c.table_id, first)
    completed(await run(pipelines, c.org))
    focus_table = service.warehouse.table_ref(c.org.dataset, "cost_data_focus_1_2")
    await service.warehouse.query(
        f"UPDATE {focus_table} SET x_SourcePartition = NULL WHERE x_SourceSystem = 'gcp'"
    )
    await asyncio.to_thread(export.append, c.bq, c.table_id, second)
    result = completed(await run(pipelines, c.org))
    assert result.steps[0].rows_written == 6
    focus = await focus_rows(service, c.org)
    assert len(focus) == len(first) + len(second) + 1
    assert billed_by_month(focus) == export.totals_by_month(first + second)
    touched = {billing_period(r["invoice"]["month"])[0] for r in second}
    in_touched = [r for r in focus if r["BillingPeriodStart"] in touched]
    assert in_touched and all(r["x_SourcePartition"] is not None for r in in_touched)
    assert {r["x_RunId"] for r in in_touched} == {result.run_id}


async def test_a_sweep_sees_partitions_older_than_the_trailing_window_and_the_client_copy(
    service: app.Service, fake_google: FakeGoogle
) -> None:
    """A change older than `trailing_days` is unseen by `{}` runs; a sweep (`sweep=true`, or the
    configured weekday) fingerprints `history_days`. Also the copy through this process
    (`copy_via: client`, for setups without the staging grant) leaves the same rows."""
    c = await customer(service, fake_google, "gcpsweep")
    a = export.anchor()
    first = export.first_batch(a)
    await asyncio.to_thread(export.append, c.bq, c.table_id, first)
    engine = bq_etl.get_engine()
    config = {"trailing_days": 40, "sweep_weekday": None, "copy_via": "client"}

    async def execute(run_id: str, **parameters: str) -> dict[str, Any]:
        context = StepContext(
            run=RunIdentity(run_id, c.org.slug, c.org.dataset, "gcp_billing", "gcp/cost/billing"),
            step_id="copy_export",
            attempt=1,
            parameters=parameters,
            steps={},
            warehouse=service.warehouse,
            meta_dataset=service.settings.meta_dataset,
            log=logging.LoggerAdapter(logging.getLogger("test"), {}),
            http=service.http,
            secrets=service.vault.for_org(c.org.slug),
        )
        return await engine.execute(config, context)

    assert (await execute("sweep1"))["rows_written"] == len(first)
    old_day = a - timedelta(days=60)
    late = {
        **first[0],
        "export_time": export.at(old_day, 6),
        "usage_start_time": export.at(old_day - timedelta(days=1), 6),
        "usage_end_time": export.at(old_day - timedelta(days=1), 7),
    }
    await asyncio.to_thread(export.append, c.bq, c.table_id, [late])
    assert (await execute("sweep2"))["rows_written"] == 0  # 60 days back: outside the trailing window
    swept = await execute("sweep3", sweep="true")
    assert swept["rows_written"] == 1 and swept["partitions_changed"] == [old_day.isoformat()]
    assert swept["partitions_checked"] >= 5
    raw = await raw_rows(service, c.org)
    assert len(raw) == len(first) + 1 and {r["x_run_id"] for r in raw} == {"sweep1", "sweep3"}
    by_run = Counter(r["x_run_id"] for r in raw)
    assert by_run == {"sweep1": len(first), "sweep3": 1}
    assert sorted(r["cost"] for r in raw) == sorted(export.exact(r["cost"]) for r in [*first, late])
    tagged = next(r for r in raw if r["x_run_id"] == "sweep3")
    assert json.loads(tagged["x_tags"]) == json.loads(bq_etl.tags(late))
    assert billed_by_month(await focus_rows(service, c.org)) == export.totals_by_month([*first, late])
    # no staging table is left behind
    tables = await asyncio.to_thread(
        lambda: [t.table_id for t in c.bq.list_tables(f"{service.settings.gcp_project_id}.{c.org.dataset}")]
    )
    assert not [t for t in tables if "__staging_" in t]


async def test_staging_tables_expire(service: app.Service) -> None:
    """A crashed run's staging table is dropped by BigQuery: it is created with an expiration time. (The
    emulator accepts `expirationTime` but does not keep it, so the request body is what is checked.)"""
    org = await make_org(service, "gcpexpire")
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=24)
    schema = TableSchema("gcp_billing_export_raw__staging_x", "staging", bq_etl.RAW_SCHEMA.fields)
    body = service.warehouse._table(org.dataset, schema, expires).to_api_repr()
    assert body["expirationTime"] == str(int(expires.timestamp() * 1000))
    await service.warehouse.ensure_table(org.dataset, schema, expires=expires)  # accepted
    await service.warehouse.drop_table(org.dataset, schema.name)


async def failed_step(pipelines: Stub, org: Org) -> RS.StepRun:
    result = await run(pipelines, org)
    assert result.state == RS.RUN_STATE_FAILED, result
    return result.steps[0]


async def test_a_missing_table_a_view_and_a_wrong_key_fail_with_stable_reasons(
    service: app.Service, fake_google: FakeGoogle, pipelines: Stub
) -> None:
    missing = await customer(
        service, fake_google, "gcpnotab", table=f"{export.CUSTOMER_PROJECT}.nowhere.{export.TABLE}"
    )
    step = await failed_step(pipelines, missing.org)
    assert step.error_reason == "SOURCE_NOT_FOUND" and "nowhere" not in step.error

    viewed = await customer(service, fake_google, "gcpview")
    view_id = viewed.table_id + "_view"
    view = bigquery.Table(view_id)
    view.view_query = f"SELECT * FROM `{viewed.table_id}`"
    await asyncio.to_thread(viewed.bq.create_table, view)
    await service.vault.store.set(viewed.org.slug, "gcp", viewed.account.info(billing_export_table=view_id))
    step = await failed_step(pipelines, viewed.org)
    assert step.error_reason == "SOURCE_IS_VIEW"

    stranger = await customer(service, fake_google, "gcpbadkey", register=False)
    step = await failed_step(pipelines, stranger.org)
    assert step.error_reason == "CREDENTIAL_REJECTED"
    assert "PRIVATE KEY" not in step.error and stranger.account.key_id not in step.error


async def test_no_credential_or_no_table_named(
    service: app.Service, fake_google: FakeGoogle, pipelines: Stub
) -> None:
    bare = await make_org(service, "gcpnocred")
    step = await failed_step(pipelines, bare)
    assert step.error_reason == "CREDENTIAL_NOT_FOUND"

    unnamed = await make_org(service, "gcpnoname")
    account = ServiceAccount.generate("reader@gcpnoname.iam.gserviceaccount.com", export.CUSTOMER_PROJECT)
    await service.vault.store.set(unnamed.slug, "gcp", account.info())
    step = await failed_step(pipelines, unnamed)
    assert step.error_reason == "SOURCE_NOT_CONFIGURED"


def test_billing_periods_are_pacific_months_in_utc() -> None:
    from datetime import UTC, datetime

    assert billing_period("202602") == (
        datetime(2026, 2, 1, 8, tzinfo=UTC),
        datetime(2026, 3, 1, 8, tzinfo=UTC),
    )
    assert billing_period("202603") == (
        datetime(2026, 3, 1, 8, tzinfo=UTC),
        datetime(2026, 4, 1, 7, tzinfo=UTC),
    )
    assert billing_period("202611") == (
        datetime(2026, 11, 1, 7, tzinfo=UTC),
        datetime(2026, 12, 1, 8, tzinfo=UTC),
    )
    assert billing_period("202612")[1] == datetime(2027, 1, 1, 8, tzinfo=UTC)
    assert date(2026, 1, 1) < billing_period("202601")[0].date() + timedelta(days=1)
