"""A realistic Cloud Billing detailed export (the customer's table) for the `gcp.bq_etl` tests.

The rows follow Google's detailed-usage schema (money as FLOAT like the real export, the newer price and
consumption-model columns as NUMERIC): one billing account, two projects, three services, two usage days
at the end of a month, credits of several types (sustained use, resource CUD, free tier, promotion,
discount, the new spend-based CUD model with its fee row and FEE_UTILIZATION_OFFSET), a tax row, a
goodwill adjustment, a rounding error, usage of the first UTC hours of a month that belongs to the
previous (Pacific) invoice month, and a row exported late. `second_batch` arrives after a first run:
another late row in an exported partition, and a correction (negation plus re-monetization) with more
late rows in a new partition.

Dates are relative to today so the trailing window of the shipped config covers them: `anchor` is the
latest first day of a month at least 4 days ago; usage days are the two days before it; exports run
from anchor - 1 to anchor + 3 (one partition per export day, partitioned on `export_time`).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

ACCOUNT = "01A2B3-C4D5E6-F7A8B9"
TABLE = "gcp_billing_export_resource_v1_01A2B3_C4D5E6_F7A8B9"
CUSTOMER_PROJECT = "customer-billing"
NANO = Decimal("0.000000001")

COMPUTE = {"id": "6F81-5844-456A", "description": "Compute Engine"}
BIGQUERY = {"id": "24E6-581D-38E5", "description": "BigQuery"}
STORAGE = {"id": "95FF-2EF5-5EA1", "description": "Cloud Storage"}
INVOICE = {"id": "", "description": "Invoice"}

SHOP = {
    "id": "shop-prod",
    "number": "111111111111",
    "name": "Shop production",
    "labels": [{"key": "env", "value": "prod"}, {"key": "team", "value": "shop"}],
    "ancestry_numbers": "/123456789/111111111111/",
    "ancestors": [
        {"resource_name": "projects/111111111111", "display_name": "Shop production"},
        {"resource_name": "organizations/123456789", "display_name": "example.com"},
    ],
}
LAB = {
    "id": "data-lab",
    "number": "222222222222",
    "name": "Data lab",
    "labels": [{"key": "env", "value": "dev"}],
    "ancestry_numbers": "/123456789/222222222222/",
    "ancestors": [],
}


def anchor(today: date | None = None) -> date:
    """The latest first day of a month that is at least 4 days before today (UTC)."""
    day = (today or datetime.now(UTC).date()) - timedelta(days=4)
    return day.replace(day=1)


def month_of(day: date) -> str:
    return f"{day.year:04d}{day.month:02d}"


def at(day: date, hour: int, minute: int = 0) -> str:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC).isoformat()


def schema() -> list[bigquery.SchemaField]:
    """The detailed export's schema: FLOAT money like Google's table, NUMERIC for the newer columns."""

    def f(name: str, kind: str, mode: str = "NULLABLE", fields: Sequence[bigquery.SchemaField] = ()) -> Any:
        return bigquery.SchemaField(name, kind, mode=mode, fields=fields)

    kv = [f("key", "STRING"), f("value", "STRING")]
    return [
        f("billing_account_id", "STRING"),
        f("service", "RECORD", fields=[f("id", "STRING"), f("description", "STRING")]),
        f("sku", "RECORD", fields=[f("id", "STRING"), f("description", "STRING")]),
        f("usage_start_time", "TIMESTAMP"),
        f("usage_end_time", "TIMESTAMP"),
        f(
            "project",
            "RECORD",
            fields=[
                f("id", "STRING"),
                f("number", "STRING"),
                f("name", "STRING"),
                f("labels", "RECORD", "REPEATED", kv),
                f("ancestry_numbers", "STRING"),
                f(
                    "ancestors",
                    "RECORD",
                    "REPEATED",
                    [f("resource_name", "STRING"), f("display_name", "STRING")],
                ),
            ],
        ),
        f("labels", "RECORD", "REPEATED", kv),
        f("system_labels", "RECORD", "REPEATED", kv),
        f(
            "location",
            "RECORD",
            fields=[
                f("location", "STRING"),
                f("country", "STRING"),
                f("region", "STRING"),
                f("zone", "STRING"),
            ],
        ),
        f(
            "tags",
            "RECORD",
            "REPEATED",
            [f("key", "STRING"), f("value", "STRING"), f("inherited", "BOOLEAN"), f("namespace", "STRING")],
        ),
        f("transaction_type", "STRING"),
        f("seller_name", "STRING"),
        f("export_time", "TIMESTAMP"),
        f("cost", "FLOAT"),
        f("currency", "STRING"),
        f("currency_conversion_rate", "FLOAT"),
        f(
            "usage",
            "RECORD",
            fields=[
                f("amount", "FLOAT"),
                f("unit", "STRING"),
                f("amount_in_pricing_units", "FLOAT"),
                f("pricing_unit", "STRING"),
            ],
        ),
        f(
            "credits",
            "RECORD",
            "REPEATED",
            [
                f("name", "STRING"),
                f("amount", "FLOAT"),
                f("full_name", "STRING"),
                f("id", "STRING"),
                f("type", "STRING"),
            ],
        ),
        f("invoice", "RECORD", fields=[f("month", "STRING"), f("publisher_type", "STRING")]),
        f("cost_type", "STRING"),
        f(
            "adjustment_info",
            "RECORD",
            fields=[f("id", "STRING"), f("description", "STRING"), f("mode", "STRING"), f("type", "STRING")],
        ),
        f("cost_at_list", "FLOAT"),
        f(
            "price",
            "RECORD",
            fields=[
                f("effective_price", "NUMERIC"),
                f("tier_start_amount", "NUMERIC"),
                f("unit", "STRING"),
                f("pricing_unit_quantity", "NUMERIC"),
                f("list_price", "NUMERIC"),
                f("effective_price_default", "NUMERIC"),
                f("list_price_consumption_model", "NUMERIC"),
            ],
        ),
        f("cost_at_effective_price_default", "NUMERIC"),
        f("cost_at_list_consumption_model", "NUMERIC"),
        f("consumption_model", "RECORD", fields=[f("id", "STRING"), f("description", "STRING")]),
        f("resource", "RECORD", fields=[f("name", "STRING"), f("global_name", "STRING")]),
        f("subscription", "RECORD", fields=[f("instance_id", "STRING")]),
    ]


def _row(
    *,
    service: dict[str, str],
    sku: tuple[str, str],
    project: dict[str, Any] | None,
    start: str,
    hours: int = 1,
    exported: str,
    cost: float,
    invoice: str,
    credits: Iterable[tuple[str, float, str]] = (),
    cost_type: str = "regular",
    usage: tuple[float, str, float, str] | None = (3600.0, "seconds", 1.0, "hour"),
    cost_at_list: float | None = None,
    labels: Sequence[tuple[str, str]] = (),
    tags: Sequence[tuple[str, str]] = (),
    resource: str | None = None,
    region: str | None = "us-central1",
    zone: str | None = None,
    adjustment: dict[str, str] | None = None,
    consumption_model: tuple[str, str] = ("", "Default"),
    subscription: str | None = None,
    effective_price_default: str | None = None,
) -> dict[str, Any]:
    begin = datetime.fromisoformat(start)
    row: dict[str, Any] = {
        "billing_account_id": ACCOUNT,
        "service": service,
        "sku": {"id": sku[0], "description": sku[1]},
        "usage_start_time": begin.isoformat(),
        "usage_end_time": (begin + timedelta(hours=hours)).isoformat(),
        "project": project,
        "labels": [{"key": k, "value": v} for k, v in labels],
        "system_labels": [{"key": "compute.googleapis.com/machine_spec", "value": "e2-standard-4"}]
        if service is COMPUTE
        else [],
        "location": {
            "location": region or "global",
            "country": "US" if region else None,
            "region": region,
            "zone": zone,
        },
        "tags": [{"key": k, "value": v, "inherited": True, "namespace": "123456789"} for k, v in tags],
        "transaction_type": "GOOGLE",
        "seller_name": "Google LLC",
        "export_time": exported,
        "cost": cost,
        "currency": "USD",
        "currency_conversion_rate": 1.0,
        "usage": None
        if usage is None
        else {
            "amount": usage[0],
            "unit": usage[1],
            "amount_in_pricing_units": usage[2],
            "pricing_unit": usage[3],
        },
        "credits": [
            {"name": name, "amount": amount, "full_name": name, "id": f"{kind.lower()}-{index}", "type": kind}
            for index, (name, amount, kind) in enumerate(credits)
        ],
        "invoice": {"month": invoice, "publisher_type": "GOOGLE"},
        "cost_type": cost_type,
        "adjustment_info": adjustment,
        "cost_at_list": cost_at_list
        if cost_at_list is not None
        else (cost if cost_type == "regular" else None),
        "price": None
        if usage is None
        else {
            "effective_price": "0.033",
            "tier_start_amount": "0",
            "unit": "hour",
            "pricing_unit_quantity": "1",
        },
        "cost_at_effective_price_default": effective_price_default,
        "consumption_model": {"id": consumption_model[0] or "default", "description": consumption_model[1]},
        "resource": {"name": resource.rsplit("/", 1)[-1], "global_name": resource} if resource else None,
        "subscription": {"instance_id": subscription} if subscription else None,
    }
    return row


def first_batch(a: date) -> list[dict[str, Any]]:
    """What the export holds before the first run (see the module docstring)."""
    d1, d2 = a - timedelta(days=2), a - timedelta(days=1)
    prev, cur = month_of(d1), month_of(a)
    vm = "//compute.googleapis.com/projects/shop-prod/zones/us-central1-a/instances/web-1"
    return [
        _row(
            service=COMPUTE,
            sku=("CP-E2-CORE", "E2 Instance Core running in Americas"),
            project=SHOP,
            start=at(d1, 10),
            exported=at(d1, 14, 5),
            cost=12.345678,
            cost_at_list=13.5,
            invoice=prev,
            credits=[("Sustained usage discount", -1.234567, "SUSTAINED_USAGE_DISCOUNT")],
            labels=[("app", "web"), ("env", "staging")],
            tags=[("cost-center", "cc-7")],
            resource=vm,
            zone="us-central1-a",
        ),
        _row(
            service=COMPUTE,
            sku=("CP-N2-RAM", "N2 Instance Ram running in Americas"),
            project=SHOP,
            start=at(d1, 11),
            exported=at(d1, 14, 5),
            cost=7.000001,
            cost_at_list=7.000001,
            invoice=prev,
            credits=[("Committed use discount: N2 RAM", -3.5, "COMMITTED_USAGE_DISCOUNT")],
            resource=vm,
            zone="us-central1-a",
        ),
        _row(
            service=BIGQUERY,
            sku=("BQ-ANALYSIS", "Analysis"),
            project=LAB,
            start=at(d1, 12),
            exported=at(d1, 14, 5),
            cost=5.25,
            invoice=prev,
            usage=(1.5, "bytes", 1.5, "tebibyte"),
            credits=[("Free tier", -1.0, "FREE_TIER"), ("Trial credit", -2.5, "PROMOTION")],
            region="us",
            labels=[("team", "data")],
        ),
        _row(
            service=STORAGE,
            sku=("GCS-STD", "Standard Storage US Multi-region"),
            project=SHOP,
            start=at(d2, 0),
            hours=24,
            exported=at(a, 3, 30),
            cost=0.123456,
            invoice=prev,
            usage=(1e12, "byte-seconds", 0.5, "gibibyte month"),
            region="us",
        ),
        _row(
            service=COMPUTE,
            sku=("CP-C3-CORE", "C3 Instance Core running in Americas"),
            project=LAB,
            start=at(d2, 9),
            exported=at(a, 3, 30),
            cost=3.3,
            cost_at_list=6.0,
            invoice=prev,
            consumption_model=("D2C2-18D0-CB3F", "Compute Flexible CUDs 1 Year"),
            subscription="subscriptions/7f1d0a9e-0000-4000-8000-000000000001",
            effective_price_default="5.500000000",
        ),
        _row(
            service=COMPUTE,
            sku=("CUD-FEE-1Y", "Commitment fee: Compute Flexible CUD 1 Year"),
            project=LAB,
            start=at(d2, 9),
            exported=at(a, 3, 30),
            cost=4.0,
            cost_at_list=4.0,
            invoice=prev,
            usage=(4.0, "USD", 4.0, "USD"),
            credits=[("Flexible CUD fee utilization offset", -3.3, "FEE_UTILIZATION_OFFSET")],
            subscription="subscriptions/7f1d0a9e-0000-4000-8000-000000000001",
        ),
        # 05:00 UTC on the 1st is still the previous day in the Pacific: the previous invoice month
        _row(
            service=COMPUTE,
            sku=("CP-E2-CORE", "E2 Instance Core running in Americas"),
            project=SHOP,
            start=at(a, 5),
            exported=at(a + timedelta(days=1), 2),
            cost=1.111111,
            invoice=prev,
            credits=[("Spending based discount", -0.111111, "DISCOUNT")],
            resource=vm,
            zone="us-central1-a",
        ),
        _row(
            service=COMPUTE,
            sku=("CP-E2-CORE", "E2 Instance Core running in Americas"),
            project=SHOP,
            start=at(a, 10),
            exported=at(a + timedelta(days=1), 2),
            cost=2.0,
            invoice=cur,
            resource=vm,
            zone="us-central1-a",
        ),
        _row(
            service=INVOICE,
            sku=("", "Tax"),
            project=SHOP,
            start=at(d1.replace(day=1), 8),
            hours=24 * 28,
            exported=at(a + timedelta(days=2), 6),
            cost=1.987654,
            invoice=prev,
            cost_type="tax",
            usage=None,
            region=None,
        ),
        _row(
            service=INVOICE,
            sku=("", "Goodwill credit"),
            project=None,
            start=at(d1.replace(day=1), 8),
            hours=24 * 28,
            exported=at(a + timedelta(days=2), 6),
            cost=-5.0,
            invoice=prev,
            cost_type="adjustment",
            usage=None,
            region=None,
            adjustment={
                "id": "adj-goodwill-1",
                "description": "Goodwill credit",
                "mode": "MANUAL_ADJUSTMENT",
                "type": "GOODWILL",
            },
        ),
        _row(
            service=INVOICE,
            sku=("", "Rounding error"),
            project=None,
            start=at(d1.replace(day=1), 8),
            hours=24 * 28,
            exported=at(a + timedelta(days=2), 6),
            cost=0.000003,
            invoice=prev,
            cost_type="rounding_error",
            usage=None,
            region=None,
        ),
        # usage of d1 exported two days late, still on the previous invoice
        _row(
            service=BIGQUERY,
            sku=("BQ-ANALYSIS", "Analysis"),
            project=SHOP,
            start=at(d1, 20),
            exported=at(a + timedelta(days=2), 6),
            cost=0.75,
            invoice=prev,
            usage=(0.2, "bytes", 0.2, "tebibyte"),
            region="us",
        ),
    ]


def second_batch(a: date) -> list[dict[str, Any]]:
    """What arrives after the first run: a late row in the partition of a + 1, and a correction of the
    first Compute row (negation and re-monetization, on the current invoice) plus a late row in a new
    partition a + 3."""
    d1, d2 = a - timedelta(days=2), a - timedelta(days=1)
    prev, cur = month_of(d1), month_of(a)
    vm = "//compute.googleapis.com/projects/shop-prod/zones/us-central1-a/instances/web-1"
    correction = {
        "id": "adj-usage-1",
        "description": "Usage correction for E2 core hours",
        "mode": "COMPLETE_NEGATION_WITH_REMONETIZATION",
        "type": "USAGE_CORRECTION",
    }
    return [
        _row(
            service=STORAGE,
            sku=("GCS-STD", "Standard Storage US Multi-region"),
            project=LAB,
            start=at(d2, 0),
            hours=24,
            exported=at(a + timedelta(days=1), 18),
            cost=0.5,
            invoice=prev,
            usage=(2e12, "byte-seconds", 1.0, "gibibyte month"),
            region="us",
        ),
        _row(
            service=COMPUTE,
            sku=("CP-E2-CORE", "E2 Instance Core running in Americas"),
            project=SHOP,
            start=at(d1, 10),
            exported=at(a + timedelta(days=3), 4),
            cost=-12.345678,
            cost_at_list=-13.5,
            invoice=cur,
            credits=[("Sustained usage discount", 1.234567, "SUSTAINED_USAGE_DISCOUNT")],
            labels=[("app", "web"), ("env", "staging")],
            tags=[("cost-center", "cc-7")],
            resource=vm,
            zone="us-central1-a",
            adjustment=correction,
            usage=(-3600.0, "seconds", -1.0, "hour"),
        ),
        _row(
            service=COMPUTE,
            sku=("CP-E2-CORE", "E2 Instance Core running in Americas"),
            project=SHOP,
            start=at(d1, 10),
            exported=at(a + timedelta(days=3), 4),
            cost=10.0,
            cost_at_list=11.0,
            invoice=cur,
            credits=[("Sustained usage discount", -1.0, "SUSTAINED_USAGE_DISCOUNT")],
            labels=[("app", "web"), ("env", "staging")],
            tags=[("cost-center", "cc-7")],
            resource=vm,
            zone="us-central1-a",
            adjustment=correction,
        ),
        _row(
            service=BIGQUERY,
            sku=("BQ-ANALYSIS", "Analysis"),
            project=LAB,
            start=at(d2, 22),
            exported=at(a + timedelta(days=3), 4),
            cost=0.333333,
            invoice=prev,
            usage=(0.1, "bytes", 0.1, "tebibyte"),
            region="us",
        ),
    ]


def exact(value: float | None) -> Decimal:
    """A FLOAT of the export as the mirror holds it: rounded to 9 decimals (CAST AS NUMERIC(38, 9))."""
    return Decimal(repr(value or 0.0)).quantize(NANO)


def net(row: dict[str, Any]) -> Decimal:
    """cost + the sum of the credits, exactly."""
    return exact(row["cost"]) + sum((exact(c["amount"]) for c in row["credits"]), Decimal(0))


def totals_by_month(rows: Iterable[dict[str, Any]]) -> dict[str, Decimal]:
    out: dict[str, Decimal] = {}
    for row in rows:
        month = row["invoice"]["month"]
        out[month] = out.get(month, Decimal(0)) + net(row)
    return out


def client(endpoint: str, project: str = CUSTOMER_PROJECT) -> bigquery.Client:
    """A plain client of the emulator standing for the customer's own tooling (it creates the export)."""
    return bigquery.Client(
        project=project,
        location="US",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options=ClientOptions(api_endpoint=endpoint),
    )


def create_export(bq: bigquery.Client, dataset: str, *, partition_field: str | None = "export_time") -> str:
    """Create the customer's (empty) export table; return its project.dataset.table."""
    ds = bigquery.Dataset(f"{bq.project}.{dataset}")
    ds.location = "US"
    bq.create_dataset(ds, exists_ok=True)
    table = bigquery.Table(f"{bq.project}.{dataset}.{TABLE}", schema=schema())
    table.time_partitioning = bigquery.TimePartitioning(field=partition_field)
    bq.create_table(table, exists_ok=True)
    return f"{bq.project}.{dataset}.{TABLE}"


def append(bq: bigquery.Client, table_id: str, rows: Sequence[dict[str, Any]]) -> None:
    """Append rows as the export does (a load job; resumable, which the emulator accepts)."""
    payload = b"\n".join(orjson.dumps(r) for r in rows)
    config = bigquery.LoadJobConfig(source_format="NEWLINE_DELIMITED_JSON", write_disposition="WRITE_APPEND")
    bq.load_table_from_file(io.BytesIO(payload), table_id, job_config=config).result()
