"""`gcp.bq_etl` at the SQL level: the production partition expression (`_PARTITIONDATE`, which the emulator
cannot run: it rewrites the pseudo-column to the current date), the projection of the export's columns,
and how the customer's errors become the processor's reasons."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlglot
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exceptions

from processors.gcp import bq_etl
from server.errors import TerminalError
from server.warehouse.bigquery import _mapped
from server.warehouse.schema import TableInfo
from tests import gcp_billing_export as export

SOURCE_FIELDS = tuple(f.to_api_repr() for f in export.schema())


def info(partition_type: str | None, partition_field: str | None, table_type: str = "TABLE") -> TableInfo:
    return TableInfo(
        "customer-billing.ds.t", table_type, partition_type, partition_field, "US", 10, SOURCE_FIELDS
    )


def parse(sql: str) -> Any:
    return sqlglot.parse_one(sql, read="bigquery")


def test_ingestion_time_tables_are_read_by_the_partition_pseudo_column() -> None:
    part = bq_etl.partitioning(info("DAY", None), "auto")
    assert part.key == "_PARTITIONDATE"
    fingerprint = bq_etl.fingerprint_sql("`customer-billing.ds.t`", part, dated=False)
    tree = parse(fingerprint)
    assert "_PARTITIONDATE BETWEEN @lo AND @hi" in tree.sql(dialect="bigquery")
    assert {c.name for c in tree.find_all(sqlglot.exp.Column)} <= {
        "_PARTITIONDATE",
        "export_time",
        "partition_date",
    }
    copy = bq_etl.copy_sql(
        "`customer-billing.ds.t`", part, bq_etl.projection(bq_etl.RAW_SCHEMA.fields, SOURCE_FIELDS)
    )
    text = parse(copy).sql(dialect="bigquery")
    assert "_PARTITIONDATE BETWEEN @lo AND @hi AND _PARTITIONDATE IN UNNEST(@days)" in text
    assert "_PARTITIONDATE AS x_source_partition" in text


def test_column_partitioned_tables_prune_on_the_column() -> None:
    part = bq_etl.partitioning(info("DAY", "export_time"), "auto")
    assert part.key == "DATE(`export_time`)"
    text = bq_etl.copy_sql("`p.d.t`", part, ["`cost`"])
    assert (
        "`export_time` >= TIMESTAMP(@lo) AND `export_time` < TIMESTAMP_ADD(TIMESTAMP(@hi), INTERVAL 1 DAY)"
        in text
    )
    assert bq_etl.partitioning(info("DAY", None), "DATE(export_time)").key == "DATE(export_time)"


def test_a_table_without_day_partitions_is_refused_unless_configured() -> None:
    with pytest.raises(TerminalError) as caught:
        bq_etl.partitioning(info(None, None), "auto")
    assert caught.value.reason == "SOURCE_NOT_PARTITIONED"
    assert bq_etl.partitioning(info(None, None), "_PARTITIONDATE").key == "_PARTITIONDATE"


def test_floats_become_nine_decimal_numerics_and_missing_columns_are_left_out() -> None:
    columns = bq_etl.projection(bq_etl.RAW_SCHEMA.fields, SOURCE_FIELDS)
    text = ", ".join(columns)
    assert "CAST(`cost` AS NUMERIC(38, 9)) AS `cost`" in text
    assert (
        "ARRAY(SELECT AS STRUCT e0.`name` AS `name`, CAST(e0.`amount` AS NUMERIC(38, 9)) AS `amount`" in text
    )
    assert "`price` AS `price`" in text  # NUMERIC already: copied as it is
    parse("SELECT " + text + " FROM t")  # valid BigQuery SQL
    standard = tuple(f for f in SOURCE_FIELDS if f["name"] not in ("resource", "subscription", "price"))
    names = [c.rsplit(" AS ", 1)[1] for c in bq_etl.projection(bq_etl.RAW_SCHEMA.fields, standard)]
    assert "`resource`" not in names and "`price`" not in names and "`cost`" in names


def test_tags_prefer_resource_tags_then_labels_then_project_labels() -> None:
    row = {
        "tags": [{"key": "env", "value": "tag"}],
        "labels": [{"key": "env", "value": "label"}, {"key": "app", "value": "web"}],
        "project": {"labels": [{"key": "app", "value": "project"}, {"key": "team", "value": None}]},
    }
    assert json.loads(bq_etl.tags(row)) == {"env": "tag", "app": "web", "team": ""}
    assert bq_etl.tags({"project": None}) == "{}"


def test_customer_side_errors_get_the_processor_reasons() -> None:
    with pytest.raises(TerminalError) as caught, _mapped("table t"):
        raise gexc.Forbidden("Access Denied: Table customer-billing:ds.t: User does not have permission")
    assert caught.value.reason == "WAREHOUSE_PERMISSION_DENIED"
    mapped = bq_etl._source_error(caught.value)
    assert mapped.reason == "PERMISSION_DENIED" and "customer-billing" not in mapped.message
    assert "Access Denied" in mapped.detail
    assert "dataEditor" not in mapped.message  # a read-only statement: the export's grants only
    copying = bq_etl._source_error(caught.value, writes=True)  # CREATE TABLE … AS SELECT in our dataset
    assert copying.reason == "PERMISSION_DENIED"
    assert "roles/bigquery.dataEditor on the org's dataset" in copying.message
    assert "copy_via: client" in copying.message and "customer-billing" not in copying.message
    with pytest.raises(TerminalError) as caught, _mapped("table t"):
        raise auth_exceptions.RefreshError("invalid_grant: Invalid JWT Signature.")
    assert caught.value.reason == "CREDENTIAL_REJECTED"


def test_config_is_validated_at_load() -> None:
    from processors.base import parse_config
    from server.errors import InvalidInputError

    with pytest.raises(InvalidInputError) as caught:
        parse_config(bq_etl.EtlConfig, {"partition_expression": "DATE(usage_start_time); DROP", "x": 1})
    fields = {v.field for v in caught.value.violations}
    assert fields == {"config.partition_expression", "config.x"}
    with pytest.raises(InvalidInputError):
        parse_config(bq_etl.EtlConfig, {"source_table": "proj.ds.t`; DROP TABLE x"})
    assert parse_config(bq_etl.EtlConfig, {"source_table": "customer-billing.ds.gcp_billing_export_v1_X"})


def test_a_sweep_widens_only_the_trailing_window() -> None:
    from datetime import date, timedelta
    from types import SimpleNamespace

    config = bq_etl.EtlConfig(trailing_days=40, history_days=400, sweep_weekday=6)
    monday, sunday = date(2026, 11, 30), date(2026, 11, 29)

    def span(today: date, **parameters: str) -> bq_etl.Window:
        context = SimpleNamespace(parameters=parameters, start_date=None, end_date=None)
        return bq_etl.window(context, config, today)  # type: ignore[arg-type]

    assert span(monday).lo == monday - timedelta(days=40)
    assert span(sunday).lo == sunday - timedelta(days=400)  # the configured weekday
    assert span(monday, sweep="true").lo == monday - timedelta(days=400)
    off = bq_etl.EtlConfig(sweep_weekday=None)
    context = SimpleNamespace(parameters={}, start_date=None, end_date=None)
    assert bq_etl.window(context, off, sunday).lo == sunday - timedelta(days=40)  # type: ignore[arg-type]
    dated = SimpleNamespace(parameters={"sweep": "true"}, start_date=monday, end_date=monday)
    assert bq_etl.window(dated, config, monday).lo == monday  # type: ignore[arg-type]


def test_the_copy_keeps_nine_decimals_on_the_emulator_too() -> None:
    """bqemulator re-renders statements with DATE_ADD, ARRAY_AGG(... LIMIT) or WITH OFFSET through sqlglot,
    which drops the scale of NUMERIC(38, 9) casts: the copy statement uses none of them."""
    part = bq_etl.partitioning(info("DAY", "export_time"), "auto")
    columns = bq_etl.projection(bq_etl.RAW_SCHEMA.fields, SOURCE_FIELDS)
    copy = bq_etl.copy_sql("`p.d.t`", part, columns, SOURCE_FIELDS).upper()
    for trap in ("DATE_ADD", "DATE_SUB", " LIMIT ", "WITH OFFSET", "IGNORE NULLS"):
        assert trap not in copy
    assert copy.count("AS NUMERIC(38, 9)") == 6
    names = bq_etl.copy_columns(columns)
    assert names[-7:] == ["x_source_partition", "x_invoice_month", "x_tags", *bq_etl.LINEAGE]
    assert len(names) == len(set(names)) == len(columns) + 7
    parse(copy)
