"""`anthropic.usage`: Anthropic's messages usage report, 1-day buckets, into `anthropic_usage_daily_raw`.

```yaml
- step_id: usage
  ps_type: anthropic.usage
  config:
    start_date: "{{ start_date }}"
    end_date: "{{ end_date }}"
    trailing_days: 3
```

Grouped by workspace, API key, account, service account, model, service tier, context window and
inference geo (`speed` needs a beta header and is not requested). The four input counts are disjoint.
A NULL `workspace_id` is the Default workspace. The window is replaced all or nothing.
"""

from __future__ import annotations

from datetime import date, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlencode

from pydantic import Field

from processors.base import Paging, StepContext, parse_config
from processors.genai import ingest
from processors.genai.pricing import anthropic_token_parts
from server.errors import TerminalError

PROVIDER = "anthropic"
TABLE = "anthropic_usage_daily_raw"
PAGING = Paging("cursor", next_field="next_page", param="page", has_more_field="has_more")
GROUP_BY = (
    "workspace_id",
    "api_key_id",
    "account_id",
    "service_account_id",
    "model",
    "service_tier",
    "context_window",
    "inference_geo",
)
SCHEMA = ingest.schema(TABLE)
COUNTS = {
    "uncached_input_tokens": "input",
    "cache_creation_5m_input_tokens": "cache_write_5m",
    "cache_creation_1h_input_tokens": "cache_write_1h",
    "cache_read_input_tokens": "cache_read",
    "output_tokens": "output",
    "web_search_requests": "web_search",
}
KNOWN = frozenset(
    {
        *GROUP_BY,
        "speed",
        "uncached_input_tokens",
        "cache_creation",
        "cache_read_input_tokens",
        "output_tokens",
        "server_tool_use",
    }
)


class Config(ingest.WindowConfig):
    """The step's config."""

    bucket_limit: int = Field(31, ge=1, le=31, description="Buckets per page (31 for 1d).")
    concurrency: int = Field(
        2,
        ge=1,
        le=8,
        description="Page streams pulled side by side (the registry's per-org cap still holds).",
    )


def rows_of_page(page: Any, lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """One raw row per bucket x result; one `is_empty_bucket` row per empty bucket."""
    out: list[dict[str, Any]] = []
    for bucket in ingest.buckets(page):
        start, end = ingest.utc_day(bucket.get("starting_at")), ingest.utc_day(bucket.get("ending_at"))
        base = {"usage_date": start.date(), "bucket_start": start, "bucket_end": end, **lineage}
        if not bucket["results"]:
            out.append({**base, "is_empty_bucket": True, "extra": {}})
        for result in bucket["results"]:
            if not isinstance(result, dict):
                raise TerminalError("usage report: a result is not an object", reason="PROVIDER_BAD_RESPONSE")
            try:
                parts = anthropic_token_parts(result)
            except ValueError as exc:
                raise TerminalError(f"usage report: {exc}", reason="PROVIDER_BAD_RESPONSE") from exc
            row = {**base, "is_empty_bucket": False, **{g: result.get(g) for g in (*GROUP_BY, "speed")}}
            row.update({column: parts[cls] for column, cls in COUNTS.items()})
            row["extra"] = ingest.extra(result, KNOWN)
            out.append(row)
    return out


class AnthropicUsage:
    """Pulls the messages usage report and swaps the window's rows."""

    Config = Config

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        """Pull, spool, replace the window; return rows_written and the window."""
        config = parse_config(Config, step_config)
        start, end = ingest.window(config)
        cred = await ingest.credential(context, PROVIDER, config.credential)
        lineage = ingest.lineage(context, cred)
        path = "/v1/organizations/usage_report/messages?" + urlencode([("group_by[]", g) for g in GROUP_BY])
        pages = 0

        async def pull(spool: ingest.Spool, first: date, last: date) -> None:
            nonlocal pages
            params = {
                "starting_at": ingest.rfc3339(first),
                "ending_at": ingest.rfc3339(last + timedelta(days=1)),
                "bucket_width": "1d",
                "limit": config.bucket_limit,
            }
            # no money in usage pages: orjson (integers stay integers, exactly)
            async for page in context.http.paginate(
                PROVIDER, path, PAGING, params=params, credential=cred, exact=False
            ):
                pages += 1
                await spool.add(partial(rows_of_page, page, lineage))
                del page  # not held while the next page is fetched and parsed

        # one stream per slice of the window (whole pages each: no extra requests)
        cuts = ingest.slices(start, end, config.bucket_limit, config.concurrency)
        async with ingest.Spool(context.warehouse, context.run.dataset, SCHEMA) as spool:
            await ingest.concurrently([partial(pull, spool, a, b) for a, b in cuts], config.concurrency)
            written = await spool.swap(column="usage_date", start=start, end=end)
        context.log.info("anthropic usage: %d rows from %d pages for %s..%s", written, pages, start, end)
        return {
            "status": "SUCCESS",
            "rows_written": written,
            "pages": pages,
            "start_date": start.isoformat(),
            "end_date": end.isoformat(),
        }


def get_engine() -> AnthropicUsage:
    """The processor object the engine calls."""
    return AnthropicUsage()
