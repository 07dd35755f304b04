"""`openai.usage`: every OpenAI organization usage endpoint, 1-day buckets, into `openai_usage_daily_raw`.

```yaml
- step_id: usage
  ps_type: openai.usage
  config:
    start_date: "{{ start_date }}"   # empty: the trailing window ending today (UTC)
    end_date: "{{ end_date }}"
    trailing_days: 3
    endpoints: [completions, embeddings]   # default: all ten
```

Each endpoint is grouped by every dimension it supports (one group_by set per endpoint, so a row is one
bucket x group), paged until `has_more` is false (a repeated cursor or the page cap fails the step), and
streamed to a load file. Empty buckets are kept as one `is_empty_bucket` row; fields this schema does not
know go to `extra`. The window's rows are replaced in one MERGE (all endpoints at once), so a failed run
leaves the previous rows.
"""

from __future__ import annotations

from functools import partial
from typing import Any
from urllib.parse import urlencode

from pydantic import Field

from processors.base import Paging, StepContext, parse_config
from processors.genai import ingest
from server.errors import TerminalError

PROVIDER = "openai"
TABLE = "openai_usage_daily_raw"
PAGING = Paging("cursor", next_field="next_page", param="page", has_more_field="has_more")
USER = ("project_id", "user_id", "api_key_id", "model")
# endpoint -> its group_by values (the OpenAI reference, 2026)
GROUP_BY: dict[str, tuple[str, ...]] = {
    "completions": (*USER, "batch", "service_tier"),
    "embeddings": USER,
    "moderations": USER,
    "images": (*USER, "size", "source"),
    "audio_speeches": USER,
    "audio_transcriptions": USER,
    "vector_stores": ("project_id",),
    "code_interpreter_sessions": ("project_id",),
    "file_search_calls": ("project_id", "user_id", "api_key_id", "vector_store_id"),
    "web_search_calls": ("project_id", "user_id", "api_key_id", "model", "context_level"),
}
SCHEMA = ingest.schema(TABLE)
DIMENSIONS = (
    *USER,
    "batch",
    "service_tier",
    "size",
    "source",
    "vector_store_id",
    "context_level",
    "api_source",
)
METRICS = tuple(f["name"] for f in SCHEMA.fields if f["type"] == "INT64")
KNOWN = frozenset({"object", *DIMENSIONS, *METRICS})


class Config(ingest.WindowConfig):
    """The step's config."""

    endpoints: list[str] = Field(default_factory=lambda: list(GROUP_BY))
    bucket_limit: int = Field(31, ge=1, le=31, description="Buckets per page (OpenAI allows 31 for 1d).")


def rows_of_page(endpoint: str, page: Any, lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """The raw rows of one page: one per bucket x result, one `is_empty_bucket` row per empty bucket."""
    out: list[dict[str, Any]] = []
    for bucket in ingest.buckets(page):
        start, end = ingest.utc_day(bucket.get("start_time")), ingest.utc_day(bucket.get("end_time"))
        base = {
            "endpoint": endpoint,
            "usage_date": start.date(),
            "bucket_start": start,
            "bucket_end": end,
            **lineage,
        }
        results = bucket["results"]
        if not results:
            out.append({**base, "is_empty_bucket": True, "extra": {}})
            continue
        for result in results:
            if not isinstance(result, dict):
                raise TerminalError(f"{endpoint}: a result is not an object", reason="PROVIDER_BAD_RESPONSE")
            row = {**base, "is_empty_bucket": False, "result_object": result.get("object")}
            for name in DIMENSIONS:
                row[name] = result.get(name)
            for name in METRICS:
                value = result.get(name)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise TerminalError(
                        f"{endpoint}: {name} is not an integer", reason="PROVIDER_BAD_RESPONSE"
                    )
                row[name] = value
            row["extra"] = ingest.extra(result, KNOWN)
            out.append(row)
    return out


class OpenAIUsage:
    """Pulls the usage endpoints and swaps the window's rows."""

    Config = Config

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        """Pull, spool, replace the window; return rows_written and the window."""
        config = parse_config(Config, step_config)
        unknown = [e for e in config.endpoints if e not in GROUP_BY]
        if unknown:
            raise TerminalError(f"unknown OpenAI usage endpoint {unknown[0]!r}", reason="INVALID_STEP_CONFIG")
        start, end = ingest.window(config)
        cred = await ingest.credential(context, PROVIDER, config.credential)
        lineage = ingest.lineage(context, cred)
        params = {
            "start_time": ingest.unix(start),
            "end_time": ingest.unix(end) + 86_400,
            "bucket_width": "1d",
            "limit": config.bucket_limit,
        }
        pages = 0
        with ingest.Spool() as spool:
            for endpoint in config.endpoints:
                # group_by repeats its key (`group_by=a&group_by=b`), so it travels in the path's query
                path = f"/v1/organization/usage/{endpoint}?" + urlencode(
                    [("group_by", g) for g in GROUP_BY[endpoint]]
                )
                async for page in context.http.paginate(
                    PROVIDER, path, PAGING, params=params, credential=cred
                ):
                    pages += 1
                    await spool.add(partial(rows_of_page, endpoint, page, lineage))
            written = await context.warehouse.replace_window(
                context.run.dataset, SCHEMA, spool.rewind(), column="usage_date", start=start, end=end
            )
        context.log.info("openai usage: %d rows from %d pages for %s..%s", written, pages, start, end)
        return {
            "status": "SUCCESS",
            "rows_written": written,
            "pages": pages,
            "start_date": start.isoformat(),
            "end_date": end.isoformat(),
        }


def get_engine() -> OpenAIUsage:
    """The processor object the engine calls."""
    return OpenAIUsage()
