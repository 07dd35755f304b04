"""`gcp.api_extractor`: Google Cloud REST list APIs into the org's tables, with the org's service account.

```yaml
- step_id: skus
  ps_type: gcp.api_extractor
  config:
    resource: billing_catalog_skus   # billing_catalog_skus | projects
    credential: default              # the org's gcp credential (a service-account JSON key)
    page_size: 5000                  # pageSize of every list call (Google's maximum for the Catalog)
    currency_code: USD               # billing_catalog_skus: prices converted by Google to this currency
    services: []                     # billing_catalog_skus: only these service ids (default: every service)
    concurrency: 4                   # billing_catalog_skus: services listed at once
```

- `billing_catalog_skus`: `GET /v1/services` (Cloud Billing Catalog) then, per service, `GET
  /v1/services/{id}/skus?currencyCode=...` into `gcp_billing_catalog_skus`: one row per SKU and tier of its
  latest pricing info. `unitPrice` is a Money: `units` (int64, a JSON string) plus `nanos` (int), converted
  exactly (`Decimal(units) + nanos / 10**9`, both parts share the sign); every other number is parsed as a
  Decimal by the HTTP client, never a float.
- `projects`: `GET /v1/projects` (Resource Manager v1) into `gcp_projects` (id, number, name, state,
  parent, labels), which FOCUS uses for project names and labels.

Calls go through the one HTTP client with the registry's providers `gcp_billing_catalog` and
`gcp_resource_manager` (base URLs, rate limits, retries of 429/5xx with Retry-After, page guards), which
use the org's `gcp` credential (`credential_from`): google_service_account auth signs a JWT with the key
(held in memory only), exchanges it at the registry's token URL, caches the token until a minute before it
expires, mints one token for many concurrent requests and mints again once on a 401. Lists follow
`nextPageToken` until it is absent or empty (a page shorter than `pageSize` is not the end); a repeated
token is `PAGINATION_LOOP`, more than the provider's `max_pages` `PAGINATION_LIMIT`; each service's SKU
listing is its own walk.

The table is a snapshot: the rows are written by one load job that replaces the table (WRITE_TRUNCATE,
atomic), only after every page was read, so a failed run leaves the previous snapshot. Outputs:
`rows_written`, `pages`, `services` (catalog).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from processors.base import Credential, Paging, StepContext, parse_config
from server.errors import TerminalError
from server.warehouse.schema import load_schema

PAGES = Paging("page_token", next_field="nextPageToken", param="pageToken")
CATALOG = "gcp_billing_catalog"
RESOURCE_MANAGER = "gcp_resource_manager"
NANOS = Decimal(1_000_000_000)
TABLES = {"billing_catalog_skus": "gcp_billing_catalog_skus", "projects": "gcp_projects"}
SCHEMA_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "schemas" / "org"
SCHEMAS = {resource: load_schema(SCHEMA_DIR / f"{table}.json") for resource, table in TABLES.items()}


class ExtractorConfig(BaseModel):
    """The step's config (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resource: Literal["billing_catalog_skus", "projects"]
    credential: str = Field("default", pattern=r"^[a-z][a-z0-9_]{0,62}$")
    page_size: int = Field(5000, ge=1, le=5000)
    currency_code: str = Field("USD", pattern=r"^[A-Z]{3}$")
    services: list[str] = Field(default_factory=list, max_length=500)
    concurrency: int = Field(4, ge=1, le=16)
    table: str = Field("", pattern=r"^([A-Za-z_][A-Za-z0-9_]{0,200})?$")


def money(value: Any) -> Decimal | None:
    """A google.type.Money (`{"units": "12", "nanos": 500000000}`) as an exact Decimal; None when absent."""
    if not isinstance(value, Mapping):
        return None
    units, nanos = value.get("units", "0") or "0", value.get("nanos", 0) or 0
    if not isinstance(units, str | int) or not isinstance(nanos, int) or isinstance(nanos, bool):
        raise TerminalError("a price in the Catalog answer is malformed", reason="PROVIDER_BAD_RESPONSE")
    try:
        return Decimal(int(units)) + Decimal(nanos) / NANOS
    except ValueError:
        raise TerminalError(
            "a price in the Catalog answer is malformed", reason="PROVIDER_BAD_RESPONSE"
        ) from None


def number(value: Any) -> Decimal | None:
    """A JSON number (int or Decimal from the client) or numeric string as a Decimal."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | Decimal):
        return Decimal(value)
    if isinstance(value, str):
        try:
            return Decimal(value)
        except ArithmeticError:
            return None
    return None


def sku_rows(service: Mapping[str, Any], sku: Mapping[str, Any], currency: str) -> list[dict[str, Any]]:
    """One row per tier of the SKU's latest pricing info (a SKU without prices gives one row)."""
    category = sku.get("category") or {}
    infos = sorted(sku.get("pricingInfo") or [], key=lambda i: str(i.get("effectiveTime", "")))
    info = infos[-1] if infos else {}
    expression = info.get("pricingExpression") or {}
    aggregation = info.get("aggregationInfo") or {}
    base = {
        "service_id": str(service.get("serviceId") or ""),
        "service_display_name": service.get("displayName") or category.get("serviceDisplayName"),
        "sku_id": str(sku.get("skuId") or ""),
        "sku_name": sku.get("name"),
        "description": sku.get("description"),
        "resource_family": category.get("resourceFamily"),
        "resource_group": category.get("resourceGroup"),
        "usage_type": category.get("usageType"),
        "service_regions": [str(r) for r in sku.get("serviceRegions") or []],
        "geo_taxonomy_type": (sku.get("geoTaxonomy") or {}).get("type"),
        "service_provider_name": sku.get("serviceProviderName"),
        "effective_time": info.get("effectiveTime"),
        "pricing_summary": info.get("summary"),
        "usage_unit": expression.get("usageUnit"),
        "usage_unit_description": expression.get("usageUnitDescription"),
        "base_unit": expression.get("baseUnit"),
        "base_unit_conversion_factor": number(expression.get("baseUnitConversionFactor")),
        "display_quantity": number(expression.get("displayQuantity")),
        "aggregation_level": aggregation.get("aggregationLevel"),
        "aggregation_interval": aggregation.get("aggregationInterval"),
        "currency_conversion_rate": number(info.get("currencyConversionRate")),
    }
    tiers = expression.get("tieredRates") or [{}]
    rows = []
    for index, tier in enumerate(tiers):
        price = tier.get("unitPrice")
        rows.append(
            {
                **base,
                "tier_index": index,
                "tier_start_usage_amount": number(tier.get("startUsageAmount")),
                "currency_code": (price or {}).get("currencyCode") or currency,
                "unit_price": money(price),
            }
        )
    return rows


def project_row(project: Mapping[str, Any]) -> dict[str, Any]:
    """A Resource Manager v1 project as a row."""
    parent = project.get("parent") or {}
    labels = project.get("labels") or {}
    return {
        "project_id": str(project.get("projectId") or ""),
        "project_number": str(project.get("projectNumber") or "") or None,
        "name": project.get("name"),
        "lifecycle_state": project.get("lifecycleState"),
        "parent_type": parent.get("type"),
        "parent_id": parent.get("id"),
        "create_time": project.get("createTime"),
        "labels": [{"key": str(k), "value": str(v)} for k, v in sorted(labels.items())],
    }


class GoogleApiExtractor:
    """The processor (see the module docstring)."""

    Config = ExtractorConfig

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        config = parse_config(ExtractorConfig, step_config)
        credential = await context.secrets.get("gcp", config.credential)
        pages = [0]
        if config.resource == "billing_catalog_skus":
            rows, services = await self._catalog(context, config, credential, pages)
            extra: dict[str, Any] = {"services": services}
        else:
            rows = [
                project_row(p)
                async for p in self._list(
                    context, RESOURCE_MANAGER, "/v1/projects", "projects", credential, config, pages
                )
            ]
            extra = {}
        table = config.table or TABLES[config.resource]
        if table == TABLES[config.resource]:  # orgs created before the table existed get it here
            await context.warehouse.ensure_table(context.run.dataset, SCHEMAS[config.resource])
        now = datetime.now(UTC)
        lineage = {
            "x_pipeline_id": context.run.pipeline_id,
            "x_run_id": context.run.run_id,
            "x_ingested_at": now,
        }
        for row in rows:
            row |= lineage
        written = (
            await context.warehouse.load_rows(context.run.dataset, table, rows, replace=True) if rows else 0
        )
        if not rows:
            # an empty listing still replaces the snapshot
            ref = context.warehouse.table_ref(context.run.dataset, table)
            await context.warehouse.query(f"DELETE FROM {ref} WHERE TRUE")
        context.log.info("%s: %d rows from %d pages into %s", config.resource, written, pages[0], table)
        return {"status": "SUCCESS", "rows_written": written, "pages": pages[0], **extra}

    async def _list(
        self,
        context: StepContext,
        provider: str,
        path: str,
        key: str,
        credential: Credential,
        config: ExtractorConfig,
        pages: list[int],
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every item of a paged Google list (a fresh walk per call)."""
        query = {"pageSize": str(config.page_size), **(params or {})}
        async for page in context.http.paginate(provider, path, PAGES, params=query, credential=credential):
            pages[0] += 1
            items = page.get(key) if isinstance(page, dict) else None
            if items is None:
                continue  # an empty page may omit the list
            if not isinstance(items, list):
                raise TerminalError(f"{provider}: {key} is not a list", reason="PROVIDER_BAD_RESPONSE")
            for item in items:
                if isinstance(item, dict):
                    yield item

    async def _catalog(
        self, context: StepContext, config: ExtractorConfig, credential: Credential, pages: list[int]
    ) -> tuple[list[dict[str, Any]], int]:
        services = [
            s
            async for s in self._list(context, CATALOG, "/v1/services", "services", credential, config, pages)
        ]
        if config.services:
            wanted = set(config.services)
            services = [s for s in services if s.get("serviceId") in wanted]
        gate = asyncio.Semaphore(config.concurrency)

        async def skus(service: dict[str, Any]) -> list[dict[str, Any]]:
            service_id = str(service.get("serviceId") or "")
            if not service_id.replace("-", "").isalnum():
                raise TerminalError("a Catalog service id is malformed", reason="PROVIDER_BAD_RESPONSE")
            async with gate:
                return [
                    row
                    async for sku in self._list(
                        context,
                        CATALOG,
                        f"/v1/services/{service_id}/skus",
                        "skus",
                        credential,
                        config,
                        pages,
                        {"currencyCode": config.currency_code},
                    )
                    for row in sku_rows(service, sku, config.currency_code)
                ]

        per_service = await asyncio.gather(*(skus(s) for s in services))
        return [row for rows in per_service for row in rows], len(services)


def get_engine() -> GoogleApiExtractor:
    """The processor."""
    return GoogleApiExtractor()
