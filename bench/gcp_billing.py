"""`gcp.bq_etl` at scale on the emulator, against a DuckDB floor: `python -m bench gcp [ROWS]`, and a part of
`make bench` (DEFAULT_ROWS, bounded by GCP_SECONDS).

1. A customer export of `rows` generated detailed-export rows (deterministic, `random.Random(7)`) over 30
   daily partitions (column-partitioned on `export_time`, as in the tests), loaded in a few big load jobs
   (each load makes the emulator snapshot the whole table); the org dataset and its tables are created.
   Not timed.
2. The processor runs as the server runs it (real warehouse adapter, real vault-shaped credential, the
   customer's service account signing in at a local token endpoint): fresh, then again after 1 % late
   rows were appended to 3 partitions. Reported: seconds, rows/s, partitions copied, FOCUS rows, bytes
   processed (the emulator reports 0), and whether the re-run copied exactly the 3 changed partitions
   (their rows, no more) and rebuilt only their FOCUS rows.
3. Floor: the same rows as one DuckDB query in-process (read the NDJSON, fold the credits in NUMERIC,
   one FOCUS-shaped row per export row with the key columns: a lower bound, it maps fewer columns than
   billing_focus.sql), and the ratios to it. Target (issue #10): the fresh run within 10x the floor.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson

from processors.base import RunIdentity, StepContext, Typed
from processors.gcp.bq_etl import get_engine
from server.credentials.model import Credential
from server.localstack.emulator import Emulator
from server.localstack.process import free_port
from server.settings import PROJECT_ROOT
from server.warehouse.bigquery import BigQueryWarehouse
from server.warehouse.schema import load_schemas
from tests import gcp_billing_export as export
from tests.fakes.google import FakeGoogle, ServiceAccount

PARTITIONS = 30
SERVICES = [
    ("6F81-5844-456A", "Compute Engine"),
    ("24E6-581D-38E5", "BigQuery"),
    ("95FF-2EF5-5EA1", "Cloud Storage"),
    ("9662-B51E-5089", "Cloud SQL"),
    ("E505-1604-58F8", "Networking"),
]
CHUNK = 250_000  # rows per load job: each load snapshots the whole table on the emulator
DEFAULT_ROWS = 1_000_000
GCP_SECONDS = 420.0  # the whole part in `make bench`; stopped (and reported) beyond that


def rows(count: int, first: date, rng: random.Random, late: bool = False) -> Any:
    """Yield NDJSON lines of export rows spread over the partitions."""
    for n in range(count):
        day = first + timedelta(days=(n % PARTITIONS) if not late else (n % 3) * 10)
        usage = datetime(day.year, day.month, day.day, rng.randrange(24), tzinfo=UTC) - timedelta(days=1)
        service = SERVICES[n % len(SERVICES)]
        cost = round(rng.uniform(0, 50), 6)
        credits = (
            [
                {
                    "name": "SUD",
                    "amount": -round(cost * 0.1, 6),
                    "full_name": "",
                    "id": "sud",
                    "type": "SUSTAINED_USAGE_DISCOUNT",
                }
            ]
            if n % 3 == 0
            else []
        )
        yield orjson.dumps(
            {
                "billing_account_id": export.ACCOUNT,
                "service": {"id": service[0], "description": service[1]},
                "sku": {"id": f"SKU-{n % 400}", "description": f"SKU {n % 400}"},
                "usage_start_time": usage.isoformat(),
                "usage_end_time": (usage + timedelta(hours=1)).isoformat(),
                "project": {
                    "id": f"proj-{n % 20}",
                    "number": str(1000 + n % 20),
                    "name": f"Project {n % 20}",
                    "labels": [{"key": "env", "value": "prod"}],
                },
                "labels": [{"key": "team", "value": f"t{n % 7}"}],
                "location": {
                    "location": "us-central1",
                    "country": "US",
                    "region": "us-central1",
                    "zone": "us-central1-a",
                },
                "export_time": (
                    datetime(day.year, day.month, day.day, 6, tzinfo=UTC)
                    + timedelta(seconds=n % 3600 if not late else 7200 + n % 3600)
                ).isoformat(),
                "cost": cost,
                "currency": "USD",
                "currency_conversion_rate": 1.0,
                "usage": {
                    "amount": 3600.0,
                    "unit": "seconds",
                    "amount_in_pricing_units": 1.0,
                    "pricing_unit": "hour",
                },
                "credits": credits,
                "invoice": {"month": f"{usage.year:04d}{usage.month:02d}", "publisher_type": "GOOGLE"},
                "cost_type": "regular",
                "cost_at_list": round(cost * 1.1, 6),
                "transaction_type": "GOOGLE",
            }
        )


def load(bq: Any, table_id: str, lines: Any, path: Path) -> int:
    """Append the lines in chunks (resumable loads); also keep them in `path` for the DuckDB floor."""
    from google.cloud import bigquery

    config = bigquery.LoadJobConfig(source_format="NEWLINE_DELIMITED_JSON", write_disposition="WRITE_APPEND")
    total = 0
    with path.open("ab") as keep:
        chunk: list[bytes] = []
        for line in [*lines, None]:
            if line is not None:
                chunk.append(line)
            if chunk and (line is None or len(chunk) >= CHUNK):
                payload = b"\n".join(chunk)
                keep.write(payload + b"\n")
                bq.load_table_from_file(io.BytesIO(payload), table_id, job_config=config).result()
                total += len(chunk)
                chunk = []
    return total


class Secrets:
    def __init__(self, credential: Credential) -> None:
        self.credential = credential

    async def get(self, provider: str, name: str = "default") -> Credential:
        return self.credential


@dataclass
class GcpResult:
    """What one benchmark run measured."""

    rows: int = 0
    load_seconds: float = 0.0
    fresh_seconds: float = 0.0
    fresh: dict[str, Any] = field(default_factory=dict)
    late_rows: int = 0
    late_partitions: list[str] = field(default_factory=list)
    late_partition_rows: int = 0
    rerun_seconds: float = 0.0
    rerun: dict[str, Any] = field(default_factory=dict)
    rerun_focus_untouched: bool = False
    floor_rows: int = 0
    floor_seconds: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    error: str = ""

    @property
    def rerun_exact(self) -> bool:
        """The re-run copied exactly the changed partitions (all their rows, nothing else)."""
        return (
            sorted(self.rerun.get("partitions_changed", [])) == sorted(self.late_partitions)
            and self.rerun.get("rows_written") == self.late_partition_rows
            and self.rerun_focus_untouched
        )


def lines(result: GcpResult) -> list[str]:
    """The console report."""
    if not result.fresh:
        return [f"GCP billing export ETL: {result.error or 'no result'}"]
    f, r = result.fresh, result.rerun
    out = [
        f"GCP billing export ETL (gcp.bq_etl, {result.rows:,} export rows, 30 partitions; load average "
        f"{result.load_before[0]:.2f} before, {result.load_after[0]:.2f} after):",
        f"  generated and loaded the export in {result.load_seconds:.1f} s (not timed)",
        f"  fresh:  {f['rows_written']:,} rows of {len(f['partitions_changed'])} partitions, "
        f"{f['focus_rows']:,} FOCUS rows in {result.fresh_seconds:.1f} s "
        f"({f['rows_written'] / result.fresh_seconds:,.0f} rows/s), bytes processed {f['bytes_processed']:,}",
    ]
    if r:
        out.append(
            f"  re-run after {result.late_rows:,} late rows in 3 partitions: {r['rows_written']:,} rows of "
            f"{len(r['partitions_changed'])} partitions, {r['focus_rows']:,} FOCUS rows in "
            f"{result.rerun_seconds:.1f} s, bytes processed {r['bytes_processed']:,}; only the changed "
            f"partitions: {'yes' if result.rerun_exact else 'NO'}"
        )
    if result.floor_seconds:
        out.append(
            f"  DuckDB floor: {result.floor_rows:,} rows in {result.floor_seconds:.2f} s "
            f"({result.floor_rows / result.floor_seconds:,.0f} rows/s); fresh / floor "
            f"{result.fresh_seconds / result.floor_seconds:.1f}x (target 10x), re-run / floor "
            f"{result.rerun_seconds / result.floor_seconds:.1f}x"
        )
    if result.error:
        out.append(f"  stopped: {result.error}")
    return out


def markdown(result: GcpResult, host: str) -> str:
    """The README block."""
    if not result.fresh or not result.floor_seconds:
        return "#### GCP billing export ETL\n\n" + "\n".join(lines(result))
    f, r, floor = result.fresh, result.rerun, result.floor_seconds
    rows = [
        "#### GCP billing export ETL (`python -m bench gcp [ROWS]`)",
        "",
        f"{result.rows:,} generated detailed-export rows over 30 partitions in the emulator, on {host} "
        f"(load average {result.load_before[0]:.2f} before, {result.load_after[0]:.2f} after).",
        "",
        "| run | rows copied | partitions | FOCUS rows | seconds | rows/s | x floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| fresh | {f['rows_written']:,} | {len(f['partitions_changed'])} | {f['focus_rows']:,} "
        f"| {result.fresh_seconds:.1f} | {f['rows_written'] / result.fresh_seconds:,.0f} "
        f"| {result.fresh_seconds / floor:.1f} |",
    ]
    if r:
        rows.append(
            f"| re-run, {result.late_rows:,} late rows in 3 partitions | {r['rows_written']:,} "
            f"| {len(r['partitions_changed'])} | {r['focus_rows']:,} | {result.rerun_seconds:.1f} "
            f"| {r['rows_written'] / result.rerun_seconds:,.0f} | {result.rerun_seconds / floor:.1f} |"
        )
    rows.append(
        f"| DuckDB floor (one query, in-process) | {result.floor_rows:,} | | | {floor:.2f} "
        f"| {result.floor_rows / floor:,.0f} | 1 |"
    )
    return "\n".join(rows)


async def measure(count: int, result: GcpResult) -> None:
    """Run the benchmark, filling `result` as it goes (so a stopped run still reports what it has)."""
    result.rows = count
    result.load_before = os.getloadavg()
    folder = Path(tempfile.mkdtemp(prefix="bench-gcp-"))
    emu = Emulator(
        rest_port=free_port(),
        grpc_port=free_port(),
        project="bench-project",
        data_dir=folder / "data",
        log_path=folder / "emu.log",
    )
    google = FakeGoogle()
    await google.start()
    warehouse = BigQueryWarehouse(
        project="bench-project",
        location="US",
        endpoint=emu.endpoint,
        job_timeout=3600,
        google_token_url=f"{google.url}/token",
    )
    try:
        bq = export.client(emu.endpoint)
        table_id = export.create_export(bq, "billing_bench")
        first = datetime.now(UTC).date() - timedelta(days=PARTITIONS + 1)
        data = folder / "rows.ndjson"
        t0 = time.perf_counter()
        await asyncio.to_thread(load, bq, table_id, rows(count, first, random.Random(7)), data)
        result.load_seconds = time.perf_counter() - t0
        await warehouse.ensure_tables("bench_org", load_schemas(PROJECT_ROOT / "configs" / "schemas" / "org"))
        account = ServiceAccount.generate("reader@bench.iam.gserviceaccount.com", export.CUSTOMER_PROJECT)
        google.add_service_account(account)
        info = account.info(billing_export_table=table_id)
        credential = Credential(
            id="cred_bench",
            org_slug="bench",
            provider="gcp",
            name="default",
            version=1,
            fields=info,
            secret_fields=frozenset({"private_key", "private_key_id"}),
        )
        engine = get_engine()

        async def run(run_id: str) -> tuple[float, dict[str, Any]]:
            context = StepContext(
                run=RunIdentity(run_id, "bench", "bench_org", "gcp_billing", "gcp/cost/billing"),
                step_id="copy_export",
                attempt=1,
                parameters={},
                steps={},
                warehouse=warehouse,
                meta_dataset="organizations",
                log=logging.LoggerAdapter(logging.getLogger("bench"), {}),
                http=None,  # type: ignore[arg-type]
                secrets=Secrets(credential),  # type: ignore[arg-type]
            )
            started = time.perf_counter()
            out = await engine.execute({"sweep_weekday": None}, context)
            return time.perf_counter() - started, out

        result.fresh_seconds, result.fresh = await run("benchrun1")
        result.late_rows = count // 100
        late_days = sorted({(first + timedelta(days=(n % 3) * 10)).isoformat() for n in range(3)})
        result.late_partitions = late_days
        await asyncio.to_thread(
            load, bq, table_id, rows(result.late_rows, first, random.Random(8), True), data
        )
        focus = warehouse.table_ref("bench_org", "cost_data_focus_1_2")
        counted = await warehouse.query(
            f"SELECT COUNT(*) AS n FROM `{table_id}` WHERE DATE(export_time) IN UNNEST(@days)",
            {"days": Typed("ARRAY<DATE>", [date.fromisoformat(d) for d in late_days])},
        )
        result.late_partition_rows = int(counted[0]["n"])
        result.rerun_seconds, result.rerun = await run("benchrun2")
        rebuilt = await warehouse.query(
            f"SELECT x_RunId AS run_id, x_SourcePartition IN UNNEST(@days) AS changed, COUNT(*) AS n "
            f"FROM {focus} GROUP BY run_id, changed",
            {"days": Typed("ARRAY<DATE>", [date.fromisoformat(d) for d in late_days])},
        )
        result.rerun_focus_untouched = {(r["run_id"], r["changed"]) for r in rebuilt} == {
            ("benchrun1", False),
            ("benchrun2", True),
        }
        con = duckdb.connect()
        started = time.perf_counter()
        floor = con.execute(
            f"""SELECT COUNT(*), SUM(billed) FROM (
                SELECT CAST(cost AS DECIMAL(38, 9)) + COALESCE(
                         (SELECT SUM(CAST(c.amount AS DECIMAL(38, 9)))
                          FROM UNNEST(credits) AS t(c)), 0) AS billed,
                       cost_at_list AS list_cost, invoice.month AS month, usage_start_time, usage_end_time,
                       service.description AS service_name, sku.id AS sku_id, project.id AS sub_account
                FROM read_json('{data}', format = 'newline_delimited'))"""
        ).fetchone()
        result.floor_seconds = time.perf_counter() - started
        assert floor is not None
        result.floor_rows = int(floor[0])
    finally:
        result.load_after = os.getloadavg()
        await warehouse.close()
        await google.stop()
        emu.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def report(count: int = DEFAULT_ROWS, budget: float = GCP_SECONDS) -> GcpResult:
    """The `make bench` part: the benchmark bounded by `budget` seconds, printed."""
    result = GcpResult()
    try:
        await asyncio.wait_for(measure(count, result), budget)
    except TimeoutError:
        result.error = f"stopped after {budget:.0f} s (time budget)"
    except Exception as exc:  # reported; the rest of `make bench` goes on
        result.error = f"failed ({type(exc).__name__}: {str(exc)[:200]})"
    print("\n".join(lines(result)))
    return result


async def main(count: int, host: str) -> int:
    """`python -m bench gcp [ROWS]`: no time budget."""
    result = await report(count, budget=24 * 3600.0)
    print()
    print(markdown(result, host))
    return 0 if result.fresh and not result.error else 1
