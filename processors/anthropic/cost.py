"""`anthropic.cost`: the Anthropic cost report (the invoice basis), 1-day buckets, into its raw table.

```yaml
- step_id: cost
  ps_type: anthropic.cost
  config:
    start_date: "{{ start_date }}"
    end_date: "{{ end_date }}"
    trailing_days: 3
```

Grouped by workspace and description, which fills the structured model, service tier, context window
and token type of each row (the description text itself is never parsed). `amount` is a decimal string
in cents: kept as sent (`amount_cents`) and as USD (`amount` = cents / 100, exact). Priority Tier usage
never appears here. The window is replaced all or nothing.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlencode

from pydantic import Field

from processors.base import Paging, StepContext, parse_config
from processors.genai import ingest
from server.errors import TerminalError

PROVIDER = "anthropic"
TABLE = "anthropic_costs_daily_raw"
PAGING = Paging("cursor", next_field="next_page", param="page", has_more_field="has_more")
GROUP_BY = ("workspace_id", "description")
DETAIL = ("cost_type", "model", "service_tier", "context_window", "token_type", "inference_geo")
SCHEMA = ingest.schema(TABLE)
KNOWN = frozenset({*GROUP_BY, *DETAIL, "amount", "currency"})


class Config(ingest.WindowConfig):
    """The step's config."""

    bucket_limit: int = Field(31, ge=1, le=31, description="Buckets per page (31 for 1d).")


def cents(value: Any) -> Decimal:
    """The cost report's amount: a decimal string in cents (a JSON number is accepted too, exactly)."""
    try:
        amount = (
            Decimal(value) if isinstance(value, str | Decimal | int) and not isinstance(value, bool) else None
        )
    except InvalidOperation:
        amount = None
    if amount is None or not amount.is_finite():
        raise TerminalError("cost report: amount is not a decimal", reason="PROVIDER_BAD_RESPONSE")
    return amount


def rows_of_page(page: Any, lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """One raw row per bucket x result; one `is_empty_bucket` row per empty bucket."""
    out: list[dict[str, Any]] = []
    for bucket in ingest.buckets(page):
        start, end = ingest.utc_day(bucket.get("starting_at")), ingest.utc_day(bucket.get("ending_at"))
        base = {"cost_date": start.date(), "bucket_start": start, "bucket_end": end, **lineage}
        if not bucket["results"]:
            out.append({**base, "is_empty_bucket": True, "extra": {}})
        for result in bucket["results"]:
            if not isinstance(result, dict):
                raise TerminalError("cost report: a result is not an object", reason="PROVIDER_BAD_RESPONSE")
            amount = cents(result.get("amount"))
            out.append(
                {
                    **base,
                    "is_empty_bucket": False,
                    **{g: result.get(g) for g in (*GROUP_BY, *DETAIL)},
                    "amount_cents": amount,
                    "amount": amount / 100,
                    "currency": str(result.get("currency") or "USD").upper(),
                    "extra": ingest.extra(result, KNOWN),
                }
            )
    return out


class AnthropicCost:
    """Pulls the cost report and swaps the window's rows."""

    Config = Config

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        """Pull, spool, replace the window; return rows_written and the billed total."""
        config = parse_config(Config, step_config)
        start, end = ingest.window(config)
        cred = await ingest.credential(context, PROVIDER, config.credential)
        lineage = ingest.lineage(context, cred)
        params = {
            "starting_at": ingest.rfc3339(start),
            "ending_at": ingest.rfc3339(end + timedelta(days=1)),
            "bucket_width": "1d",
            "limit": config.bucket_limit,
        }
        path = "/v1/organizations/cost_report?" + urlencode([("group_by[]", g) for g in GROUP_BY])
        billed = Decimal(0)
        async with ingest.Spool(context.warehouse, context.run.dataset, SCHEMA) as spool:
            async for page in context.http.paginate(PROVIDER, path, PAGING, params=params, credential=cred):
                rows = await asyncio.to_thread(rows_of_page, page, lineage)
                billed += sum((r["amount"] for r in rows if "amount" in r), Decimal(0))
                await spool.write(rows)
            written = await spool.swap(column="cost_date", start=start, end=end)
        context.log.info("anthropic costs: %d rows, %s USD for %s..%s", written, billed, start, end)
        return {
            "status": "SUCCESS",
            "rows_written": written,
            "billed_cost": format(billed, "f"),
            "start_date": start.isoformat(),
            "end_date": end.isoformat(),
        }


def get_engine() -> AnthropicCost:
    """The processor object the engine calls."""
    return AnthropicCost()
