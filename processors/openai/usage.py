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
bucket x group), paged until `has_more` is false (a repeated cursor or the page cap fails the step).
Endpoints and slices of the window (whole pages each) are independent page streams, `concurrency` of
them pulled side by side; each page becomes columns, then an Arrow batch in the spool's Parquet files,
which are loaded into a staging table while later pages are pulled. Empty buckets are kept as one
`is_empty_bucket` row; fields this schema does not know go to `extra`. The window's rows are replaced in
one MERGE (all endpoints at once), so a failed run leaves the previous rows.
"""

from __future__ import annotations

from datetime import date
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
    concurrency: int = Field(
        2,
        ge=1,
        le=8,
        description="Page streams pulled side by side (the registry's per-org cap still holds).",
    )


_NOT_INT = frozenset({bool, float, str, list, dict})  # JSON types that are no integer (bool is an int)
_PER_RESULT = ("result_object", *DIMENSIONS, *METRICS)
_METRICS = frozenset(METRICS)


def columns_of_page(endpoint: str, page: Any, lineage: dict[str, Any]) -> dict[str, list[Any] | ingest.Runs]:
    """The raw rows of one page as columns: a row per bucket x result, an `is_empty_bucket` row per
    empty bucket. Built column by column (no dict per row; per-bucket values and fields no result has
    as runs); a metric that is not an integer, or a result that is not an object, fails the page."""
    buckets = ingest.buckets(page)
    for bucket in buckets:
        if not all(type(r) is dict for r in bucket["results"]):
            raise TerminalError(f"{endpoint}: a result is not an object", reason="PROVIDER_BAD_RESPONSE")
    present: set[str] = set().union(*(r for b in buckets for r in b["results"]))
    fields = {"result_object" if n == "object" else n for n in present} & set(_PER_RESULT)
    usage_date, bucket_start, bucket_end, empty = ingest.Runs(), ingest.Runs(), ingest.Runs(), ingest.Runs()
    cols: dict[str, list[Any] | ingest.Runs] = {name: [] for name in fields}
    extra: list[Any] | ingest.Runs = [] if present - KNOWN else ingest.Runs()
    count = 0
    for bucket in buckets:
        start, end = ingest.utc_day(bucket.get("start_time")), ingest.utc_day(bucket.get("end_time"))
        results = bucket["results"]
        n = len(results) or 1
        count += n
        usage_date.add(start.date(), n)
        bucket_start.add(start, n)
        bucket_end.add(end, n)
        empty.add(not results, n)
        for name in fields:
            column = cols[name]
            assert isinstance(column, list)
            if not results:
                column.append(None)
                continue
            key = "object" if name == "result_object" else name
            values = [r.get(key) for r in results]
            if name in _METRICS and not _NOT_INT.isdisjoint(map(type, values)):
                raise TerminalError(f"{endpoint}: {name} is not an integer", reason="PROVIDER_BAD_RESPONSE")
            column += values
        if isinstance(extra, list):
            extra += [{} if r.keys() <= KNOWN else ingest.extra(r, KNOWN) for r in results] or [{}]
        else:
            extra.add({}, n)
    for name in _PER_RESULT:
        if name not in cols:
            cols[name] = ingest.Runs(None, count)
    cols.update(
        endpoint=ingest.Runs(endpoint, count),
        usage_date=usage_date,
        bucket_start=bucket_start,
        bucket_end=bucket_end,
        is_empty_bucket=empty,
        extra=extra,
    )
    for name, value in lineage.items():
        cols[name] = ingest.Runs(value, count)
    return cols


class OpenAIUsage:
    """Pulls the usage endpoints and swaps the window's rows."""

    Config = Config

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        """Pull (independent streams side by side), spool, replace the window; return rows_written."""
        config = parse_config(Config, step_config)
        unknown = [e for e in config.endpoints if e not in GROUP_BY]
        if unknown:
            raise TerminalError(f"unknown OpenAI usage endpoint {unknown[0]!r}", reason="INVALID_STEP_CONFIG")
        start, end = ingest.window(config)
        cred = await ingest.credential(context, PROVIDER, config.credential)
        lineage = ingest.lineage(context, cred)
        pages = 0

        async def pull(spool: ingest.Spool, endpoint: str, first: date, last: date) -> None:
            nonlocal pages
            params = {
                "start_time": ingest.unix(first),
                "end_time": ingest.unix(last) + 86_400,
                "bucket_width": "1d",
                "limit": config.bucket_limit,
            }
            # group_by repeats its key (`group_by=a&group_by=b`), so it travels in the path's query
            path = f"/v1/organization/usage/{endpoint}?" + urlencode(
                [("group_by", g) for g in GROUP_BY[endpoint]]
            )
            # no money in usage pages: orjson (integers stay integers, exactly)
            async for page in context.http.paginate(
                PROVIDER, path, PAGING, params=params, credential=cred, exact=False
            ):
                pages += 1
                await spool.add(partial(columns_of_page, endpoint, page, lineage))
                del page  # not held while the next page is fetched and parsed

        # one stream per endpoint x slice of the window (each slice whole pages: no extra requests)
        cuts = ingest.slices(start, end, config.bucket_limit, config.concurrency)
        async with ingest.Spool(context.warehouse, context.run.dataset, SCHEMA) as spool:
            await ingest.concurrently(
                [partial(pull, spool, e, a, b) for e in config.endpoints for a, b in cuts], config.concurrency
            )
            written = await spool.swap(column="usage_date", start=start, end=end)
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
