"""The GenAI pricing rules as pure code: token classes, price points, rate lookup, list cost.

Rates come from the price catalog (`genai_price_catalog`: the pinned `genai-prices` package flattened by
`processors.genai.catalog`) plus the org's overrides (`genai_price_overrides`). Nothing here does I/O.

The rules (each has a test in tests/unit/test_genai_pricing.py):
- OpenAI `input_tokens` = uncached + cached + cache writes (all modalities): cached input and cache writes
  are subsets of `input_tokens`, priced only at their own rate, never twice. Per-modality uncached fields
  are uncached only. A row whose parts do not add up is rejected, not guessed.
- Anthropic counts are disjoint: uncached input, 5-minute cache writes, 1-hour cache writes, cache reads,
  output, each with its own rate.
- Batch, flex, priority and fast are their own price points (genai-prices variants, resolved like the
  package: a variant overrides only the rates it has, the first matching variant per rate wins).
- Long-context tiers are per request, so they are never inferred from daily sums: they come from the
  OpenAI cost API's `, long context` line items or Anthropic's `context_window` = `200k-1M` grouping,
  and select the tier rate of the model (its flat rate when it has no tier).
- A model without a rate for a class falls back as the provider bills it (cached input without a cached
  rate is input, cache writes without a write rate are input, audio/image without a modality rate are
  text), never to zero. No rate at all is `None`: the caller keeps the billed amount as list.
- Money is Decimal end to end; ListCost = ListUnitPrice x PricingQuantity, quantized to 1e-9 (the
  warehouse's NUMERIC scale) only when the exact product has more decimals.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import orjson

NANO = Decimal("0.000000001")
MILLION = Decimal(1_000_000)


class UsageInvariantError(ValueError):
    """A usage row whose token parts contradict the provider's documented arithmetic."""


# token class -> catalog price keys tried in order (the first the model has is its rate)
RATE_KEYS: dict[str, tuple[str, ...]] = {
    "input": ("input_mtok",),
    "cached_input": ("cache_read_mtok", "input_mtok"),
    "cache_write": ("cache_write_mtok", "input_mtok"),
    "output": ("output_mtok",),
    "input_audio": ("input_audio_mtok", "input_mtok"),
    "cached_input_audio": ("cache_audio_read_mtok", "cache_read_mtok", "input_audio_mtok", "input_mtok"),
    "output_audio": ("output_audio_mtok", "output_mtok"),
    "input_image": ("input_image_mtok", "input_mtok"),
    "cached_input_image": ("cache_image_read_mtok", "cache_read_mtok", "input_image_mtok", "input_mtok"),
    "output_image": ("output_image_mtok", "output_mtok"),
    "cache_write_5m": ("cache_write_mtok", "input_mtok"),
    "cache_write_1h": ("cache_write_1h_mtok",),
    "cache_read": ("cache_read_mtok",),
    "web_search": ("web_searches_kcount",),
}
# how many units one catalog rate is for
PER_UNITS: dict[str, int] = {"web_searches_kcount": 1_000}

METERS: dict[str, str] = {
    "input": "Input Tokens",
    "cached_input": "Cached Input Tokens",
    "cache_write": "Cache Write Tokens",
    "output": "Output Tokens",
    "input_audio": "Audio Input Tokens",
    "cached_input_audio": "Cached Audio Input Tokens",
    "output_audio": "Audio Output Tokens",
    "input_image": "Image Input Tokens",
    "cached_input_image": "Cached Image Input Tokens",
    "output_image": "Image Output Tokens",
    "cache_write_5m": "Cache Write Tokens (5m)",
    "cache_write_1h": "Cache Write Tokens (1h)",
    "cache_read": "Cache Read Tokens",
    "web_search": "Web Search Requests",
}

ANTHROPIC_TOKEN_TYPES: dict[str, str] = {
    "uncached_input_tokens": "input",
    "cache_creation.ephemeral_5m_input_tokens": "cache_write_5m",
    "cache_creation.ephemeral_1h_input_tokens": "cache_write_1h",
    "cache_read_input_tokens": "cache_read",
    "output_tokens": "output",
}


# --- token partitions --------------------------------------------------------------------------------------


def _count(row: Mapping[str, Any], key: str) -> int | None:
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageInvariantError(f"{key} must be a non-negative integer")
    return int(value)


def openai_token_parts(row: Mapping[str, Any]) -> dict[str, int]:
    """Disjoint token classes of one OpenAI completions usage result (2026 field semantics)."""
    total_in = _count(row, "input_tokens") or 0
    cached = _count(row, "input_cached_tokens") or 0
    write = _count(row, "input_cache_write_tokens") or 0
    uncached = _count(row, "input_uncached_tokens")
    if uncached is None:  # older data: derive it, subtracting cached and writes exactly once
        uncached = total_in - cached - write
    if uncached < 0 or uncached + cached + write != total_in:
        raise UsageInvariantError("input_tokens != uncached + cached + cache write tokens")
    audio = _count(row, "input_audio_tokens") or 0
    image = _count(row, "input_image_tokens") or 0
    text = _count(row, "input_text_tokens")
    if text is None:
        text = uncached - audio - image
    if text < 0 or text + audio + image != uncached:
        raise UsageInvariantError("input_uncached_tokens != text + audio + image input tokens")
    cached_audio = _count(row, "input_cached_audio_tokens") or 0
    cached_image = _count(row, "input_cached_image_tokens") or 0
    cached_text = _count(row, "input_cached_text_tokens")
    if cached_text is None:
        cached_text = cached - cached_audio - cached_image
    if cached_text < 0 or cached_text + cached_audio + cached_image != cached:
        raise UsageInvariantError("input_cached_tokens != text + audio + image cached tokens")
    total_out = _count(row, "output_tokens") or 0
    out_audio = _count(row, "output_audio_tokens") or 0
    out_image = _count(row, "output_image_tokens") or 0
    out_text = _count(row, "output_text_tokens")
    if out_text is None:
        out_text = total_out - out_audio - out_image
    if out_text < 0 or out_text + out_audio + out_image != total_out:
        raise UsageInvariantError("output_tokens != text + audio + image output tokens")
    return {
        "input": text,
        "input_audio": audio,
        "input_image": image,
        "cached_input": cached_text,
        "cached_input_audio": cached_audio,
        "cached_input_image": cached_image,
        "cache_write": write,
        "output": out_text,
        "output_audio": out_audio,
        "output_image": out_image,
    }


def anthropic_token_parts(row: Mapping[str, Any]) -> dict[str, int]:
    """Disjoint token classes of one Anthropic messages usage result (flattened keys or nested)."""
    cache = row.get("cache_creation") or {}
    tools = row.get("server_tool_use") or {}
    flat = {
        "uncached_input_tokens": row.get("uncached_input_tokens"),
        "cache_creation.ephemeral_5m_input_tokens": row.get(
            "cache_creation.ephemeral_5m_input_tokens", cache.get("ephemeral_5m_input_tokens")
        ),
        "cache_creation.ephemeral_1h_input_tokens": row.get(
            "cache_creation.ephemeral_1h_input_tokens", cache.get("ephemeral_1h_input_tokens")
        ),
        "cache_read_input_tokens": row.get("cache_read_input_tokens"),
        "output_tokens": row.get("output_tokens"),
        "web_search_requests": row.get("web_search_requests", tools.get("web_search_requests")),
    }
    parts = {cls: _count(flat, key) or 0 for key, cls in ANTHROPIC_TOKEN_TYPES.items()}
    parts["web_search"] = _count(flat, "web_search_requests") or 0
    return parts


# --- price points ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PricePoint:
    """What selects a rate besides model, class and day: the tier, batch, speed and the context band."""

    tier: str = "standard"  # standard | batch | flex | priority | fast | scale
    long_context: bool = False
    speed: str | None = None

    def context(self) -> dict[str, str]:
        """The genai-prices price context of this point."""
        if self.tier == "batch":
            return {"processing": "batch"}
        out = {"service_tier": self.tier} if self.tier in ("flex", "priority", "fast") else {}
        if self.speed == "fast":
            out["speed"] = "fast"
        return out

    @property
    def key(self) -> str:
        """The price point part of a SkuPriceId."""
        parts = [self.tier]
        if self.speed and self.speed != "standard":
            parts.append(self.speed)
        parts.append("long_context" if self.long_context else "base")
        return ":".join(parts)


def openai_price_point(
    service_tier: str | None, batch: bool | None, long_context: bool = False
) -> PricePoint:
    """OpenAI: batch rows report service_tier `default`; `fast` requests report `priority`."""
    if batch:
        return PricePoint("batch", long_context)
    tier = (service_tier or "default").lower()
    return PricePoint("standard" if tier in ("default", "auto") else tier, long_context)


def anthropic_price_point(
    service_tier: str | None, context_window: str | None, speed: str | None = None
) -> PricePoint:
    """Anthropic: the tier from service_tier, the band from the context_window grouping."""
    tier = (service_tier or "standard").lower()
    return PricePoint(tier, (context_window or "").lower() == "200k-1m", speed)


# --- OpenAI line items -------------------------------------------------------------------------------------

_LINE = re.compile(
    r"^(?:(?P<tier>[a-z_]+) \| )?(?P<model>[^,|]+?)(?: (?P<modality>audio|text|image))?,"
    r" (?P<cls>input|cached input|cache writes?|output)(?P<long>, long context)?$"
)


@dataclass(frozen=True, slots=True)
class LineItem:
    """The structured reading of an OpenAI cost line item (free text, parsed only for enrichment)."""

    model: str
    token_class: str
    point: PricePoint


def parse_line_item(text: str | None) -> LineItem | None:
    """`[tier | ]<model>[ audio|text|image], <class>[, long context]`; anything else is None (other SKU)."""
    match = _LINE.match((text or "").strip())
    if match is None:
        return None
    cls = {"input": "input", "cached input": "cached_input", "output": "output"}.get(
        match["cls"], "cache_write"
    )
    modality = match["modality"]
    if modality in ("audio", "image") and cls != "cache_write":
        cls = {"input": "input_", "cached_input": "cached_input_", "output": "output_"}[cls] + modality
    tier = match["tier"] or "default"
    point = openai_price_point(tier if tier != "batch" else "default", tier == "batch", bool(match["long"]))
    return LineItem(match["model"].strip(), cls, point)


# --- the price book ----------------------------------------------------------------------------------------


def matches(clause: Mapping[str, Any], ref: str) -> bool:
    """genai-prices' model match logic over its JSON form."""
    ((kind, arg),) = clause.items()
    if kind == "equals":
        return ref == str(arg)
    if kind == "starts_with":
        return ref.startswith(str(arg))
    if kind == "ends_with":
        return ref.endswith(str(arg))
    if kind == "contains":
        return str(arg) in ref
    if kind == "regex":
        return re.search(arg, ref) is not None
    if kind == "or":
        return any(matches(c, ref) for c in arg)
    if kind == "and":
        return all(matches(c, ref) for c in arg)
    return False


@dataclass(frozen=True, slots=True)
class Rate:
    """A unit price for one PricingUnit (`per` units of the class) and where it came from."""

    list_price: Decimal
    per: int
    contracted_price: Decimal
    source: str  # catalog | override


@dataclass
class _Model:
    model_id: str
    match: dict[str, Any]
    # (price_set, effective_from) in order; rows per (price_set, key) -> (base, tier)
    price_sets: list[tuple[int, date | None]] = field(default_factory=list)
    standard: dict[tuple[int, str], tuple[Decimal | None, Decimal | None]] = field(default_factory=dict)
    # variants in order: (order, when, effective_from, {key: (base, tier)})
    variants: list[
        tuple[int, dict[str, str], date | None, dict[str, tuple[Decimal | None, Decimal | None]]]
    ] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Override:
    """An org's negotiated rate or discount (`pipeline-service prices override`)."""

    provider: str
    model: str  # the provider's model string, or a prefix ending in `*`
    token_class: str | None = None
    tier: str | None = None
    rate: Decimal | None = None  # USD per PricingUnit, replaces the list rate
    discount_pct: Decimal | None = None  # applied to the list rate -> contracted rate
    effective_from: date | None = None
    effective_to: date | None = None

    def applies(self, provider: str, model: str, token_class: str, tier: str, day: date) -> bool:
        name_ok = model.startswith(self.model[:-1]) if self.model.endswith("*") else model == self.model
        return (
            self.provider == provider
            and name_ok
            and self.token_class in (None, token_class)
            and self.tier in (None, tier)
            and (self.effective_from is None or self.effective_from <= day)
            and (self.effective_to is None or day <= self.effective_to)
        )


class PriceBook:
    """Rates of the catalog's models plus an org's overrides, looked up per day."""

    def __init__(self, catalog_rows: Iterable[Mapping[str, Any]], overrides: Iterable[Override] = ()) -> None:
        self.version = ""
        self._models: dict[str, list[_Model]] = {}
        by_id: dict[tuple[str, str], _Model] = {}
        for row in catalog_rows:
            self.version = str(row.get("package_version") or self.version)
            key = (row["provider"], row["model_id"])
            model = by_id.get(key)
            if model is None:
                model = by_id[key] = _Model(row["model_id"], _json(row["model_match"]))
                self._models.setdefault(row["provider"], []).append(model)
            value = Decimal(str(row["price"]))
            band = 1 if row.get("band") == "tier" else 0
            eff = _as_date(row.get("effective_from"))
            variant = row.get("variant") or ""
            if not variant:
                pset = int(row["price_set"])
                if (pset, eff) not in model.price_sets:
                    model.price_sets.append((pset, eff))
                    model.price_sets.sort(key=lambda p: p[0])
                slot = model.standard.get((pset, row["price_key"]), (None, None))
                model.standard[(pset, row["price_key"])] = _with(slot, band, value)
            else:
                order = int(row["variant_order"])
                found = next((v for v in model.variants if v[0] == order), None)
                if found is None:
                    when = dict(part.split("=", 1) for part in variant.split("&"))
                    found = (order, when, eff, {})
                    model.variants.append(found)
                    model.variants.sort(key=lambda v: v[0])
                found[3][row["price_key"]] = _with(found[3].get(row["price_key"], (None, None)), band, value)
        # rows come in catalog order (row_order), so the first model that matches wins, as in genai-prices
        self.overrides = list(overrides)

    def model_id(self, provider: str, model: str) -> str | None:
        """The catalog model a provider's model string is priced as."""
        found = self._find(provider, model)
        return found.model_id if found else None

    def _find(self, provider: str, model: str) -> _Model | None:
        ref = model.lower()
        return next((m for m in self._models.get(provider, ()) if matches(m.match, ref)), None)

    def rate(self, provider: str, model: str, token_class: str, point: PricePoint, day: date) -> Rate | None:
        """The unit price of one token class at a price point on a day, or None when unknown."""
        catalog = self._catalog_rate(provider, model, token_class, point, day)
        override = next(
            (o for o in self.overrides if o.applies(provider, model, token_class, point.tier, day)), None
        )
        if override is not None and override.rate is not None:
            per = catalog.per if catalog else PER_UNITS.get(RATE_KEYS[token_class][0], 1_000_000)
            catalog = Rate(override.rate, per, override.rate, "override")
        if catalog is None:
            return None
        if override is not None and override.discount_pct is not None:
            pct = min(max(override.discount_pct, Decimal(0)), Decimal(100))
            contracted = catalog.list_price * (100 - pct) / 100
            return Rate(catalog.list_price, catalog.per, contracted, "override")
        return catalog

    def _catalog_rate(
        self, provider: str, model: str, token_class: str, point: PricePoint, day: date
    ) -> Rate | None:
        found = self._find(provider, model)
        if found is None:
            return None
        context = point.context()
        for key in RATE_KEYS[token_class]:
            slot = self._variant_slot(found, key, context, day) or self._standard_slot(found, key, day)
            if slot is None:
                continue
            base, tier = slot
            price = tier if point.long_context and tier is not None else base
            if price is None:
                continue
            return Rate(price, PER_UNITS.get(key, 1_000_000), price, "catalog")
        return None

    @staticmethod
    def _standard_slot(model: _Model, key: str, day: date) -> tuple[Decimal | None, Decimal | None] | None:
        if not model.price_sets:
            return None
        active = model.price_sets[0][0]
        for pset, eff in reversed(model.price_sets):
            if eff is None or eff <= day:
                active = pset
                break
        return model.standard.get((active, key))

    @staticmethod
    def _variant_slot(
        model: _Model, key: str, context: Mapping[str, str], day: date
    ) -> tuple[Decimal | None, Decimal | None] | None:
        if not context:
            return None
        for _, when, eff, prices in model.variants:
            if eff is not None and day < eff:
                continue
            if all(context.get(k) == v for k, v in when.items()) and key in prices:
                return prices[key]
        return None


def _with(
    slot: tuple[Decimal | None, Decimal | None], band: int, value: Decimal
) -> tuple[Decimal | None, Decimal | None]:
    return (value, slot[1]) if band == 0 else (slot[0], value)


def _as_date(value: Any) -> date | None:
    if value is None or isinstance(value, date):
        return value
    return date.fromisoformat(str(value))


def _json(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    parsed = orjson.loads(value)
    if isinstance(parsed, str):  # a JSON column read back as a JSON string
        parsed = orjson.loads(parsed)
    assert isinstance(parsed, dict)
    return parsed


# --- money -------------------------------------------------------------------------------------------------


def pricing_quantity(units: int, per: int) -> Decimal:
    """Units expressed in PricingUnit (`per` units): exact (tokens / 1,000,000 has 6 decimals)."""
    return Decimal(units) / Decimal(per)


def nano(value: Decimal) -> Decimal:
    """`value` as is when it fits NUMERIC(38, 9), else rounded half-even to 1e-9."""
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -9:
        return value.quantize(NANO, rounding=ROUND_HALF_EVEN)
    return value


def cost(unit_price: Decimal, quantity: Decimal) -> Decimal:
    """unit price x quantity, exact when it fits NUMERIC(38, 9), else rounded half-even to 1e-9."""
    return nano(unit_price * quantity)


def list_cost(
    book: PriceBook, provider: str, model: str, parts: Mapping[str, int], point: PricePoint, day: date
) -> tuple[Decimal, bool]:
    """Σ parts x rate of one usage row; the flag is False when a class with units had no rate."""
    total = Decimal(0)
    complete = True
    for cls, units in parts.items():
        if not units:
            continue
        rate = book.rate(provider, model, cls, point, day)
        if rate is None:
            complete = False
            continue
        total += rate.list_price * pricing_quantity(units, rate.per)
    return total, complete
