"""`genai.focus`: an org's OpenAI or Anthropic raw costs into FOCUS 1.2 rows, priced and reconciled.

```yaml
- step_id: focus
  ps_type: genai.focus
  config:
    provider: openai                 # or anthropic
    start_date: "{{ start_date }}"
    end_date: "{{ end_date }}"
    trailing_days: 3
    tolerance_usd: "0.01"            # a day is flagged when |billed - priced usage| > max(usd, pct x billed)
    tolerance_pct: "1"
```

Reads the window's raw cost rows (the invoice basis) and usage rows, the price catalog
(`genai_price_catalog`, the pinned genai-prices version) and the org's overrides, and writes:

- `cost_data_focus_1_2`, replacing only `x_SourceSystem = <provider>` rows of the window (one MERGE):
  one row per day x sub-account (project / workspace; the Default workspace is `default`) x SKU price
  (model x token class x tier x context band). BilledCost = EffectiveCost = the cost API amount;
  ListUnitPrice from the catalog for that SkuPriceId, ListCost = ListUnitPrice x PricingQuantity
  (PricingUnit `1000000 Tokens`, or `1000 Requests` for web search); ContractedUnitPrice applies the org's
  discount override. A line the catalog cannot price (unknown model, non-token unit) keeps
  ListCost = ContractedCost = BilledCost with no unit price. Anthropic Priority Tier usage, which the
  cost report never bills, becomes rows with BilledCost 0, its list value, PricingCategory `Committed`
  and `x_CostSource = usage_estimate`.
- `genai_cost_reconciliation`, one row per day: billed (cost API), the FOCUS rows' BilledCost (always
  equal: checked before anything is written), priced usage (usage x list rates) and the flag.

The pricing is `processors.genai.pricing`, in Decimal: the same code the unit tests check by hand and
by property. (Done in Python rather than a stored procedure: the emulator evaluates NUMERIC division in
floating point, and the rules must live in one tested place.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from pydantic import Field

from processors.base import Paging, StepContext, parse_config
from processors.genai import ingest
from processors.genai.catalog import package_version
from processors.genai.pricing import (
    ANTHROPIC_TOKEN_TYPES,
    METERS,
    LineItem,
    Override,
    PriceBook,
    PricePoint,
    UsageInvariantError,
    anthropic_price_point,
    cost,
    list_cost,
    nano,
    openai_price_point,
    openai_token_parts,
    parse_line_item,
    pricing_quantity,
)
from server.errors import NotFoundError, TerminalError

FOCUS = ingest.schema("cost_data_focus_1_2")
RECON = ingest.schema("genai_cost_reconciliation")
DISPLAY = {
    "openai": ("OpenAI", "OpenAI API", "Project"),
    "anthropic": ("Anthropic", "Claude API", "Workspace"),
}
DEFAULT_SUB_ACCOUNT = "default"
OPENAI_TOKEN_FIELDS = (
    "input_tokens",
    "input_cached_tokens",
    "input_cache_write_tokens",
    "input_uncached_tokens",
    "input_text_tokens",
    "input_audio_tokens",
    "input_image_tokens",
    "input_cached_text_tokens",
    "input_cached_audio_tokens",
    "input_cached_image_tokens",
    "output_tokens",
    "output_text_tokens",
    "output_audio_tokens",
    "output_image_tokens",
)
UNITS = {
    "tokens": ("Tokens", 1),
    "1000_tokens": ("Tokens", 1_000),
    "images": ("Images", 1),
    "characters": ("Characters", 1),
    "duration_seconds": ("Seconds", 1),
    "duration_minutes": ("Minutes", 1),
    "duration_hours": ("Hours", 1),
    "gibibyte_hours": ("GiB-Hours", 1),
}


class Config(ingest.WindowConfig):
    """The step's config."""

    provider: Literal["openai", "anthropic"]
    tolerance_usd: Decimal = Field(Decimal("0.01"), ge=0)
    tolerance_pct: Decimal = Field(Decimal("1"), ge=0, le=100)


@dataclass
class Line:
    """One FOCUS row being built (money in Decimal)."""

    day: date
    sub_account: str | None
    sku_id: str
    point: str
    token_class: str | None
    description: str
    billed: Decimal
    meter: str
    tier: str | None = None
    context_window: str | None = None
    consumed: Decimal | None = None
    consumed_unit: str | None = None
    quantity: Decimal | None = None
    pricing_unit: str | None = None
    list_price: Decimal | None = None
    contracted_price: Decimal | None = None
    estimate: bool = False


@dataclass
class Day:
    """One day's reconciliation figures."""

    billed: Decimal = Decimal(0)
    priced: Decimal = Decimal(0)
    estimated: Decimal = Decimal(0)
    unpriced: int = 0
    lines: list[Line] = field(default_factory=list)


def _priced(line: Line, units: int, unit_name: str, rate: Any) -> None:
    """Set quantities and unit prices of a line from its units and the catalog rate (None: unpriced)."""
    line.consumed, line.consumed_unit = Decimal(units), unit_name
    if rate is None:
        return
    line.quantity = pricing_quantity(units, rate.per)
    line.pricing_unit = f"{rate.per} {unit_name}"
    line.list_price, line.contracted_price = rate.list_price, rate.contracted_price


# --- OpenAI ------------------------------------------------------------------------------------------------


def openai_lines(
    book: PriceBook, costs: Iterable[dict[str, Any]], usage: Iterable[dict[str, Any]]
) -> dict[date, Day]:
    """FOCUS lines and day figures from OpenAI cost rows (per day, project, line item) and usage sums."""
    days: dict[date, Day] = defaultdict(Day)
    for row in costs:
        day, billed = row["cost_date"], Decimal(row["amount"] or 0)
        days[day].billed += billed
        item: LineItem | None = parse_line_item(row["line_item"])
        unit_name, scale = UNITS.get(str(row.get("quantity_unit") or ""), ("", 0))
        quantity = row.get("quantity")
        if item is not None:
            sku = f"openai:{item.model}:{item.token_class}"
            line = Line(
                day,
                row["project_id"],
                sku,
                item.point.key,
                item.token_class,
                row["line_item"],
                billed,
                METERS[item.token_class],
                item.point.tier,
                "long_context" if item.point.long_context else "base",
            )
            if quantity is not None and unit_name == "Tokens":
                units = int(Decimal(quantity) * scale)
                _priced(
                    line, units, "Tokens", book.rate("openai", item.model, item.token_class, item.point, day)
                )
        else:
            label = "".join(c if c.isalnum() else "_" for c in str(row["line_item"] or "other").lower())
            line = Line(
                day,
                row["project_id"],
                f"openai:other:{label}",
                "standard",
                None,
                str(row["line_item"] or "other"),
                billed,
                str(row["line_item"] or "Other"),
            )
            if quantity is not None and unit_name:
                line.consumed, line.consumed_unit = Decimal(quantity) * scale, unit_name
        days[day].lines.append(line)
    for row in usage:
        day = row["usage_date"]
        point = openai_price_point(row["service_tier"], row["batch"])
        try:
            parts = (
                openai_token_parts(row)
                if row["endpoint"] == "completions"
                else {"input": row["input_tokens"] or 0}
            )
        except UsageInvariantError as exc:
            raise TerminalError(f"openai usage of {day}: {exc}", reason="USAGE_INVARIANT") from exc
        if row["model"] is None:
            days[day].unpriced += 1
            continue
        total, complete = list_cost(book, "openai", row["model"], parts, point, day)
        days[day].priced += total
        days[day].unpriced += 0 if complete else 1
    return days


# --- Anthropic ---------------------------------------------------------------------------------------------

TOKEN_COLUMNS = {
    "input": "uncached_input_tokens",
    "cache_write_5m": "cache_creation_5m_input_tokens",
    "cache_write_1h": "cache_creation_1h_input_tokens",
    "cache_read": "cache_read_input_tokens",
    "output": "output_tokens",
    "web_search": "web_search_requests",
}


def anthropic_lines(
    book: PriceBook, costs: Iterable[dict[str, Any]], usage: Iterable[dict[str, Any]]
) -> dict[date, Day]:
    """FOCUS lines and day figures from Anthropic cost rows and usage sums (joined on their dimensions)."""
    days: dict[date, Day] = defaultdict(Day)
    by_key: dict[tuple[Any, ...], dict[str, int]] = {}
    searches: dict[tuple[date, Any], tuple[int, str | None]] = {}
    for row in usage:
        day, ws, model, tier, window = (
            row["usage_date"],
            row["workspace_id"],
            row["model"],
            row["service_tier"],
            row["context_window"],
        )
        parts = {cls: int(row[col] or 0) for cls, col in TOKEN_COLUMNS.items()}
        point = anthropic_price_point(tier, window)
        by_key[(day, ws, model, tier, window)] = parts
        count, first_model = searches.get((day, ws), (0, None))
        searches[(day, ws)] = (count + parts["web_search"], first_model or model)
        if model is None:
            days[day].unpriced += 1
            continue
        total, complete = list_cost(book, "anthropic", model, parts, point, day)
        if point.tier == "priority":
            days[day].estimated += total
            for cls, units in parts.items():
                if not units:
                    continue
                line = Line(
                    day,
                    ws,
                    f"anthropic:{model}:{cls}",
                    point.key,
                    cls,
                    f"Priority Tier usage (commitment-covered): {model} {METERS[cls]}",
                    Decimal(0),
                    METERS[cls],
                    point.tier,
                    window,
                    estimate=True,
                )
                per_unit = "Requests" if cls == "web_search" else "Tokens"
                _priced(line, units, per_unit, book.rate("anthropic", model, cls, point, day))
                days[day].lines.append(line)
        else:
            days[day].priced += total
        days[day].unpriced += 0 if complete else 1
    for row in costs:
        day, ws, billed = row["cost_date"], row["workspace_id"], Decimal(row["amount"] or 0)
        days[day].billed += billed
        token_class = ANTHROPIC_TOKEN_TYPES.get(str(row.get("token_type")))
        cost_model: str | None = row["model"]
        tier, window = row["service_tier"], row["context_window"]
        if row.get("cost_type") == "web_search":
            token_class = "web_search"
        if token_class is None:
            label = "".join(c if c.isalnum() else "_" for c in str(row.get("cost_type") or "other").lower())
            days[day].lines.append(
                Line(
                    day,
                    ws,
                    f"anthropic:other:{label}",
                    "standard",
                    None,
                    str(row["description"] or label),
                    billed,
                    str(row.get("cost_type") or "Other"),
                )
            )
            continue
        if token_class == "web_search":
            units, search_model = searches.get((day, ws), (0, None))
            cost_model, point = search_model, PricePoint()
        else:
            units = by_key.get((day, ws, cost_model, tier, window), {}).get(token_class, 0)
            point = anthropic_price_point(tier, window)
        sku = (
            "anthropic:web_search" if token_class == "web_search" else f"anthropic:{cost_model}:{token_class}"
        )
        line = Line(
            day,
            ws,
            sku,
            point.key,
            token_class,
            str(row["description"] or token_class),
            billed,
            METERS[token_class],
            point.tier,
            window,
        )
        if units and cost_model:
            per_unit = "Requests" if token_class == "web_search" else "Tokens"
            _priced(line, units, per_unit, book.rate("anthropic", cost_model, token_class, point, day))
        days[day].lines.append(line)
    return days


# --- rows --------------------------------------------------------------------------------------------------


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def focus_row(
    line: Line, provider: str, account: str, names: dict[str, str], version: str, lineage: dict[str, Any]
) -> dict[str, Any]:
    """Every FOCUS 1.2 column of one line."""
    display, service, sub_type = DISPLAY[provider]
    sub_id = line.sub_account or DEFAULT_SUB_ACCOUNT
    if line.list_price is not None and line.quantity is not None:
        list_cost_value = cost(line.list_price, line.quantity)
        contracted_price = line.list_price if line.contracted_price is None else line.contracted_price
        contracted = cost(contracted_price, line.quantity)
    else:
        list_cost_value = contracted = line.billed
    month = line.day.replace(day=1)
    details = {
        "x_ServiceTier": line.tier,
        "x_TokenClass": line.token_class,
        "x_ContextWindow": line.context_window,
    }
    return {
        "BilledCost": line.billed,
        "EffectiveCost": line.billed,
        "ListCost": list_cost_value,
        "ListUnitPrice": line.list_price,
        "ContractedCost": contracted,
        "ContractedUnitPrice": line.contracted_price,
        "PricingQuantity": line.quantity,
        "PricingUnit": line.pricing_unit,
        "ConsumedQuantity": line.consumed,
        "ConsumedUnit": line.consumed_unit,
        "BillingAccountId": account,
        "BillingAccountName": f"{display} organization",
        "BillingAccountType": "Organization",
        "BillingCurrency": "USD",
        "BillingPeriodStart": _midnight(month),
        "BillingPeriodEnd": _midnight((month + timedelta(days=32)).replace(day=1)),
        "ChargeCategory": "Usage",
        "ChargeClass": None,
        "ChargeDescription": line.description,
        "ChargeFrequency": "Usage-Based",
        "ChargePeriodStart": _midnight(line.day),
        "ChargePeriodEnd": _midnight(line.day + timedelta(days=1)),
        "PricingCategory": "Committed" if line.estimate else "Standard",
        "PricingCurrency": "USD",
        "PricingCurrencyListUnitPrice": line.list_price,
        "PricingCurrencyContractedUnitPrice": line.contracted_price,
        "PricingCurrencyEffectiveCost": line.billed,
        "ProviderName": display,
        "PublisherName": display,
        "InvoiceIssuerName": display,
        "ServiceCategory": "AI and Machine Learning",
        "ServiceSubcategory": "Generative AI",
        "ServiceName": service,
        "SubAccountId": sub_id,
        "SubAccountName": names.get(sub_id) or ("Default" if sub_id == DEFAULT_SUB_ACCOUNT else sub_id),
        "SubAccountType": sub_type,
        "SkuId": line.sku_id,
        "SkuPriceId": f"{line.sku_id}:{line.point}",
        "SkuMeter": line.meter,
        "SkuPriceDetails": {k: v for k, v in details.items() if v is not None},
        "Tags": {},
        "x_SourceSystem": provider,
        "x_ChargeDate": line.day,
        "x_CostSource": "usage_estimate" if line.estimate else "cost_api",
        "x_PriceTableVersion": version,
        "x_ServiceTier": line.tier,
        "x_TokenClass": line.token_class,
        "x_ContextWindow": line.context_window,
        "x_PipelineId": lineage["x_pipeline_id"],
        "x_RunId": lineage["x_run_id"],
        "x_IngestedAt": lineage["x_ingested_at"],
    }


def merge_lines(lines: Iterable[Line]) -> list[Line]:
    """One line per day x sub-account x SKU price (cost rows split by API key or description add up)."""
    merged: dict[tuple[Any, ...], Line] = {}
    for line in lines:
        key = (line.day, line.sub_account, line.sku_id, line.point, line.estimate)
        found = merged.get(key)
        if found is None:
            merged[key] = line
            continue
        found.billed += line.billed
        for name in ("consumed", "quantity"):
            a, b = getattr(found, name), getattr(line, name)
            setattr(found, name, None if a is None or b is None else a + b)
    return list(merged.values())


# --- the processor -----------------------------------------------------------------------------------------


class GenAIFocus:
    """Raw GenAI costs of a window into FOCUS rows and reconciliation rows."""

    Config = Config

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        """Price, convert, check the invariant, write; return rows, totals and flagged days."""
        config = parse_config(Config, step_config)
        provider = config.provider
        start, end = ingest.window(config)
        wh, dataset = context.warehouse, context.run.dataset
        cred = await ingest.credential(context, provider, config.credential)
        book = await self._book(context)
        window = {"a": start, "b": end}
        if provider == "openai":
            costs = await wh.query(
                "SELECT cost_date, project_id, line_item, SUM(amount) AS amount, SUM(quantity) AS quantity, "
                f"MAX(quantity_unit) AS quantity_unit FROM {wh.table_ref(dataset, 'openai_costs_daily_raw')} "
                "WHERE cost_date BETWEEN @a AND @b AND NOT is_empty_bucket GROUP BY 1, 2, 3",
                window,
            )
            metrics = ", ".join(f"SUM({c}) AS {c}" for c in OPENAI_TOKEN_FIELDS)
            usage = await wh.query(
                f"SELECT usage_date, endpoint, model, batch, service_tier, {metrics} "
                f"FROM {wh.table_ref(dataset, 'openai_usage_daily_raw')} WHERE usage_date BETWEEN @a AND @b "
                "AND NOT is_empty_bucket AND endpoint IN ('completions', 'embeddings', 'moderations') "
                "GROUP BY 1, 2, 3, 4, 5",
                window,
            )
            days = openai_lines(book, costs, usage)
            names = await self._project_names(context, cred)
        else:
            raw = wh.table_ref(dataset, "anthropic_costs_daily_raw")
            costs = await wh.query(
                "SELECT cost_date, workspace_id, description, cost_type, model, service_tier, "
                f"context_window, token_type, SUM(amount) AS amount FROM {raw} "
                "WHERE cost_date BETWEEN @a AND @b AND NOT is_empty_bucket GROUP BY 1, 2, 3, 4, 5, 6, 7, 8",
                window,
            )
            sums = ", ".join(f"SUM({c}) AS {c}" for c in TOKEN_COLUMNS.values())
            usage = await wh.query(
                f"SELECT usage_date, workspace_id, model, service_tier, context_window, {sums} "
                f"FROM {wh.table_ref(dataset, 'anthropic_usage_daily_raw')} "
                "WHERE usage_date BETWEEN @a AND @b AND NOT is_empty_bucket GROUP BY 1, 2, 3, 4, 5",
                window,
            )
            days = anthropic_lines(book, costs, usage)
            names = {}
        account = str(cred.value("organization_id") or cred.id)
        lineage = ingest.lineage(context, cred)
        recon: list[dict[str, Any]] = []
        flagged: list[str] = []
        written = 0
        async with ingest.Spool(wh, dataset, FOCUS) as spool:
            for day in sorted(days):
                figures = days[day]
                lines = merge_lines(figures.lines)
                rows = [focus_row(line, provider, account, names, book.version, lineage) for line in lines]
                focus_billed = sum((r["BilledCost"] for r in rows), Decimal(0))
                if focus_billed != figures.billed:  # the invariant; by construction, checked anyway
                    raise TerminalError(
                        f"{provider} {day}: FOCUS BilledCost {focus_billed} != cost API {figures.billed}",
                        reason="FOCUS_INVARIANT",
                    )
                await spool.write(rows)
                tolerance = max(config.tolerance_usd, figures.billed * config.tolerance_pct / 100)
                difference = figures.billed - figures.priced
                is_flagged = abs(difference) > tolerance
                if is_flagged:
                    flagged.append(day.isoformat())
                recon.append(
                    {
                        "recon_date": day,
                        "provider": provider,
                        "billed_cost": figures.billed,
                        "focus_billed_cost": focus_billed,
                        "priced_usage": nano(figures.priced),
                        "difference": nano(difference),
                        "tolerance": nano(tolerance),
                        "flagged": is_flagged,
                        "estimated_cost": nano(figures.estimated),
                        "unpriced_usage_rows": figures.unpriced,
                        "price_table_version": book.version,
                        "x_pipeline_id": lineage["x_pipeline_id"],
                        "x_run_id": lineage["x_run_id"],
                        "x_ingested_at": lineage["x_ingested_at"],
                    }
                )
            written = await spool.swap(
                column="x_ChargeDate", start=start, end=end, equals={"x_SourceSystem": provider}
            )
        async with ingest.Spool(wh, dataset, RECON) as spool:
            await spool.write(recon)
            await spool.swap(column="recon_date", start=start, end=end, equals={"provider": provider})
        billed = sum((d.billed for d in days.values()), Decimal(0))
        if flagged:
            context.log.warning(
                "%s reconciliation: billed vs priced usage differs beyond tolerance on %s",
                provider,
                ", ".join(flagged),
            )
        return {
            "status": "SUCCESS",
            "rows_written": written,
            "billed_cost": format(billed, "f"),
            "priced_usage": format(sum((d.priced for d in days.values()), Decimal(0)), "f"),
            "flagged_days": flagged,
            "start_date": start.isoformat(),
            "end_date": end.isoformat(),
        }

    @staticmethod
    async def _book(context: StepContext) -> PriceBook:
        wh = context.warehouse
        rows = await wh.query(
            f"SELECT * FROM {wh.table_ref(context.meta_dataset, 'genai_price_catalog')} "
            "WHERE package_version = @v ORDER BY row_order",
            {"v": package_version()},
        )
        if not rows:
            raise TerminalError(
                f"the price catalog has no rows of genai-prices {package_version()} "
                "(run `pipeline-service prices snapshot`)",
                reason="PRICE_CATALOG_MISSING",
            )
        try:
            found = await wh.query(
                f"SELECT * FROM {wh.table_ref(context.run.dataset, 'genai_price_overrides')}"
            )
        except NotFoundError:
            found = []
        overrides = [
            Override(
                r["provider"],
                r["model"],
                r["token_class"],
                r["tier"],
                r["rate"],
                r["discount_pct"],
                r["effective_from"],
                r["effective_to"],
            )
            for r in found
        ]
        return PriceBook(rows, overrides)

    @staticmethod
    async def _project_names(context: StepContext, cred: Any) -> dict[str, str]:
        """OpenAI project names (archived ones included: old usage references them)."""
        names: dict[str, str] = {}
        paging = Paging("cursor", next_field="last_id", param="after", has_more_field="has_more")
        async for page in context.http.paginate(
            "openai",
            "/v1/organization/projects",
            paging,
            params={"limit": 100, "include_archived": "true"},
            credential=cred,
            exact=False,
        ):
            for project in page.get("data") or []:
                if isinstance(project, dict) and project.get("id"):
                    names[str(project["id"])] = str(project.get("name") or project["id"])
        return names


def get_engine() -> GenAIFocus:
    """The processor object the engine calls."""
    return GenAIFocus()
