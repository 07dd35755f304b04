"""`openai.cost`: OpenAI's costs API (the invoice basis), 1-day buckets, into `openai_costs_daily_raw`.

```yaml
- step_id: cost
  ps_type: openai.cost
  config:
    start_date: "{{ start_date }}"
    end_date: "{{ end_date }}"
    trailing_days: 3
```

Grouped by project, line item and API key. `amount.value` is a JSON number in USD, parsed as a Decimal by
the HTTP client (never a float), kept exactly when it has at most 9 decimals (NUMERIC), else rounded
half-even to 1e-9. The window is replaced all or nothing, like `openai.usage`.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from pydantic import Field

from processors.base import Paging, StepContext, parse_config
from processors.genai import ingest
from processors.genai.pricing import nano
from server.errors import TerminalError

PROVIDER = "openai"
TABLE = "openai_costs_daily_raw"
PAGING = Paging("cursor", next_field="next_page", param="page", has_more_field="has_more")
GROUP_BY = ("project_id", "line_item", "api_key_id")
SCHEMA = ingest.schema(TABLE)
KNOWN = frozenset({"object", "amount", "quantity", "quantity_unit", *GROUP_BY})


class Config(ingest.WindowConfig):
    """The step's config."""

    bucket_limit: int = Field(31, ge=1, le=180, description="Buckets per page (costs allow up to 180).")


def _decimal(value: Any, what: str) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise TerminalError(f"costs: {what} is not a number", reason="PROVIDER_BAD_RESPONSE")
    return nano(Decimal(value))


def rows_of_page(page: Any, lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """One raw row per bucket x result; one `is_empty_bucket` row per empty bucket."""
    out: list[dict[str, Any]] = []
    for bucket in ingest.buckets(page):
        start, end = ingest.utc_day(bucket.get("start_time")), ingest.utc_day(bucket.get("end_time"))
        base = {"cost_date": start.date(), "bucket_start": start, "bucket_end": end, **lineage}
        if not bucket["results"]:
            out.append({**base, "is_empty_bucket": True, "extra": {}})
        for result in bucket["results"]:
            amount = result.get("amount") if isinstance(result, dict) else None
            if not isinstance(amount, dict):
                raise TerminalError("costs: a result has no amount", reason="PROVIDER_BAD_RESPONSE")
            out.append(
                {
                    **base,
                    "is_empty_bucket": False,
                    **{g: result.get(g) for g in GROUP_BY},
                    "amount": _decimal(amount.get("value"), "amount.value"),
                    "currency": str(amount.get("currency") or "usd").upper(),
                    "quantity": _decimal(result.get("quantity"), "quantity"),
                    "quantity_unit": result.get("quantity_unit"),
                    "extra": ingest.extra(result, KNOWN),
                }
            )
    return out


class OpenAICost:
    """Pulls the costs API and swaps the window's rows."""

    Config = Config

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        """Pull, spool, replace the window; return rows_written and the billed total."""
        config = parse_config(Config, step_config)
        start, end = ingest.window(config)
        cred = await ingest.credential(context, PROVIDER, config.credential)
        lineage = ingest.lineage(context, cred)
        params = {
            "start_time": ingest.unix(start),
            "end_time": ingest.unix(end) + 86_400,
            "bucket_width": "1d",
            "limit": config.bucket_limit,
        }
        path = "/v1/organization/costs?" + urlencode([("group_by", g) for g in GROUP_BY])
        billed = Decimal(0)
        async with ingest.Spool(context.warehouse, context.run.dataset, SCHEMA) as spool:
            async for page in context.http.paginate(PROVIDER, path, PAGING, params=params, credential=cred):
                rows = await asyncio.to_thread(rows_of_page, page, lineage)
                billed += sum((r["amount"] for r in rows if r.get("amount") is not None), Decimal(0))
                await spool.write(rows)
            written = await spool.swap(column="cost_date", start=start, end=end)
        context.log.info("openai costs: %d rows, %s USD for %s..%s", written, billed, start, end)
        return {
            "status": "SUCCESS",
            "rows_written": written,
            "billed_cost": format(billed, "f"),
            "start_date": start.isoformat(),
            "end_date": end.isoformat(),
        }


def get_engine() -> OpenAICost:
    """The processor object the engine calls."""
    return OpenAICost()
