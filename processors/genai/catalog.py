"""The price catalog: the pinned `genai-prices` package's data flattened into rows (`genai_price_catalog`).

One row per (provider, model, price set or variant, price key, band): `price` in USD per `per` units,
`effective_from` from the package's date constraints, `package_version` and `snapshot_date` on every row,
so a re-run prices the same way until the pinned version is bumped (auto-update is never used).
Time-of-day prices (off-peak discounts of other providers) are not flattened.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import date
from importlib.metadata import version
from typing import Any

import orjson
from genai_prices import types
from genai_prices.data import providers

PROVIDERS = ("openai", "anthropic")


def package_version() -> str:
    """The installed (pinned) genai-prices version."""
    return version("genai-prices")


def _clause(clause: Any) -> dict[str, Any]:
    """A genai-prices match clause as JSON (`{"equals": ...}`, `{"or": [...]}`, ...)."""
    if isinstance(clause, types.ClauseOr):
        return {"or": [_clause(c) for c in clause.or_]}
    if isinstance(clause, types.ClauseAnd):
        return {"and": [_clause(c) for c in clause.and_]}
    ((name, value),) = ((f.name, getattr(clause, f.name)) for f in dataclasses.fields(clause))
    return {name: value}


def _prices(prices: types.ModelPrice) -> Iterator[tuple[str, str, int | None, Any]]:
    """(price_key, band, threshold, price) of a ModelPrice; tiered prices give a base and a tier row."""
    for key, value in prices.__dict__.items():
        if value is None or key.startswith("_"):
            continue
        if isinstance(value, types.TieredPrices):
            yield key, "base", None, value.base
            if value.tiers:
                tier = value.tiers[0]
                yield key, "tier", tier.start, tier.price
        else:
            yield key, "base", None, value


def _when(variant: Any) -> str:
    """A price variant's condition as sorted `key=value` pairs joined by `&`."""
    return "&".join(f"{k}={v}" for k, v in sorted(variant.when.items()))


def catalog_rows(snapshot_date: date, provider_ids: tuple[str, ...] = PROVIDERS) -> Iterator[dict[str, Any]]:
    """Every catalog row of the given providers, in the package's model order."""
    pkg = package_version()
    order = 0
    for provider in providers:
        if provider.id not in provider_ids:
            continue
        for model in provider.models:
            match = orjson.dumps(_clause(model.match)).decode()
            common = {"provider": provider.id, "model_id": model.id, "model_match": match}
            sets = (
                [types.ConditionalPrice(prices=model.prices)]
                if isinstance(model.prices, types.ModelPrice)
                else model.prices
            )
            # (price set, variant, variant order, constraint, prices): the model's price sets, then its
            # variants (prices under a condition such as a service tier)
            priced = [(pset, "", 0, c.constraint, c.prices) for pset, c in enumerate(sets)]
            priced += [
                (0, _when(var), vorder, var.constraint, var.prices)
                for vorder, var in enumerate(model.price_variants or (), start=1)
            ]
            for pset, variant, vorder, constraint, prices in priced:
                if isinstance(constraint, types.TimeOfDateConstraint):
                    continue
                eff = constraint.start_date if constraint else None
                for key, band, threshold, price in _prices(prices):
                    order += 1
                    yield common | {
                        "price_set": pset,
                        "variant": variant,
                        "variant_order": vorder,
                        "price_key": key,
                        "band": band,
                        "threshold": threshold,
                        "price": price,
                        "effective_from": eff,
                        "row_order": order,
                        "package_version": pkg,
                        "snapshot_date": snapshot_date,
                    }
