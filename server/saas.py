"""SaaS subscription plans: validated import from CSV or JSON lines, and the demo org's plan set.

In production another service owns plan CRUD; this is how local users and tests load plans. An import
is all or nothing: every row is validated first, and a bad row is reported with its line and column
before anything is written. Plans whose `subscription_id` already exists are replaced.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.errors import FieldViolation, InvalidInputError
from server.warehouse.bigquery import BigQueryWarehouse

PLANS_TABLE = "saas_subscription_plans"
Money = Decimal


class SaasPlan(BaseModel):
    """One row of `saas_subscription_plans`."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    subscription_id: str = Field(min_length=1, max_length=128)
    provider: str = Field(min_length=1)
    plan_name: str = Field(min_length=1)
    category: str | None = None
    status: Literal["active", "cancelled", "expired", "pending"]
    start_date: date
    end_date: date | None = None
    billing_cycle: Literal["weekly", "monthly", "quarterly", "semi_annual", "annual"]
    pricing_model: Literal["per_seat", "flat_fee"]
    unit_price: Money = Field(ge=0, max_digits=38, decimal_places=9)
    seats: int | None = None
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    discount_type: Literal["percent", "fixed"] | None = None
    discount_value: Money | None = Field(None, ge=0, max_digits=38, decimal_places=9)
    billing_anchor_day: int | None = Field(None, ge=1, le=31)
    contract_id: str | None = None
    tags: dict[str, str] | None = None

    @field_validator("status", "billing_cycle", "pricing_model", "discount_type", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("currency", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> SaasPlan:
        if self.end_date is not None and self.end_date < self.start_date:
            raise ValueError("end_date is before start_date")
        if (self.discount_type is None) != (self.discount_value is None):
            raise ValueError("discount_type and discount_value go together")
        if self.discount_type == "percent" and self.discount_value is not None and self.discount_value > 100:
            raise ValueError("a percent discount is at most 100")
        return self

    def row(self, loaded_at: datetime) -> dict[str, Any]:
        """The table row (JSON-ready for a load job)."""
        data = self.model_dump(mode="json")  # tags stay an object: the JSON column stores it as JSON
        data["x_loaded_at"] = loaded_at.isoformat()
        return data


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        records = []
        for row in reader:
            cleaned: dict[str, Any] = {k: (v if v != "" else None) for k, v in row.items() if k is not None}
            if cleaned.get("tags"):
                cleaned["tags"] = _json(reader.line_num, "tags", cleaned["tags"])
            records.append((reader.line_num, cleaned))
        return records
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            data = _json(number, "", line)
            if not isinstance(data, dict):
                raise InvalidInputError(
                    f"line {number}: not a JSON object", [FieldViolation(f"line {number}", "not an object")]
                )
            records.append((number, data))
    return records


def _json(line: int, column: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {line}" + (f", column {column}" if column else "")
        raise InvalidInputError(
            f"{where}: invalid JSON ({exc.msg})",
            [FieldViolation(where, "invalid JSON")],
            reason="INVALID_PLAN",
        ) from exc


def parse_plans(path: Path) -> list[SaasPlan]:
    """Validate every row of a CSV or JSON-lines file; raise naming each bad line and column."""
    if path.suffix.lower() not in (".csv", ".json", ".jsonl", ".ndjson"):
        raise InvalidInputError(
            "plans file must be .csv or .json/.jsonl (one object per line)",
            [FieldViolation("file", path.suffix)],
            reason="INVALID_PLAN",
        )
    plans: list[SaasPlan] = []
    violations: list[FieldViolation] = []
    seen: dict[str, int] = {}
    for line, record in _records(path):
        try:
            plan = SaasPlan.model_validate(record)
        except ValidationError as exc:
            for error in exc.errors():
                column = ".".join(str(p) for p in error["loc"]) or "row"
                violations.append(FieldViolation(f"line {line}, column {column}", error["msg"]))
            continue
        if plan.subscription_id in seen:
            violations.append(
                FieldViolation(
                    f"line {line}, column subscription_id", f"duplicate of line {seen[plan.subscription_id]}"
                )
            )
        seen[plan.subscription_id] = line
        plans.append(plan)
    if violations:
        first = violations[0]
        raise InvalidInputError(
            f"{len(violations)} problem(s), nothing imported; first: {first.field}: {first.description}",
            violations,
            reason="INVALID_PLAN",
        )
    return plans


async def import_plans(warehouse: BigQueryWarehouse, dataset: str, plans: list[SaasPlan]) -> int:
    """Replace plans with the same ids and load the rest: one DELETE and one load job."""
    if not plans:
        return 0
    await warehouse.query(
        f"DELETE FROM {warehouse.table_ref(dataset, PLANS_TABLE)} WHERE subscription_id IN UNNEST(@ids)",
        {"ids": [p.subscription_id for p in plans]},
    )
    now = datetime.now(UTC)
    return await warehouse.load_rows(dataset, PLANS_TABLE, [p.row(now) for p in plans])


def demo_plans(today: date) -> list[SaasPlan]:
    """A realistic plan set: every cycle and pricing model, each discount kind, a cancelled plan and a
    mid-month start, dated relative to `today` so the current month always has costs."""
    month_start = today.replace(day=1)
    year_ago = date(today.year - 1, today.month, 1)

    def plan(
        sid: str,
        provider: str,
        name: str,
        category: str,
        cycle: str,
        model: str,
        price: str,
        start: date,
        **extra: Any,
    ) -> SaasPlan:
        return SaasPlan.model_validate(
            {
                "subscription_id": sid,
                "provider": provider,
                "plan_name": name,
                "category": category,
                "status": extra.pop("status", "active"),
                "start_date": start,
                "billing_cycle": cycle,
                "pricing_model": model,
                "unit_price": price,
                "currency": "USD",
                **extra,
            }
        )

    return [
        plan(
            "demo-slack",
            "slack",
            "Business+",
            "Business Applications",
            "monthly",
            "per_seat",
            "12.500000000",
            year_ago,
            seats=25,
            contract_id="C-SLACK-1",
        ),
        plan(
            "demo-github",
            "github",
            "Enterprise",
            "Developer Tools",
            "annual",
            "per_seat",
            "231.000000000",
            year_ago.replace(day=15),
            seats=12,
            discount_type="percent",
            discount_value="10",
        ),
        plan(
            "demo-figma",
            "figma",
            "Organization",
            "Developer Tools",
            "quarterly",
            "per_seat",
            "135.000000000",
            year_ago,
            seats=4,
            discount_type="fixed",
            discount_value="25.500000000",
        ),
        plan(
            "demo-notion",
            "notion",
            "Team",
            "Business Applications",
            "semi_annual",
            "flat_fee",
            "600.000000000",
            year_ago,
            billing_anchor_day=31,
        ),
        plan(
            "demo-linear",
            "linear",
            "Standard",
            "Developer Tools",
            "weekly",
            "flat_fee",
            "19.990000000",
            month_start - timedelta(days=40),
        ),
        plan(
            "demo-zoom",
            "zoom",
            "Pro",
            "Business Applications",
            "monthly",
            "flat_fee",
            "149.900000000",
            year_ago,
            status="cancelled",
            end_date=month_start + timedelta(days=9),
        ),
        plan(
            "demo-datadog",
            "datadog",
            "Pro",
            "Management and Governance",
            "monthly",
            "per_seat",
            "15.000000000",
            month_start + timedelta(days=min(14, (today - month_start).days)),
            seats=10,
        ),
        plan(
            "demo-openai-team",
            "openai",
            "ChatGPT Team",
            "AI and Machine Learning",
            "monthly",
            "per_seat",
            "30.000000000",
            year_ago,
            seats=0,
            tags={"team": "research"},
        ),
        plan(
            "demo-jira",
            "atlassian",
            "Jira Premium",
            "Developer Tools",
            "annual",
            "flat_fee",
            "9999.999999999",
            today + timedelta(days=30),
            status="pending",
        ),
    ]
