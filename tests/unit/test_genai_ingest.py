"""The spool's pieces without a warehouse: Arrow batches, Parquet files, window slices, concurrent streams."""

from __future__ import annotations

import asyncio
import io
import itertools
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pyarrow.parquet as pq
import pytest

from processors.genai import ingest
from processors.openai import usage as openai_usage
from server.errors import TerminalError
from server.warehouse.schema import TableSchema

SCHEMA = TableSchema(
    "t",
    "",
    (
        {"name": "day", "type": "DATE", "mode": "REQUIRED"},
        {"name": "n", "type": "INT64"},
        {"name": "amount", "type": "NUMERIC"},
        {"name": "at", "type": "TIMESTAMP"},
        {"name": "extra", "type": "JSON"},
    ),
)
DAY = date(2026, 11, 2)


def test_a_batch_written_to_parquet_reads_back_exactly() -> None:
    at = datetime(2026, 11, 2, 1, 2, 3, 456_789, tzinfo=UTC)
    columns = {
        "day": ingest.Runs(DAY, 3),
        "n": [2**63 - 1, None, -(2**63)],
        "amount": [Decimal("99999999999999999999.999999999"), Decimal("0.1234567895"), 7],
        "at": ingest.Runs(at, 3),
        "extra": [{"a": [1, "ü"]}, {}, None],
    }
    batch = ingest.batch(SCHEMA, columns, 3)
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, batch.schema) as writer:
        writer.write_batch(batch)
    table = pq.read_table(io.BytesIO(buffer.getvalue()))
    assert table.schema == ingest.arrow_schema(SCHEMA)
    assert table.column("day").to_pylist() == [DAY] * 3
    assert table.column("n").to_pylist() == [2**63 - 1, None, -(2**63)]
    assert table.column("amount").to_pylist() == [
        Decimal("99999999999999999999.999999999"),
        Decimal("0.123456790"),  # half-even to 1e-9 (…789|5 -> …790)
        Decimal("7.000000000"),
    ]
    assert table.column("at").to_pylist() == [at] * 3
    assert table.column("extra").to_pylist() == ['{"a":[1,"ü"]}', "{}", None]


@pytest.mark.parametrize(
    ("columns", "reason"),
    [
        ({"day": [None]}, "ROW_REJECTED"),  # NULL in a REQUIRED column
        ({"day": [DAY], "n": ["12"]}, "ROW_REJECTED"),
        ({"day": [DAY], "n": [2**63]}, "ROW_REJECTED"),
        ({"day": [DAY], "amount": [1.5]}, "ROW_REJECTED"),  # a float is never money
        ({"day": [DAY], "amount": [Decimal("1e30")]}, "ROW_REJECTED"),  # more than NUMERIC's 29 digits
    ],
)
def test_a_value_that_does_not_fit_fails_the_step(columns: dict[str, list[object]], reason: str) -> None:
    with pytest.raises(TerminalError) as caught:
        ingest.batch(SCHEMA, columns, 1)
    assert caught.value.reason == reason


def test_usage_columns_of_a_page_become_one_batch_of_the_raw_table() -> None:
    start = int(datetime(2026, 11, 2, tzinfo=UTC).timestamp())
    page = {
        "data": [
            {"start_time": start, "end_time": start + 86_400, "results": []},
            {
                "start_time": start + 86_400,
                "end_time": start + 2 * 86_400,
                "results": [
                    {"object": "r", "model": "gpt-5", "input_tokens": 5, "new": 1.5},
                    {"model": "o3"},
                ],
            },
        ]
    }
    lineage = {
        "x_pipeline_id": "p",
        "x_run_id": "r",
        "x_credential_id": "c",
        "x_ingested_at": datetime.now(UTC),
    }
    cols = openai_usage.columns_of_page("completions", page, lineage)
    rows = ingest.batch(openai_usage.SCHEMA, cols, 3).to_pylist()
    assert [r["usage_date"] for r in rows] == [DAY, DAY + timedelta(days=1), DAY + timedelta(days=1)]
    assert [r["is_empty_bucket"] for r in rows] == [True, False, False]
    assert [r["model"] for r in rows] == [None, "gpt-5", "o3"]
    assert [r["input_tokens"] for r in rows] == [None, 5, None]
    assert [r["extra"] for r in rows] == ["{}", '{"new":1.5}', "{}"]
    assert {r["endpoint"] for r in rows} == {"completions"} and {r["x_run_id"] for r in rows} == {"r"}


def test_slices_cover_the_window_in_whole_pages() -> None:
    start = date(2025, 4, 1)
    end = start + timedelta(days=249)
    cuts = ingest.slices(start, end, 7, 2)
    assert cuts == [(start, start + timedelta(days=125)), (start + timedelta(days=126), end)]
    for count in (1, 2, 3, 5, 40):
        cuts = ingest.slices(start, end, 7, count)
        assert cuts[0][0] == start and cuts[-1][1] == end and len(cuts) <= count
        assert all(b + timedelta(days=1) == c for (_, b), (c, _) in itertools.pairwise(cuts))
        pages = sum(-(-((b - a).days + 1) // 7) for a, b in cuts)
        assert pages == 36  # as many requests as one stream would make
    assert ingest.slices(start, start + timedelta(days=2), 31, 2) == [(start, start + timedelta(days=2))]


async def test_concurrently_runs_at_most_limit_and_the_first_error_cancels_the_rest() -> None:
    running, most, cancelled = 0, 0, 0

    async def job(fail: bool) -> None:
        nonlocal running, most, cancelled
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.01 if fail else 5)
            if fail:
                raise TerminalError("page failed", reason="PROVIDER_BAD_RESPONSE")
        except asyncio.CancelledError:
            cancelled += 1
            raise
        finally:
            running -= 1

    jobs = [lambda: job(False), lambda: job(True), lambda: job(False), lambda: job(False)]
    with pytest.raises(TerminalError):
        await asyncio.wait_for(ingest.concurrently(jobs, 2), 2)
    assert most == 2 and running == 0 and cancelled >= 1
