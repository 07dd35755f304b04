"""Table schemas kept as files: `configs/schemas/{group}/{table}.json`.

A file holds `{"description", "partition_field", "clustering", "fields": [BigQuery schema fields]}`;
tables are created from it through the API, which (unlike DDL on the emulator) keeps NUMERIC at scale 9.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class TableSchema:
    """One table's schema as stored in its file."""

    name: str
    description: str
    fields: tuple[dict[str, Any], ...]
    partition_field: str | None = None
    clustering: tuple[str, ...] = ()

    @property
    def column_names(self) -> tuple[str, ...]:
        """The top-level column names in order."""
        return tuple(str(f["name"]) for f in self.fields)


@dataclass(frozen=True, slots=True)
class TableInfo:
    """What the warehouse says of an existing table (`tables.get`)."""

    table_id: str  # project.dataset.table
    table_type: str  # TABLE, VIEW, MATERIALIZED_VIEW, EXTERNAL, SNAPSHOT
    partition_type: str | None  # DAY, HOUR, MONTH, YEAR; None when not time-partitioned
    partition_field: str | None  # None with a partition_type: ingestion-time (_PARTITIONTIME)
    location: str | None
    num_rows: int | None
    fields: tuple[dict[str, Any], ...]  # BigQuery schema fields (API form), nested ones included

    @property
    def column_names(self) -> frozenset[str]:
        """The top-level column names."""
        return frozenset(str(f["name"]) for f in self.fields)


def load_schema(path: Path) -> TableSchema:
    """Read one schema file; the table name is the file stem."""
    data = json.loads(path.read_text())
    return TableSchema(
        name=path.stem,
        description=data.get("description", ""),
        fields=tuple(data["fields"]),
        partition_field=data.get("partition_field"),
        clustering=tuple(data.get("clustering", ())),
    )


def load_schemas(folder: Path) -> list[TableSchema]:
    """Every schema file of a folder, ordered by table name."""
    return [load_schema(p) for p in sorted(folder.glob("*.json"))]
