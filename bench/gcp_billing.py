"""`gcp.bq_etl` at scale on the emulator, against a DuckDB floor: `python -m bench.gcp_billing [rows]`.

1. A customer export of `rows` generated detailed-export rows (default 1,000,000; deterministic,
   `random.Random(7)`) over 30 daily partitions (column-partitioned on `export_time`, as in the tests),
   loaded in chunks; the org dataset and its tables are created.
2. The processor runs as the server runs it (real warehouse adapter, real vault-shaped credential, the
   customer's service account signing in at a local token endpoint): fresh, then again after 1 % late
   rows were appended to 3 partitions. Reported: seconds, rows/s, partitions copied, FOCUS rows, bytes
   processed (the emulator reports 0).
3. Floor: the same rows as one DuckDB query in-process (read the NDJSON, fold the credits, group nothing:
   one FOCUS-shaped row per export row), and the ratio of the fresh run to it.

Not part of `make bench` yet (it needs several minutes for 1M rows on 2 cores).
"""

from __future__ import annotations

import asyncio
import io
import logging
import random
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson

from processors.base import RunIdentity, StepContext
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
CHUNK = 50_000


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


async def main(count: int) -> None:
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
        loaded = await asyncio.to_thread(load, bq, table_id, rows(count, first, random.Random(7)), data)
        print(f"generated and loaded {loaded:,} export rows in {time.perf_counter() - t0:.1f} s")
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
                http=None,
                secrets=Secrets(credential),  # type: ignore[arg-type]
            )
            started = time.perf_counter()
            out = await engine.execute({}, context)
            return time.perf_counter() - started, out

        fresh_s, fresh = await run("benchrun1")
        print(
            f"fresh: {fresh['rows_written']:,} rows, {len(fresh['partitions_changed'])} partitions, "
            f"{fresh['focus_rows']:,} FOCUS rows in {fresh_s:.1f} s "
            f"({fresh['rows_written'] / fresh_s:,.0f} rows/s), bytes processed {fresh['bytes_processed']}"
        )
        late = count // 100
        await asyncio.to_thread(load, bq, table_id, rows(late, first, random.Random(8), late=True), data)
        rerun_s, rerun = await run("benchrun2")
        print(
            f"re-run after {late:,} late rows in 3 partitions: {rerun['rows_written']:,} rows of "
            f"{len(rerun['partitions_changed'])} partitions, {rerun['focus_rows']:,} FOCUS rows "
            f"in {rerun_s:.1f} s"
        )
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
        floor_s = time.perf_counter() - started
        assert floor is not None
        print(
            f"DuckDB floor: {floor[0]:,} rows in {floor_s:.2f} s; ratio fresh/floor {fresh_s / floor_s:.0f}x"
        )
    finally:
        await warehouse.close()
        await google.stop()
        emu.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if sys.argv[1:] else 1_000_000))
