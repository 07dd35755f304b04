"""`BigQueryWarehouse.replace_window` on the emulator: one load into staging, one MERGE of the window."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest

from server import app
from server.errors import TerminalError
from server.settings import PROJECT_ROOT
from server.warehouse.schema import TableSchema, load_schema

SCHEMA = load_schema(PROJECT_ROOT / "configs" / "schemas" / "org" / "openai_costs_daily_raw.json")


def row(day: date, project: str, amount: str, run: str) -> dict[str, Any]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return {
        "cost_date": day.isoformat(),
        "bucket_start": start.isoformat(),
        "bucket_end": start.isoformat(),
        "is_empty_bucket": False,
        "project_id": project,
        "line_item": "gpt-5, input",
        "amount": amount,
        "currency": "USD",
        "extra": {"new_field": [1, 2]},
        "x_pipeline_id": "p",
        "x_run_id": run,
        "x_credential_id": "cred",
        "x_ingested_at": start.isoformat(),
    }


def ndjson(rows: list[dict[str, Any]]) -> io.BytesIO:
    return io.BytesIO(b"".join(orjson.dumps(r) + b"\n" for r in rows))


async def test_window_is_swapped_and_nothing_else(service: app.Service) -> None:
    wh = service.warehouse
    dataset = f"rw_{uuid.uuid4().hex[:8]}"
    await wh.ensure_dataset(dataset)
    days = [date(2026, 11, d) for d in (1, 2, 3, 4)]
    first = [row(d, p, "1.123456789", "run1") for d in days for p in ("a", "b")]
    n = await wh.replace_window(
        dataset, SCHEMA, ndjson(first), column="cost_date", start=days[0], end=days[-1]
    )
    assert n == 8
    # replace days 2..3 with one row per day
    second = [row(d, "a", "2.000000001", "run2") for d in days[1:3]]
    n = await wh.replace_window(
        dataset, SCHEMA, ndjson(second), column="cost_date", start=days[1], end=days[2]
    )
    assert n == 2
    table = wh.table_ref(dataset, SCHEMA.name)
    got = await wh.query(
        f"SELECT cost_date, x_run_id, amount, extra FROM {table} ORDER BY cost_date, project_id"
    )
    assert [(r["cost_date"], r["x_run_id"]) for r in got] == [
        (days[0], "run1"),
        (days[0], "run1"),
        (days[1], "run2"),
        (days[2], "run2"),
        (days[3], "run1"),
        (days[3], "run1"),
    ]
    assert {r["amount"] for r in got} == {Decimal("1.123456789"), Decimal("2.000000001")}
    extra = await wh.query(f"SELECT JSON_VALUE(extra, '$.new_field[1]') AS v FROM {table} LIMIT 1")
    assert extra == [{"v": "2"}]
    # a failing load (a row the schema refuses) leaves the window as it was
    bad = [row(days[1], "z", "not-a-number", "run3")]
    with pytest.raises(TerminalError):
        await wh.replace_window(dataset, SCHEMA, ndjson(bad), column="cost_date", start=days[0], end=days[3])
    again = await wh.query(f"SELECT cost_date, x_run_id FROM {table} ORDER BY cost_date, project_id")
    assert [(r["cost_date"], r["x_run_id"]) for r in again] == [(r["cost_date"], r["x_run_id"]) for r in got]
    # `equals` narrows the window: only project a's rows of day 4 are replaced
    only_a = [row(days[3], "a", "3", "run4")]
    await wh.replace_window(
        dataset,
        SCHEMA,
        ndjson(only_a),
        column="cost_date",
        start=days[3],
        end=days[3],
        equals={"project_id": "a"},
    )
    day4 = await wh.query(
        f"SELECT project_id, x_run_id FROM {table} WHERE cost_date = @d ORDER BY 1", {"d": days[3]}
    )
    assert [(r["project_id"], r["x_run_id"]) for r in day4] == [("a", "run4"), ("b", "run1")]
    # no rows at all: the window is emptied (an empty load file is not uploaded)
    assert (
        await wh.replace_window(dataset, SCHEMA, ndjson([]), column="cost_date", start=days[0], end=days[0])
        == 0
    )
    assert not await wh.query(f"SELECT 1 FROM {table} WHERE cost_date = @d", {"d": days[0]})
    # no staging table is left behind
    left = await wh.query(f"SELECT table_name FROM `{wh.project}.{dataset}.INFORMATION_SCHEMA.TABLES`")
    assert [r["table_name"] for r in left] == [SCHEMA.name]


async def test_ensure_table_adds_columns_of_a_newer_schema_file(service: app.Service) -> None:
    wh = service.warehouse
    dataset = f"rw_{uuid.uuid4().hex[:8]}"
    await wh.ensure_dataset(dataset)
    old = TableSchema(
        SCHEMA.name, "", tuple(f for f in SCHEMA.fields if f["name"] not in ("quantity", "extra"))
    )
    await wh.ensure_table(dataset, old)
    await wh.ensure_table(dataset, SCHEMA)  # the newer file: two NULLABLE columns more
    table = wh.table_ref(dataset, SCHEMA.name)
    await wh.replace_window(
        dataset,
        SCHEMA,
        ndjson([{**row(date(2026, 11, 1), "a", "1", "r"), "quantity": "0.123456789"}]),
        column="cost_date",
        start=date(2026, 11, 1),
        end=date(2026, 11, 1),
    )
    got = await wh.query(f"SELECT quantity, JSON_VALUE(extra, '$.new_field[0]') AS e FROM {table}")
    assert got == [{"quantity": Decimal("0.123456789"), "e": "1"}]
