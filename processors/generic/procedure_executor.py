"""`generic.procedure_executor`: CALL a stored procedure of the central dataset with typed arguments.

```yaml
- step_id: calculate
  ps_type: generic.procedure_executor
  timeout: 600
  config:
    procedure: sp_calculate_saas_subscription_costs
    arguments:
      - {name: p_dataset, type: STRING, value: "{{ dataset }}"}
      - {name: p_start_date, type: DATE, value: "{{ start_date }}"}
      - {name: p_end_date, type: DATE, value: "{{ end_date }}"}
      - {name: p_run_id, type: STRING, value: "{{ run_id }}"}
    job_timeout: 300
```

Argument types: STRING, DATE, TIMESTAMP, INT64, NUMERIC, BOOL, and ARRAY<T> of those. Values are
templates resolved before the step runs, then converted to the declared type (a bad value fails the step
with the argument named). Returns the procedure's result rows (JSON-safe: NUMERIC as exact strings),
`rows_written` (DML rows affected), the job id and bytes processed.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from processors.base import StepContext, Templated, parse_config
from server.errors import FieldViolation, InvalidInputError
from server.warehouse.rows import json_value

Scalar = Literal["STRING", "DATE", "TIMESTAMP", "INT64", "NUMERIC", "BOOL"]
ArgType = Literal[
    "STRING",
    "DATE",
    "TIMESTAMP",
    "INT64",
    "NUMERIC",
    "BOOL",
    "ARRAY<STRING>",
    "ARRAY<DATE>",
    "ARRAY<TIMESTAMP>",
    "ARRAY<INT64>",
    "ARRAY<NUMERIC>",
    "ARRAY<BOOL>",
]
MAX_RESULT_ROWS = 1000


class Argument(BaseModel):
    """One procedure argument, in the order of the procedure's signature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: ArgType
    value: str | int | bool | list[str | int | bool] | None


class Config(BaseModel):
    """The step's config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    procedure: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    arguments: list[Argument] = Field(default_factory=list)
    job_timeout: Annotated[float, Field(gt=0)] | Templated = 300.0


def _scalar(kind: Scalar, value: Any) -> Any:
    if value is None:
        return None
    text = str(value).strip()
    match kind:
        case "STRING":
            return str(value)
        case "DATE":
            return date.fromisoformat(text)
        case "TIMESTAMP":
            stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if stamp.tzinfo is None:
                raise ValueError("needs a timezone")
            return stamp
        case "INT64":
            return int(text)
        case "NUMERIC":
            number = Decimal(text)
            if not number.is_finite():
                raise InvalidOperation(text)
            return number
        case "BOOL":
            if text.lower() not in ("true", "false"):
                raise ValueError("must be true or false")
            return text.lower() == "true"


def typed(argument: Argument) -> Any:
    """The argument's value converted to its declared type."""
    try:
        if argument.type.startswith("ARRAY<"):
            items = argument.value if isinstance(argument.value, list) else []
            kind: Any = argument.type[6:-1]
            return [_scalar(kind, v) for v in items]
        return _scalar(argument.type, argument.value)  # type: ignore[arg-type]
    except (ValueError, InvalidOperation) as exc:
        raise InvalidInputError(
            f"argument {argument.name}: {argument.value!r} is not a valid {argument.type}",
            [FieldViolation(f"config.arguments.{argument.name}", f"not a valid {argument.type}")],
            reason="INVALID_PROCEDURE_ARGUMENT",
        ) from exc


class ProcedureExecutor:
    """Calls one stored procedure."""

    Config = Config

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        """CALL the procedure and return its rows and job statistics."""
        config = parse_config(Config, step_config)
        job_timeout = config.job_timeout if isinstance(config.job_timeout, float) else None
        args = [typed(a) for a in config.arguments]
        result = await context.warehouse.call_procedure(
            context.meta_dataset, config.procedure, args, job_timeout=job_timeout
        )
        context.log.info("procedure %s returned %d rows", config.procedure, len(result.rows))
        return {
            "status": "SUCCESS",
            "procedure": config.procedure,
            "rows": [json_value(r) for r in result.rows[:MAX_RESULT_ROWS]],
            "row_count": len(result.rows),
            "rows_written": result.num_dml_affected_rows,
            "job_id": result.job_id,
            "bytes_processed": result.bytes_processed,
        }


def get_engine() -> ProcedureExecutor:
    """The processor object the engine calls."""
    return ProcedureExecutor()
