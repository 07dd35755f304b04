"""`testprovider.usage` (tests only): a provider processor as the real ones will be, against a fake API.

Reads the org's credential through `context.secrets`, pages through the provider's usage endpoint with
`context.http` (cursor paging; 429/5xx retried by the client), and replaces the run window's rows of
the org's table (DELETE of the window, then one load job), so a re-run leaves the same rows.

```yaml
- step_id: pull
  ps_type: testprovider.usage
  config: {provider: generic, path: /v1/usage, table: provider_usage}
```
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from processors.base import Paging, StepContext, parse_config
from server.errors import TerminalError


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str = "generic"
    path: str = "/v1/usage"
    table: str = "provider_usage"
    credential: str = "default"


PAGING = Paging("cursor", next_field="next_page", param="page", has_more_field="has_more")


class Usage:
    Config = Config

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        config = parse_config(Config, step_config)
        start, end = context.start_date, context.end_date
        if start is None or end is None:
            raise TerminalError("the run needs a window", reason="WINDOW_REQUIRED")
        credential = await context.secrets.get(config.provider, config.credential)
        context.log.info("pulling usage with %r", credential)  # the repr is masked
        rows: list[dict[str, Any]] = []
        pages = 0
        params = {"start_date": start.isoformat(), "end_date": end.isoformat()}
        async for page in context.http.paginate(
            config.provider, config.path, PAGING, params=params, credential=credential
        ):
            pages += 1
            for item in page["data"]:
                rows.append(
                    {
                        "usage_date": item["date"],
                        "model": item["model"],
                        "cost": item["cost"],  # a Decimal: parsed exactly by the client
                        "x_run_id": context.run.run_id,
                        "x_credential_id": credential.id,
                    }
                )
        table = context.warehouse.table_ref(context.run.dataset, config.table)
        await context.warehouse.query(
            f"DELETE FROM {table} WHERE usage_date BETWEEN @start AND @end", {"start": start, "end": end}
        )
        written = await context.warehouse.load_rows(context.run.dataset, config.table, rows)
        return {"status": "SUCCESS", "rows_written": written, "pages": pages, "credential_id": credential.id}


def get_engine() -> Usage:
    return Usage()
