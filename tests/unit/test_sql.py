"""`server.warehouse.sql`: identifier checks, quoting and typed CALL literals."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from server.errors import InvalidInputError
from server.warehouse import sql


@pytest.mark.parametrize("name", ["a", "_", "acme_local", "Org_1", "_x9", "A" * 1024])
def test_check_name_accepts_identifiers(name: str) -> None:
    assert sql.check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "1abc", "bad-name", "a.b", "a b", "a`b", "x;DROP", "a'", "é", "A" * 1025, "ab\n"]
)
def test_check_name_rejects_everything_else(name: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        sql.check_name(name, "dataset")
    assert caught.value.reason == "INVALID_IDENTIFIER"
    assert [v.field for v in caught.value.violations] == ["dataset"]


def test_check_name_default_field_is_name() -> None:
    with pytest.raises(InvalidInputError) as caught:
        sql.check_name("no-dashes")
    assert [v.field for v in caught.value.violations] == ["name"]


@pytest.mark.parametrize("project", ["test-project", "my-proj-123", "abcdef"])
def test_check_project_accepts(project: str) -> None:
    assert sql.check_project(project) == project


@pytest.mark.parametrize(
    "project", ["", "abc", "Test-project", "1project", "project-", "a" * 31, "proj_ect", "proj`ect"]
)
def test_check_project_rejects(project: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        sql.check_project(project)
    assert [v.field for v in caught.value.violations] == ["project"]


def test_table_and_routine_are_backtick_quoted() -> None:
    assert (
        sql.table("test-project", "acme_local", "saas_subscription_plans")
        == "`test-project.acme_local.saas_subscription_plans`"
    )
    assert sql.routine("test-project", "organizations", "sp_x") == "`test-project.organizations.sp_x`"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("test-project", "bad-ds", "t"), "dataset"),
        (("test-project", "ds", "t`; DROP TABLE x; --"), "table"),
        (("BAD", "ds", "t"), "project"),
    ],
)
def test_table_rejects_each_bad_part(args: tuple[str, str, str], field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        sql.table(*args)
    assert [v.field for v in caught.value.violations] == [field]


def test_routine_names_the_procedure_field() -> None:
    with pytest.raises(InvalidInputError) as caught:
        sql.routine("test-project", "organizations", "sp-x")
    assert [v.field for v in caught.value.violations] == ["procedure"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "NULL"),
        (True, "TRUE"),
        (False, "FALSE"),
        (0, "CAST(0 AS INT64)"),
        (42, "CAST(42 AS INT64)"),
        (-7, "CAST(-7 AS INT64)"),
        (2**63 - 1, "CAST(9223372036854775807 AS INT64)"),
        (Decimal("1.5"), "CAST('1.5' AS NUMERIC(38, 9))"),
        (Decimal("-0.000000001"), "CAST('-0.000000001' AS NUMERIC(38, 9))"),
        (Decimal("123456789.123456789"), "CAST('123456789.123456789' AS NUMERIC(38, 9))"),
        (Decimal("1E+3"), "CAST('1000' AS NUMERIC(38, 9))"),  # never scientific notation
        (Decimal("1E-9"), "CAST('0.000000001' AS NUMERIC(38, 9))"),
        (date(2025, 1, 31), "DATE '2025-01-31'"),
        (datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC), "TIMESTAMP '2025-01-02T03:04:05+00:00'"),
        (
            datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=timezone(timedelta(hours=2))),
            "TIMESTAMP '2025-01-02T01:04:05.123456+00:00'",
        ),  # normalised to UTC
        ("acme_local", "'acme_local'"),
        ("", "''"),
        ("Plan — €9 / month", "'Plan — €9 / month'"),
        ([1, 2], "[CAST(1 AS INT64), CAST(2 AS INT64)]"),
        (("a", "b"), "['a', 'b']"),
        ([], "[]"),
    ],
)
def test_literal(value: object, expected: str) -> None:
    assert sql.literal(value) == expected


def test_bool_is_not_treated_as_int() -> None:
    assert sql.literal([True, 1]) == "[TRUE, CAST(1 AS INT64)]"


def test_datetime_is_not_treated_as_date() -> None:
    assert sql.literal(datetime(2025, 1, 1, tzinfo=UTC)).startswith("TIMESTAMP ")


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(InvalidInputError) as caught:
        sql.literal(datetime(2025, 1, 1, 12, 0))
    assert [v.field for v in caught.value.violations] == ["value"]
    assert "timezone" in caught.value.message


@pytest.mark.parametrize("value", [Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity")])
def test_non_finite_decimal_is_rejected(value: Decimal) -> None:
    with pytest.raises(InvalidInputError) as caught:
        sql.literal(value)
    assert [v.field for v in caught.value.violations] == ["value"]


@pytest.mark.parametrize(
    "value", ["it's", 'say "hi"', "back\\slash", "line\nbreak", "tab\there", "cr\r", "nul\x00", "esc\x1b"]
)
def test_unsafe_strings_are_rejected(value: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        sql.literal(value)
    assert caught.value.reason == "UNSAFE_ARGUMENT"
    assert [v.field for v in caught.value.violations] == ["value"]


def test_unsafe_string_inside_a_list_is_rejected() -> None:
    with pytest.raises(InvalidInputError) as caught:
        sql.literal(["ok", "not'ok"])
    assert caught.value.reason == "UNSAFE_ARGUMENT"


@pytest.mark.parametrize("value", [1.5, b"bytes", {"a": 1}, object()])
def test_unsupported_types_are_rejected(value: object) -> None:
    with pytest.raises(InvalidInputError) as caught:
        sql.literal(value)
    assert [v.field for v in caught.value.violations] == ["value"]
    assert type(value).__name__ in caught.value.message
