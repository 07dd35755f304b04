"""The GenAI price catalog snapshot and the orgs' price overrides.

The catalog (`{meta}.genai_price_catalog`) holds the pinned genai-prices package's OpenAI and Anthropic
prices, flattened by `processors.genai.catalog`; `ensure_snapshot` loads the installed version once
(at bootstrap; bumping the pin is what changes prices). Overrides (`{org}.genai_price_overrides`) are
an org's negotiated rates: `rate` replaces a list rate (models or tiers the catalog lacks), `discount_pct`
gives the contracted rate.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from processors.genai.catalog import catalog_rows, package_version
from processors.genai.pricing import RATE_KEYS
from server.errors import FieldViolation, InvalidInputError
from server.warehouse.bigquery import BigQueryWarehouse

CATALOG = "genai_price_catalog"
OVERRIDES = "genai_price_overrides"
PROVIDERS = ("openai", "anthropic")
TIERS = ("standard", "batch", "flex", "priority", "fast", "scale")


async def ensure_snapshot(warehouse: BigQueryWarehouse, meta_dataset: str, *, force: bool = False) -> int:
    """Load the installed genai-prices version into the catalog unless it is there; rows loaded."""
    version = package_version()
    table = warehouse.table_ref(meta_dataset, CATALOG)
    found = await warehouse.query(
        f"SELECT COUNT(*) AS n FROM {table} WHERE package_version = @v", {"v": version}
    )
    if found[0]["n"] and not force:
        return 0
    if found[0]["n"]:
        await warehouse.query(f"DELETE FROM {table} WHERE package_version = @v", {"v": version})
    rows = list(catalog_rows(datetime.now(UTC).date()))
    return await warehouse.load_rows(meta_dataset, CATALOG, rows)


@dataclass(frozen=True, slots=True)
class OverrideRequest:
    """What `prices override` sets."""

    provider: str
    model: str
    token_class: str | None = None
    tier: str | None = None
    rate: Decimal | None = None
    discount_pct: Decimal | None = None
    effective_from: date | None = None
    effective_to: date | None = None

    def check(self) -> None:
        """Refuse what would price wrongly (naming each field)."""
        bad: list[FieldViolation] = []
        if self.provider not in PROVIDERS:
            bad.append(FieldViolation("provider", f"one of {', '.join(PROVIDERS)}"))
        if not self.model or len(self.model) > 200:
            bad.append(FieldViolation("model", "a model name or prefix* of at most 200 characters"))
        if self.token_class is not None and self.token_class not in RATE_KEYS:
            bad.append(FieldViolation("token_class", f"one of {', '.join(RATE_KEYS)}"))
        if self.tier is not None and self.tier not in TIERS:
            bad.append(FieldViolation("tier", f"one of {', '.join(TIERS)}"))
        if (self.rate is None) == (self.discount_pct is None):
            bad.append(FieldViolation("rate", "give exactly one of rate and discount_pct"))
        if self.rate is not None and not (Decimal(0) <= self.rate < Decimal(10**9)):
            bad.append(FieldViolation("rate", "USD per pricing unit, 0 or more"))
        if self.discount_pct is not None and not (Decimal(0) <= self.discount_pct <= 100):
            bad.append(FieldViolation("discount_pct", "0 to 100"))
        if self.effective_from and self.effective_to and self.effective_to < self.effective_from:
            bad.append(FieldViolation("effective_to", "must not be before effective_from"))
        if bad:
            raise InvalidInputError("invalid price override", bad, reason="INVALID_PRICE_OVERRIDE")


async def set_override(
    warehouse: BigQueryWarehouse, dataset: str, request: OverrideRequest
) -> dict[str, Any]:
    """Store one override; return it with its id."""
    request.check()
    row = {
        "override_id": "ovr_" + uuid.uuid4().hex[:16],
        "provider": request.provider,
        "model": request.model,
        "token_class": request.token_class,
        "tier": request.tier,
        "rate": request.rate,
        "discount_pct": request.discount_pct,
        "effective_from": request.effective_from,
        "effective_to": request.effective_to,
        "created_at": datetime.now(UTC),
    }
    await warehouse.load_rows(dataset, OVERRIDES, [row])
    return row


async def list_overrides(warehouse: BigQueryWarehouse, dataset: str) -> list[dict[str, Any]]:
    """The org's overrides, oldest first."""
    table = warehouse.table_ref(dataset, OVERRIDES)
    return await warehouse.query(f"SELECT * FROM {table} ORDER BY created_at, override_id")


async def delete_override(warehouse: BigQueryWarehouse, dataset: str, override_id: str) -> int:
    """Remove one override; how many rows went (0 when the id is unknown)."""
    table = warehouse.table_ref(dataset, OVERRIDES)
    result = await warehouse.query_job(f"DELETE FROM {table} WHERE override_id = @id", {"id": override_id})
    return result.num_dml_affected_rows
