"""Identifier validation and quoting, and typed literals for `CALL` arguments.

Identifiers are checked against BigQuery's rules for dataset, table and routine names (letters, digits,
underscores) and then backtick-quoted, so no caller-provided text is ever spliced into SQL unchecked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from server.errors import FieldViolation, InvalidInputError


@dataclass(frozen=True, slots=True)
class Typed:
    """A query parameter value with an explicit BigQuery type (needed for NULLs and empty arrays)."""

    type: str
    value: Any


NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,1023}$")
_PROJECT = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
# Characters a STRING argument may hold: the emulator mangles quotes and backslashes in literals.
_SAFE_STRING = re.compile(r"^[^'\"\\\x00-\x1f]*$")


def check_name(name: str, field: str = "name") -> str:
    """Return `name` if it is a valid dataset/table/routine identifier, else raise InvalidInputError."""
    if not NAME.fullmatch(name):
        raise InvalidInputError(
            f"invalid identifier {name!r}",
            [FieldViolation(field, "must be letters, digits and underscores, not starting with a digit")],
            reason="INVALID_IDENTIFIER",
        )
    return name


def check_project(project: str) -> str:
    """Return `project` if it is a valid GCP project id."""
    if not _PROJECT.fullmatch(project):
        raise InvalidInputError(
            f"invalid project id {project!r}",
            [FieldViolation("project", "invalid")],
            reason="INVALID_IDENTIFIER",
        )
    return project


def table(project: str, dataset: str, name: str) -> str:
    """Backtick-quoted `project.dataset.table`."""
    return f"`{check_project(project)}.{check_name(dataset, 'dataset')}.{check_name(name, 'table')}`"


def routine(project: str, dataset: str, name: str) -> str:
    """Backtick-quoted `project.dataset.routine`."""
    return f"`{check_project(project)}.{check_name(dataset, 'dataset')}.{check_name(name, 'procedure')}`"


def literal(value: Any) -> str:
    """A typed SQL literal for a CALL argument, from a Python value whose type decides the SQL type."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidInputError("INT64 argument out of range", [FieldViolation("value", "outside INT64")])
        return f"CAST({value} AS INT64)"
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidInputError(
                "NUMERIC argument must be finite", [FieldViolation("value", "not finite")]
            )
        exponent = value.normalize().as_tuple().exponent
        if value and (value.adjusted() >= 29 or (isinstance(exponent, int) and exponent < -9)):
            raise InvalidInputError(
                "NUMERIC argument needs at most 29 integer digits and 9 decimals",
                [FieldViolation("value", "outside NUMERIC(38, 9)")],
            )
        return f"CAST('{value:f}' AS NUMERIC(38, 9))"
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidInputError("TIMESTAMP argument needs a timezone", [FieldViolation("value", "naive")])
        return f"TIMESTAMP '{value.astimezone(UTC).isoformat()}'"
    if isinstance(value, date):
        return f"DATE '{value.isoformat()}'"
    if isinstance(value, str):
        if not _SAFE_STRING.fullmatch(value):
            raise InvalidInputError(
                "STRING argument holds quotes, backslashes or control characters",
                [FieldViolation("value", "quotes, backslashes and control characters are not allowed")],
                reason="UNSAFE_ARGUMENT",
            )
        return f"'{value}'"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    raise InvalidInputError(
        f"unsupported argument type {type(value).__name__}", [FieldViolation("value", "unsupported type")]
    )
