"""The central dataset and its meta tables: created idempotently from `configs/schemas/meta/*.json`."""

from __future__ import annotations

from pathlib import Path

from server import prices
from server.warehouse.bigquery import BigQueryWarehouse
from server.warehouse.schema import TableSchema, load_schemas


def meta_schemas(schemas_dir: Path) -> list[TableSchema]:
    """The meta table schemas shipped with the service."""
    return load_schemas(schemas_dir / "meta")


async def bootstrap(warehouse: BigQueryWarehouse, dataset: str, schemas_dir: Path) -> list[str]:
    """Create the central dataset and every missing meta table; return the table names."""
    schemas = meta_schemas(schemas_dir)
    await warehouse.ensure_tables(dataset, schemas)
    await prices.ensure_snapshot(warehouse, dataset)
    return [s.name for s in schemas]
