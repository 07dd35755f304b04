"""`gcp.bq_etl`: the org's Cloud Billing export (BigQuery) into its raw mirror and its FOCUS 1.2 table.

```yaml
- step_id: copy_export
  ps_type: gcp.bq_etl
  config:
    credential: default          # the org's `gcp` credential (a service-account JSON key)
    source_table: ""             # project.dataset.table; default: the credential's billing_export_table
    job_project: ""              # where the query jobs run (and are billed); default: its project_id
    trailing_days: 40            # how far back `{}` runs look for new or changed partitions
    history_days: 400            # how far back a sweep looks (restatements older than trailing_days)
    sweep_weekday: 6             # UTC weekday (0 = Monday) whose `{}` runs sweep; null: only `sweep=true`
    partition_expression: auto   # auto | _PARTITIONDATE | DATE(export_time)
    copy_via: warehouse          # warehouse: CREATE TABLE AS SELECT by the customer's account (needs
                                 # dataEditor on the org's dataset); client: rows through this process
    staging_hours: 24            # the staging table's expiration (a crashed run's is dropped by BigQuery)
    raw_table: gcp_billing_export_raw
    focus_table: cost_data_focus_1_2
    focus: true                  # rebuild the FOCUS rows of the changed partitions
    partitions_per_query: 7      # copy_via client: changed partitions read per query
    load_batch_rows: 100000      # copy_via client: rows buffered before a load job into the staging table
```

The export is append-only and has no row key: a late row or a correction is a new row, appended to the
partition of the day it was exported (ingestion-time partitioning, `_PARTITIONTIME`; some exports are
partitioned on `export_time`). So the unit of work is the source partition:

1. **Probe** the table with the customer's service account (its key is held in memory only; the query
   jobs run in `job_project`, which pays the scan): it must exist (`SOURCE_NOT_FOUND`), be readable
   (`PERMISSION_DENIED`), be a table, not a view (`SOURCE_IS_VIEW`: a view hides the partitions), be
   day-partitioned (`SOURCE_NOT_PARTITIONED`) and hold the export's columns (`SOURCE_SCHEMA_MISMATCH`).
   A rejected key fails with `CREDENTIAL_REJECTED`, a missing credential with `CREDENTIAL_NOT_FOUND`,
   a credential without a table with `SOURCE_NOT_CONFIGURED`.
2. **Fingerprint** every partition of the window: `(MAX(export_time), COUNT(*))`, one query that reads
   `export_time` only (plus `usage_start_time` for a dated run), bounded by a partition filter. The
   window is `{}`: the last `trailing_days` days (`history_days` for a sweep: on `sweep_weekday` or with
   the parameter `sweep=true`); `{"date": D}` or `{"start_date", "end_date"}`: the
   partitions from the window's first day to `trailing_days` after its last (usage of a day can only be
   exported later), and every partition that holds usage of the window is copied again even when
   unchanged. `force_refresh` copies every partition of the window.
3. **Compare** with the stored fingerprints: the same aggregate over the org's raw mirror
   (`x_source_table`, `x_source_partition`), so the fingerprint of a partition is committed by the very
   statement that writes its rows and can never disagree with them. New, changed and vanished
   partitions form the work set.
4. **Copy** the changed partitions whole, inside BigQuery (`copy_via: warehouse`): the customer's account
   runs one `CREATE TABLE staging OPTIONS (expiration_timestamp ...) AS SELECT` over exactly those
   partitions (explicit columns; every FLOAT of the export becomes NUMERIC(38, 9), rounded by BigQuery,
   so money never passes through a float of ours; `x_tags` from the tag arrays). `copy_via: client`
   reads the rows and loads them with our account instead (no grant needed, slower).
5. **Swap and rebuild FOCUS** in one script of ours, one transaction: the mirror's rows of exactly the
   changed partitions are deleted and the staged rows inserted, and the FOCUS rows converted from those
   partitions (`x_SourcePartition`, of the billing accounts they held) are deleted and converted again
   (`billing_focus.sql`, the column mapping is in its header). FOCUS rows from before `x_SourcePartition`
   (NULL) make that run rebuild their whole invoice months once. A failed run leaves mirror and FOCUS as
   they were; a re-run converges.

Outputs: `rows_written` (rows copied), `partitions_checked`, `partitions_changed`, `invoice_months`,
`focus_rows`, `bytes_processed` (the customer's query jobs; also logged), `partition_expression`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

from processors.base import (
    Credential,
    StepContext,
    TableInfo,
    TableSchema,
    Typed,
    Warehouse,
    parse_config,
)
from server.errors import NotFoundError, ServiceError, TerminalError
from server.warehouse.schema import load_schema
from server.warehouse.sql import literal

HERE = Path(__file__).resolve().parent
SCHEMAS = HERE.parent.parent / "configs" / "schemas" / "org"
RAW_SCHEMA = load_schema(SCHEMAS / "gcp_billing_export_raw.json")
FOCUS_SCHEMA = load_schema(SCHEMAS / "cost_data_focus_1_2.json")
PROJECTS_SCHEMA = load_schema(SCHEMAS / "gcp_projects.json")
PACIFIC = ZoneInfo("America/Los_Angeles")
FOCUS_SQL = (HERE / "billing_focus.sql").read_text(encoding="utf-8")
PROVIDER = "gcp"
SOURCE_SYSTEM = "gcp"
TABLE_ID = re.compile(
    r"^([a-z][a-z0-9-]{4,28}[a-z0-9])[.:]([A-Za-z_][A-Za-z0-9_]{0,1023})\.([A-Za-z_][A-Za-z0-9_-]{0,1023})$"
)
# Columns the copy needs; everything else of the raw schema is copied when the export has it.
REQUIRED_COLUMNS = frozenset(
    {"billing_account_id", "export_time", "cost", "currency", "invoice", "cost_type"}
)


class EtlConfig(BaseModel):
    """The step's config (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    credential: str = Field("default", pattern=r"^[a-z][a-z0-9_]{0,62}$")
    source_table: str = Field("", pattern=TABLE_ID.pattern + "|^$")
    job_project: str = Field("", pattern=r"^([a-z][a-z0-9-]{4,28}[a-z0-9])?$")
    trailing_days: int = Field(40, ge=1, le=400)
    partition_expression: Literal["auto", "_PARTITIONDATE", "DATE(export_time)"] = "auto"
    raw_table: str = Field("gcp_billing_export_raw", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
    focus_table: str = Field("cost_data_focus_1_2", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
    focus: bool = True
    history_days: int = Field(400, ge=1, le=4000)
    sweep_weekday: int | None = Field(6, ge=0, le=6)
    copy_via: Literal["warehouse", "client"] = "warehouse"
    staging_hours: int = Field(24, ge=1, le=168)
    partitions_per_query: int = Field(7, ge=1, le=400)
    load_batch_rows: int = Field(100_000, ge=1, le=2_000_000)


@dataclass(frozen=True, slots=True)
class Partitioning:
    """How the source is partitioned: `key` is the DATE of a row's partition; filters prune on it."""

    key: str  # _PARTITIONDATE | DATE(<timestamp column>) | <date column>
    column: str  # the column the filters compare (the pseudo-column or the partitioning column)
    is_timestamp: bool

    def between(self, lo: str, hi: str) -> str:
        """A pruning filter for the partitions from @lo to @hi (DATE parameters, inclusive)."""
        if self.is_timestamp:
            # (TIMESTAMP_ADD, not DATE_ADD: bqemulator re-renders statements with DATE_ADD and drops the
            # scale of their NUMERIC(38, 9) casts)
            upper = f"TIMESTAMP_ADD(TIMESTAMP({hi}), INTERVAL 1 DAY)"
            return f"{self.column} >= TIMESTAMP({lo}) AND {self.column} < {upper}"
        return f"{self.column} BETWEEN {lo} AND {hi}"

    def among(self, days: str, lo: str, hi: str) -> str:
        """A pruning filter for exactly the partitions in the DATE array @days (bounded by @lo..@hi)."""
        return f"{self.between(lo, hi)} AND {self.key} IN UNNEST({days})"


def partitioning(info: TableInfo, configured: str) -> Partitioning:
    """The partition expression: the configured one, or what `tables.get` says (`auto`)."""
    if configured == "_PARTITIONDATE":
        return Partitioning("_PARTITIONDATE", "_PARTITIONDATE", False)
    if configured == "DATE(export_time)":
        return Partitioning("DATE(export_time)", "export_time", True)
    if info.partition_type != "DAY":
        raise TerminalError(
            "the billing export table is not partitioned by day; set partition_expression to read it",
            reason="SOURCE_NOT_PARTITIONED",
        )
    if info.partition_field is None:  # ingestion-time partitioning: the export's own layout
        return Partitioning("_PARTITIONDATE", "_PARTITIONDATE", False)
    field = _field(info.fields, info.partition_field)
    name = info.partition_field
    if field is None or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise TerminalError("the export's partitioning column is unusable", reason="SOURCE_SCHEMA_MISMATCH")
    if field.get("type") == "DATE":
        return Partitioning(f"`{name}`", f"`{name}`", False)
    return Partitioning(f"DATE(`{name}`)", f"`{name}`", True)


def _field(fields: tuple[dict[str, Any], ...] | list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((f for f in fields if str(f.get("name", "")).lower() == name.lower()), None)


def projection(
    raw: tuple[dict[str, Any], ...] | list[dict[str, Any]], source: Any, ref: str = "", depth: int = 0
) -> list[str]:
    """The SELECT list that copies the raw schema's export columns from the source's schema.

    Top-level columns the source lacks are left out (they stay NULL); a missing field of a record is a
    typed NULL, so a rebuilt record has the mirror's exact type (an INSERT needs it). A FLOAT in the
    source (money, quantities) becomes `CAST(x AS NUMERIC(38, 9))`: BigQuery's own rounding of the float
    to 9 decimals, computed by BigQuery, so no money passes through a float of ours (and the mirror's sums
    are exact NUMERIC). The scale is explicit: bqemulator's plain NUMERIC keeps 3 decimals. A record is
    rebuilt only when one of its fields needs a conversion or is missing, an array of records with
    `ARRAY(SELECT AS STRUCT ... FROM UNNEST(...))` (BigQuery casts no arrays).
    """
    out: list[str] = []
    for field in raw:
        name = str(field["name"])
        if name.startswith("x_"):
            continue
        found = _field(source, name)
        path = f"{ref}.`{name}`" if ref else f"`{name}`"
        if found is None:
            if ref:
                out.append(f"CAST(NULL AS {_sql_type(field)}) AS `{name}`")
            continue
        expression = _convert(field, found, path, depth)
        out.append(f"{expression} AS `{name}`")
    return out


def _sql_type(field: dict[str, Any]) -> str:
    """The GoogleSQL type of a schema field (NUMERIC with its scale: the emulator's plain one has 3)."""
    kind = str(field.get("type"))
    if kind in ("RECORD", "STRUCT"):
        inner = ", ".join(f"`{f['name']}` {_sql_type(f)}" for f in field.get("fields", []))
        base = f"STRUCT<{inner}>"
    else:
        base = {
            "NUMERIC": "NUMERIC(38, 9)",
            "FLOAT": "FLOAT64",
            "INTEGER": "INT64",
            "BOOLEAN": "BOOL",
        }.get(kind, kind)
    return f"ARRAY<{base}>" if field.get("mode") == "REPEATED" else base


def _needs_rebuild(raw: dict[str, Any], source: dict[str, Any]) -> bool:
    if raw.get("type") in ("RECORD", "STRUCT"):
        subs = source.get("fields", [])
        return any(
            _field(subs, str(f["name"])) is None or _needs_rebuild(f, _field(subs, str(f["name"])) or {})
            for f in raw.get("fields", [])
        ) or len(subs) != len(raw.get("fields", []))
    return source.get("type") in ("FLOAT", "FLOAT64") and raw.get("type") == "NUMERIC"


def _convert(raw: dict[str, Any], source: dict[str, Any], path: str, depth: int) -> str:
    kind = raw.get("type")
    if kind in ("RECORD", "STRUCT"):
        if not _needs_rebuild(raw, source):
            return path
        element = f"e{depth}"
        if raw.get("mode") == "REPEATED":
            inner = projection(raw.get("fields", []), source.get("fields", []), element, depth + 1)
            return f"ARRAY(SELECT AS STRUCT {', '.join(inner)} FROM UNNEST({path}) AS {element})"
        inner = projection(raw.get("fields", []), source.get("fields", []), path, depth + 1)
        return f"IF({path} IS NULL, NULL, STRUCT({', '.join(inner)}))"
    if kind == "NUMERIC" and source.get("type") in ("FLOAT", "FLOAT64"):
        # Rounded to 9 decimals by BigQuery. (The copy statement avoids DATE_ADD, ARRAY_AGG(... LIMIT) and
        # WITH OFFSET: bqemulator re-renders such statements through sqlglot, which drops the scale.)
        return f"CAST({path} AS NUMERIC(38, 9))"
    return path


# Tags of a row, first key wins: resource tags, then labels, then project labels.
TAG_GROUPS = (("tags", "`tags`"), ("labels", "`labels`"), ("project", "`project`.`labels`"))


def tags_sql(groups: int) -> str:
    """FOCUS `Tags` as JSON object text from the tag arrays `s.g0`.. in priority order (resource tags,
    labels, project labels): the first group with a key wins (within a group the lowest value), an
    empty key is dropped, a NULL value is ""."""
    parts = [
        f"SELECT t.key AS k, IFNULL(t.value, '') AS v, {n} AS g FROM UNNEST(s.g{n}) AS t"
        for n in range(groups)
    ]
    return (
        "(SELECT CONCAT('{', IFNULL(STRING_AGG(CONCAT(TO_JSON_STRING(k), ':', TO_JSON_STRING(v)), ',' "
        "ORDER BY k), ''), '}') FROM (SELECT k, SUBSTR(MIN(CONCAT(CAST(g AS STRING), v)), 2) AS v FROM ("
        + " UNION ALL ".join(parts)
        + ") WHERE k IS NOT NULL AND k != '' GROUP BY k))"
    )


@dataclass(frozen=True, slots=True)
class Window:
    """Which partitions to look at, and which to copy regardless of their fingerprint."""

    lo: date
    hi: date
    usage_start: date | None  # a dated run: partitions holding usage of [usage_start, usage_end]
    usage_end: date | None
    force_all: bool


def window(context: StepContext, config: EtlConfig, today: date) -> Window:
    """The run's partition window (see the module docstring)."""
    force = str(context.parameters.get("force_refresh", "")).lower() == "true"
    start, end = context.start_date, context.end_date
    if start is None or end is None:
        sweep = str(context.parameters.get("sweep", "")).lower() == "true" or (
            config.sweep_weekday is not None and today.weekday() == config.sweep_weekday
        )
        days = max(config.history_days, config.trailing_days) if sweep else config.trailing_days
        return Window(today - timedelta(days=days), today, None, None, force)
    return Window(start, min(end + timedelta(days=config.trailing_days), today), start, end, force)


def fingerprint_sql(source: str, part: Partitioning, dated: bool) -> str:
    """Per partition of the window: MAX(export_time), COUNT(*) (and rows of the dated window's usage)."""
    hits = "COUNTIF(DATE(usage_start_time) BETWEEN @usage_start AND @usage_end)" if dated else "0"
    return (
        f"SELECT {part.key} AS partition_date, MAX(export_time) AS max_export_time, COUNT(*) AS row_count, "
        f"{hits} AS window_rows FROM {source} WHERE {part.between('@lo', '@hi')} GROUP BY partition_date"
    )


def copy_sql(source: str, part: Partitioning, columns: list[str], source_fields: Any = ()) -> str:
    """Every row of the partitions @days (bounded by @lo..@hi) as mirror rows: the raw schema's columns
    (`columns`, from `projection`), the partition, the invoice month, `x_tags` and the run's lineage
    (@source_table, @pipeline_id, @run_id).

    `x_tags` is computed once per distinct combination of the row's tag arrays (keyed by their JSON) and
    joined back: the same result as a subquery per row, without a correlated subquery per row (which
    the emulator's DuckDB runs at ~1,000 rows/s)."""
    groups = [(column, path) for column, path in TAG_GROUPS if _field(source_fields, column) is not None]
    lineage = (
        "@source_table AS x_source_table, @pipeline_id AS x_pipeline_id, @run_id AS x_run_id, "
        "CURRENT_TIMESTAMP() AS x_ingested_at"
    )
    rows = (
        f"SELECT {', '.join(columns)}, {part.key} AS x_source_partition, `invoice`.`month` AS x_invoice_month"
    )
    where = f"FROM {source} WHERE {part.among('@days', '@lo', '@hi')}"
    if not groups:
        return f"{rows}, '{{}}' AS x_tags, {lineage} {where}"
    key = ", ".join(f"{path} AS g{n}" for n, (_, path) in enumerate(groups))
    sets = ", ".join(f"ANY_VALUE({path}) AS g{n}" for n, (_, path) in enumerate(groups))
    tag_key = f"TO_JSON_STRING(STRUCT({key}))"
    # Subqueries, not WITH: bqemulator turns NUMERIC(38, 9) casts inside a WITH into 3-decimal ones.
    return (
        f"SELECT src.* EXCEPT (tag_key), tagged.x_tags, {lineage} "
        f"FROM ({rows}, {tag_key} AS tag_key {where}) AS src "
        f"JOIN (SELECT s.tag_key, {tags_sql(len(groups))} AS x_tags "
        f"FROM (SELECT {tag_key} AS tag_key, {sets} {where} GROUP BY tag_key) AS s) AS tagged "
        "USING (tag_key)"
    )


LINEAGE = ("x_source_table", "x_pipeline_id", "x_run_id", "x_ingested_at")


def copy_columns(columns: list[str]) -> list[str]:
    """The mirror columns that `copy_sql` with these `projection` columns yields, in order."""
    names = [column.rsplit(" AS ", 1)[1] for column in columns]
    return [*names, "x_source_partition", "x_invoice_month", "x_tags", *LINEAGE]


def tags(row: dict[str, Any]) -> str:
    """FOCUS `Tags` as a JSON object: resource tags over labels over project labels (first key wins);
    the rule `tags_sql` computes in the warehouse, kept as the reference the tests compare with."""
    merged: dict[str, str] = {}
    project = row.get("project") or {}
    for group in (row.get("tags"), row.get("labels"), project.get("labels")):
        found: dict[str, str] = {}
        for item in group or []:
            key, value = item.get("key"), item.get("value")
            text = "" if value is None else str(value)
            if isinstance(key, str) and key and key not in merged:
                found[key] = min(found.get(key, text), text)
        merged |= found
    return json.dumps(merged, sort_keys=True, separators=(",", ":"))


class BillingExportEtl:
    """The processor (see the module docstring)."""

    Config = EtlConfig

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        config = parse_config(EtlConfig, step_config)
        credential = await context.secrets.get(PROVIDER, config.credential)
        table_id = config.source_table or str(credential.value("billing_export_table") or "")
        match = TABLE_ID.fullmatch(table_id)
        if match is None:
            raise TerminalError(
                "the gcp credential names no billing export table "
                "(billing_export_table: project.dataset.table)",
                reason="SOURCE_NOT_CONFIGURED",
            )
        project, dataset, table = match.groups()
        job_project = config.job_project or str(credential.value("project_id") or project)
        today = datetime.now(UTC).date()
        span = window(context, config, today)
        wh = context.warehouse
        if config.raw_table == RAW_SCHEMA.name:  # orgs created before the table existed get it here
            await wh.ensure_table(context.run.dataset, RAW_SCHEMA)
        if config.focus and config.focus_table == FOCUS_SCHEMA.name:  # and x_SourcePartition
            await wh.ensure_table(context.run.dataset, FOCUS_SCHEMA)
        staging = _staging_name(config.raw_table, context.run.run_id)
        async with wh.as_service_account(_key(credential), project=job_project) as customer:
            info = await self._probe(customer, project, dataset, table)
            part = partitioning(info, config.partition_expression)
            source = f"`{project}.{dataset}.{table}`"
            source_id = f"{project}.{dataset}.{table}"
            dated = span.usage_start is not None
            params: dict[str, Any] = {"lo": span.lo, "hi": span.hi}
            if dated:
                params |= {"usage_start": span.usage_start, "usage_end": span.usage_end}
            found = await self._customer_query(customer, fingerprint_sql(source, part, dated), params)
            scanned = found.bytes_processed
            current = {r["partition_date"]: (r["max_export_time"], int(r["row_count"])) for r in found.rows}
            forced = {r["partition_date"] for r in found.rows if int(r["window_rows"] or 0) > 0}
            stored = await self._stored(context, config, source_id, span)
            changed = sorted(
                p
                for p in set(current) | set(stored)
                if span.force_all or p in forced or current.get(p) != stored.get(p)
            )
            context.log.info(
                "billing export %s: %d partitions in %s..%s, %d changed (%s)",
                source_id,
                len(current),
                span.lo,
                span.hi,
                len(changed),
                part.key,
            )
            if not changed:
                return self._result(0, len(current), [], [], 0, scanned, part)
            # A crashed run's staging table expires by itself (BigQuery drops it); a retry replaces it.
            await wh.drop_table(context.run.dataset, staging)
            try:
                columns = projection(RAW_SCHEMA.fields, list(info.fields))
                names = copy_columns(columns)
                statement = copy_sql(source, part, columns, info.fields)
                lineage = {
                    "source_table": source_id,
                    "pipeline_id": context.run.pipeline_id,
                    "run_id": context.run.run_id,
                }
                copy = (
                    self._copy_in_warehouse if config.copy_via == "warehouse" else self._copy_through_client
                )
                copied, scanned_copy = await copy(
                    context, config, customer, statement, lineage, staging, changed
                )
                scanned += scanned_copy
            except BaseException:
                await wh.drop_table(context.run.dataset, staging)
                raise
        try:
            months, focus_rows = await self._swap(context, config, source_id, changed, staging, names)
        finally:
            await wh.drop_table(context.run.dataset, staging)
        context.log.info(
            "billing export %s: %d rows of %d partitions swapped in, invoice months %s, %d FOCUS rows, "
            "%d bytes processed at the source",
            source_id,
            copied,
            len(changed),
            ",".join(months),
            focus_rows,
            scanned,
        )
        return self._result(copied, len(current), changed, months, focus_rows, scanned, part)

    @staticmethod
    def _result(
        copied: int,
        checked: int,
        changed: list[date],
        months: list[str],
        focus_rows: int,
        scanned: int,
        part: Partitioning,
    ) -> dict[str, Any]:
        return {
            "status": "SUCCESS",
            "rows_written": copied,
            "partitions_checked": checked,
            "partitions_changed": [p.isoformat() for p in changed],
            "invoice_months": months,
            "focus_rows": focus_rows,
            "bytes_processed": scanned,
            "partition_expression": part.key,
        }

    @staticmethod
    async def _probe(customer: Warehouse, project: str, dataset: str, table: str) -> TableInfo:
        try:
            info = await customer.table_info(project, dataset, table)
        except NotFoundError as exc:
            raise TerminalError(
                "the billing export table does not exist (or the service account cannot see its dataset)",
                reason="SOURCE_NOT_FOUND",
                detail=exc.detail,
            ) from exc
        except ServiceError as exc:
            raise _source_error(exc) from exc
        if info.table_type != "TABLE":
            raise TerminalError(
                f"the billing export must be a table, not a {info.table_type.lower().replace('_', ' ')} "
                "(a view hides the partitions): name the export table itself",
                reason="SOURCE_IS_VIEW",
            )
        missing = sorted(c for c in REQUIRED_COLUMNS if c not in {n.lower() for n in info.column_names})
        if missing:
            raise TerminalError(
                f"the table is not a Cloud Billing export: no column {', '.join(missing[:5])}",
                reason="SOURCE_SCHEMA_MISMATCH",
            )
        return info

    @staticmethod
    async def _customer_query(
        customer: Warehouse, statement: str, params: dict[str, Any], *, writes: bool = False
    ) -> Any:
        try:
            return await customer.query_job(statement, params)
        except ServiceError as exc:
            raise _source_error(exc, writes=writes) from exc

    @staticmethod
    async def _stored(
        context: StepContext, config: EtlConfig, source_id: str, span: Window
    ) -> dict[date, tuple[datetime, int]]:
        raw = context.warehouse.table_ref(context.run.dataset, config.raw_table)
        rows = await context.warehouse.query(
            f"SELECT x_source_partition AS partition_date, MAX(export_time) AS max_export_time, "
            f"COUNT(*) AS row_count FROM {raw} WHERE x_source_table = @source "
            "AND x_source_partition BETWEEN @lo AND @hi GROUP BY partition_date",
            {"source": source_id, "lo": span.lo, "hi": span.hi},
        )
        return {r["partition_date"]: (r["max_export_time"], int(r["row_count"])) for r in rows}

    @staticmethod
    def _batches(changed: list[date], size: int) -> list[dict[str, Any]]:
        """The copy's parameters per query: `size` changed partitions each (sorted: usually adjacent)."""
        return [
            {"days": Typed("ARRAY<DATE>", days), "lo": days[0], "hi": days[-1]}
            for days in (changed[i : i + size] for i in range(0, len(changed), size))
        ]

    async def _copy_in_warehouse(
        self,
        context: StepContext,
        config: EtlConfig,
        customer: Warehouse,
        statement: str,
        lineage: dict[str, Any],
        staging: str,
        changed: list[date],
    ) -> tuple[int, int]:
        """`CREATE TABLE staging OPTIONS (expiration_timestamp ...) AS SELECT ...`, one statement for every
        changed partition (BigQuery prunes to them), run by the customer's service account: the rows never
        leave BigQuery (the account needs to create tables in the org's dataset: see the README). A DDL
        job, not DML: no DML quota, and on the emulator no snapshot of the table it fills."""
        wh = context.warehouse
        target = wh.table_ref(context.run.dataset, staging)
        params = {"days": changed, "lo": changed[0], "hi": changed[-1]} | lineage
        # Literals, not parameters (DDL); every value is validated (sql.literal).
        select = re.sub(r"@(\w+)", lambda m: literal(params[m.group(1)]), statement)
        result = await self._customer_query(
            customer,
            f"CREATE TABLE {target} OPTIONS (expiration_timestamp = "
            f"TIMESTAMP_ADD(CURRENT_TIMESTAMP(), INTERVAL {config.staging_hours} HOUR)) AS {select}",
            {},
            writes=True,
        )
        counted = await wh.query(f"SELECT COUNT(*) AS n FROM {target}")
        return int(counted[0]["n"]), result.bytes_processed

    async def _copy_through_client(
        self,
        context: StepContext,
        config: EtlConfig,
        customer: Warehouse,
        statement: str,
        lineage: dict[str, Any],
        staging: str,
        changed: list[date],
    ) -> tuple[int, int]:
        """The rows read by the customer's service account and loaded by ours (no grant needed, every
        row passes through this process) into a staging table of the mirror's schema that expires by
        itself: batches of at least `load_batch_rows` rows per load job."""
        wh = context.warehouse
        await wh.ensure_table(
            context.run.dataset,
            TableSchema(staging, "staging", RAW_SCHEMA.fields),
            expires=datetime.now(UTC) + timedelta(hours=config.staging_hours),
        )
        copied = scanned = 0
        pending: list[dict[str, Any]] = []
        batches = self._batches(changed, config.partitions_per_query)
        for n, params in enumerate(batches):
            result = await self._customer_query(customer, statement, params | lineage)
            scanned += result.bytes_processed
            pending.extend(_loadable(row) for row in result.rows)
            if len(pending) >= config.load_batch_rows or n == len(batches) - 1:
                copied += await wh.load_rows(context.run.dataset, staging, pending)
                pending = []
        return copied, scanned

    @staticmethod
    async def _swap(
        context: StepContext,
        config: EtlConfig,
        source_id: str,
        changed: list[date],
        staging_name: str,
        copied: list[str],
    ) -> tuple[list[str], int]:
        """One script, one transaction: the mirror's rows of exactly the changed partitions are replaced by
        the staged ones, and the FOCUS rows converted from them are rebuilt. Returns the invoice months the
        changed partitions held before or hold now, and the FOCUS rows written."""
        wh = context.warehouse
        dataset = context.run.dataset
        raw = wh.table_ref(dataset, config.raw_table)
        staging = wh.table_ref(dataset, staging_name)
        days = literal(changed)
        # Literals, not parameters: bqemulator binds the parameters of a script's statements wrongly;
        # every value is validated (sql.literal).
        scope = await wh.query(
            f"SELECT DISTINCT x_invoice_month AS month, billing_account_id AS account FROM {raw} "
            f"WHERE x_source_table = {literal(source_id)} AND x_source_partition IN UNNEST({days}) "
            f"UNION DISTINCT SELECT DISTINCT x_invoice_month, billing_account_id FROM {staging}"
        )
        months = sorted({str(r["month"]) for r in scope if r["month"]})
        accounts = sorted({str(r["account"]) for r in scope if r["account"]}) or [""]
        names = ", ".join(copied)
        statements = [
            f"DELETE FROM {raw} WHERE x_source_table = {literal(source_id)} "
            f"AND x_source_partition IN UNNEST({days})",
            f"INSERT INTO {raw} ({names}) SELECT {names} FROM {staging}",
        ]
        if config.focus and months:
            statements.append(await _focus_sql(context, config, source_id, changed, months, accounts))
        await wh.query("BEGIN TRANSACTION;\n" + ";\n".join(statements) + ";\nCOMMIT TRANSACTION;")
        if not (config.focus and months):
            return months, 0
        focus = wh.table_ref(dataset, config.focus_table)
        counted = await wh.query(
            f"SELECT COUNT(*) AS n FROM {focus} WHERE x_SourceSystem = @system AND x_RunId = @run_id",
            {"system": SOURCE_SYSTEM, "run_id": context.run.run_id},
        )
        return months, int(counted[0]["n"]) if counted else 0


async def _focus_sql(
    context: StepContext,
    config: EtlConfig,
    source_id: str,
    changed: list[date],
    months: list[str],
    accounts: list[str],
) -> str:
    """The FOCUS rebuild's statements (billing_focus.sql): per changed partition, or per invoice month
    while FOCUS rows from before `x_SourcePartition` are in those months (they are rebuilt once)."""
    wh = context.warehouse
    dataset = context.run.dataset
    focus = wh.table_ref(dataset, config.focus_table)
    await wh.ensure_table(dataset, PROJECTS_SCHEMA)  # read for project names; may still be empty
    months = [m for m in months if re.fullmatch(r"\d{6}", m)]
    periods = literal([billing_period(m)[0] for m in months])
    accounts_in = f"BillingAccountId IN UNNEST({literal(accounts)})"
    legacy = await wh.query(
        f"SELECT COUNT(*) AS n FROM {focus} WHERE x_SourceSystem = {literal(SOURCE_SYSTEM)} "
        f"AND {accounts_in} AND BillingPeriodStart IN UNNEST({periods}) AND x_SourcePartition IS NULL"
    )
    if legacy and int(legacy[0]["n"]):
        focus_scope = f"{accounts_in} AND BillingPeriodStart IN UNNEST({periods})"
        row_scope = f"r.x_invoice_month IN UNNEST({literal(months)})"
    else:
        focus_scope = f"{accounts_in} AND x_SourcePartition IN UNNEST({literal(changed)})"
        row_scope = f"r.x_source_partition IN UNNEST({literal(changed)})"
    values = {
        "focus": focus,
        "raw": wh.table_ref(dataset, config.raw_table),
        "projects": wh.table_ref(dataset, PROJECTS_SCHEMA.name),
        "columns": ", ".join(FOCUS_SCHEMA.column_names),
        "source": literal(source_id),
        "focus_scope": focus_scope,
        "row_scope": row_scope,
        "pipeline_id": literal(context.run.pipeline_id),
        "run_id": literal(context.run.run_id),
    }
    body = "\n".join(line for line in FOCUS_SQL.splitlines() if not line.lstrip().startswith("--"))
    return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], body).strip().rstrip(";")


def billing_period(month: str) -> tuple[datetime, datetime]:
    """An invoice month (YYYYMM) as [start, end) in UTC: the month of America/Los_Angeles (DST-correct)."""
    first = date(int(month[:4]), int(month[4:6]), 1)
    following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    return (
        datetime(first.year, first.month, 1, tzinfo=PACIFIC).astimezone(UTC),
        datetime(following.year, following.month, 1, tzinfo=PACIFIC).astimezone(UTC),
    )


def _key(credential: Credential) -> dict[str, Any]:
    """The service-account key document of the credential (without our own fields)."""
    info = credential.reveal()
    info.pop("billing_export_table", None)
    return info


def _staging_name(raw_table: str, run_id: str) -> str:
    return f"{raw_table}__staging_{re.sub(r'[^A-Za-z0-9_]', '_', run_id)[-48:]}"


def _loadable(row: dict[str, Any]) -> dict[str, Any]:
    """A row as a load job takes it (Decimal and datetime are written exactly by the adapter)."""
    return {k: v for k, v in row.items() if v is not None and v != []}


def _source_error(exc: ServiceError, *, writes: bool = False) -> ServiceError:
    """The customer's side of an error, in the processor's reasons (the operator detail is kept);
    `writes`: the statement also creates the staging table in the org's dataset (`copy_via: warehouse`),
    so a refusal may be that grant missing rather than the export's."""
    if exc.reason == "WAREHOUSE_PERMISSION_DENIED":
        needs = (
            "it needs bigquery.tables.getData on the export's dataset, bigquery.jobs.create in the job "
            "project"
        )
        if writes:
            needs += (
                " and, to copy inside BigQuery, roles/bigquery.dataEditor on the org's dataset (or set "
                "copy_via: client)"
            )
        return TerminalError(
            f"the service account may not read the billing export or write the copy ({needs})"
            if writes
            else f"the service account may not read the billing export ({needs})",
            reason="PERMISSION_DENIED",
            detail=exc.detail,
        )
    if exc.reason == "WAREHOUSE_NOT_FOUND":
        return TerminalError(
            "the billing export table does not exist", reason="SOURCE_NOT_FOUND", detail=exc.detail
        )
    return exc


def get_engine() -> BillingExportEtl:
    """The processor."""
    return BillingExportEtl()
