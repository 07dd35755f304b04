"""GenAI pricing rules: hand-computed cases, properties (hypothesis), a cross-check with genai-prices."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.genai.catalog import catalog_rows, package_version
from processors.genai.pricing import (
    Override,
    PriceBook,
    PricePoint,
    UsageInvariantError,
    anthropic_price_point,
    anthropic_token_parts,
    cost,
    list_cost,
    openai_price_point,
    openai_token_parts,
    parse_line_item,
    pricing_quantity,
)

DAY = date(2026, 11, 20)  # after the package's tier variants start (2026-10-12 / 10-14)
ROWS = list(catalog_rows(date(2026, 11, 30)))
BOOK = PriceBook(ROWS)
D = Decimal


def openai_row(**counts: int) -> dict[str, Any]:
    text, audio, image = counts.get("text", 0), counts.get("audio", 0), counts.get("image", 0)
    ctext, caudio, cimage = counts.get("ctext", 0), counts.get("caudio", 0), counts.get("cimage", 0)
    write, otext, oaudio = counts.get("write", 0), counts.get("otext", 0), counts.get("oaudio", 0)
    return {
        "input_tokens": text + audio + image + ctext + caudio + cimage + write,
        "input_cached_tokens": ctext + caudio + cimage,
        "input_cache_write_tokens": write,
        "input_uncached_tokens": text + audio + image,
        "input_text_tokens": text,
        "input_audio_tokens": audio,
        "input_image_tokens": image,
        "input_cached_text_tokens": ctext,
        "input_cached_audio_tokens": caudio,
        "input_cached_image_tokens": cimage,
        "output_tokens": otext + oaudio,
        "output_text_tokens": otext,
        "output_audio_tokens": oaudio,
        "output_image_tokens": 0,
    }


# --- hand-computed cases -----------------------------------------------------------------------------------


def test_catalog_rows_carry_version_and_dates() -> None:
    assert ROWS and all(r["package_version"] == package_version() == "0.2.3" for r in ROWS)
    assert all(r["snapshot_date"] == date(2026, 11, 30) for r in ROWS)
    assert any(r["effective_from"] == date(2026, 10, 14) and r["variant"] == "processing=batch" for r in ROWS)
    assert all(isinstance(r["price"], Decimal) for r in ROWS)


def test_openai_cached_input_is_a_subset_of_input_priced_once() -> None:
    # litellm#6215: 18.45M input of which 12.3M cached; gpt-5: 1.25 input, 0.125 cached, 10 output per 1M
    row = openai_row(text=6_150_000, ctext=12_300_000, otext=1_240_000)
    parts = openai_token_parts(row)
    assert parts["input"] == 6_150_000 and parts["cached_input"] == 12_300_000
    total, complete = list_cost(BOOK, "openai", "gpt-5-2025-08-07", parts, PricePoint(), DAY)
    assert complete
    assert total == D("7.6875") + D("1.5375") + D("12.4")  # never 18.45M x 1.25 + 12.3M x 0.125


def test_openai_cache_writes_are_part_of_input_tokens() -> None:
    row = openai_row(text=1_000, ctext=2_000, write=3_000)
    assert row["input_tokens"] == 6_000
    parts = openai_token_parts(row)
    assert parts["input"] + parts["cached_input"] + parts["cache_write"] == 6_000
    # gpt-5 has no cache-write rate: writes are billed as input (1.25), never 0, never twice
    total, _ = list_cost(BOOK, "openai", "gpt-5-2025-08-07", parts, PricePoint(), DAY)
    assert total == (D(1_000) * D("1.25") + D(2_000) * D("0.125") + D(3_000) * D("1.25")) / 1_000_000


def test_openai_row_that_does_not_add_up_is_rejected() -> None:
    row = openai_row(text=10, ctext=5)
    row["input_tokens"] = 12  # less than uncached + cached
    with pytest.raises(UsageInvariantError):
        openai_token_parts(row)
    old = {"input_tokens": 100, "input_cached_tokens": 40, "output_tokens": 7}  # 2025 fields only
    assert openai_token_parts(old) == {
        "input": 60,
        "input_audio": 0,
        "input_image": 0,
        "cached_input": 40,
        "cached_input_audio": 0,
        "cached_input_image": 0,
        "cache_write": 0,
        "output": 7,
        "output_audio": 0,
        "output_image": 0,
    }


def test_openai_batch_flex_priority_are_own_prices() -> None:
    book, model = BOOK, "gpt-5-2025-08-07"
    got = {
        name: (
            book.rate("openai", model, "input", point, DAY),
            book.rate("openai", model, "cached_input", point, DAY),
            book.rate("openai", model, "output", point, DAY),
        )
        for name, point in {
            "standard": openai_price_point("default", False),
            "batch": openai_price_point("default", True),
            "flex": openai_price_point("flex", False),
            "priority": openai_price_point("priority", False),
        }.items()
    }
    prices = {k: tuple(r.list_price for r in v if r) for k, v in got.items()}
    assert prices == {
        "standard": (D("1.25"), D("0.125"), D("10")),
        "batch": (D("0.625"), D("0.0625"), D("5")),
        "flex": (D("0.625"), D("0.0625"), D("5")),
        "priority": (D("2.5"), D("0.25"), D("20")),
    }
    # gpt-4o-mini batch has no batch cached rate: the standard cached rate, not the batch input rate
    cached = BOOK.rate("openai", "gpt-4o-mini-2024-07-18", "cached_input", PricePoint("batch"), DAY)
    assert cached is not None and cached.list_price == D("0.075")


def test_openai_long_context_comes_from_line_items() -> None:
    item = parse_line_item("gpt-5.5-2026-04-23, input, long context")
    assert item is not None and item.point.long_context and item.token_class == "input"
    rate = BOOK.rate("openai", item.model, item.token_class, item.point, DAY)
    assert rate is not None and rate.list_price == D("10")  # 2 x 5
    base = BOOK.rate("openai", item.model, "input", PricePoint(), DAY)
    assert base is not None and base.list_price == D("5")
    item = parse_line_item("priority | gpt-5.5-2026-04-23, output, long context")
    assert item is not None and item.point == PricePoint("priority", True)
    assert parse_line_item("batch | gpt-4o-mini-2024-07-18, cached input") == parse_line_item(
        "batch | gpt-4o-mini-2024-07-18, cached input"
    )
    batch = parse_line_item("batch | gpt-4o-mini-2024-07-18, cached input")
    assert batch is not None and batch.point.tier == "batch" and batch.token_class == "cached_input"
    audio = parse_line_item("gpt-4o audio, cached input")
    assert audio is not None and audio.token_class == "cached_input_audio" and audio.model == "gpt-4o"
    assert parse_line_item("web search tool calls") is None
    assert parse_line_item("Vector storage") is None


def test_anthropic_cache_classes_are_disjoint_with_own_prices() -> None:
    # the worked example: sonnet-class rates 3 / 3.75 / 6 / 0.3 / 15 -> $77.04
    row = {
        "uncached_input_tokens": 8_250_000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1_120_000, "ephemeral_1h_input_tokens": 400_000},
        "cache_read_input_tokens": 36_800_000,
        "output_tokens": 2_310_000,
        "server_tool_use": {"web_search_requests": 0},
    }
    parts = anthropic_token_parts(row)
    point = anthropic_price_point("standard", "0-200k")
    total, complete = list_cost(BOOK, "anthropic", "claude-sonnet-4-5-20250929", parts, point, DAY)
    assert complete and total == D("77.04")
    one_hour = BOOK.rate("anthropic", "claude-sonnet-4-5-20250929", "cache_write_1h", point, DAY)
    assert one_hour is not None and one_hour.list_price == D("6")  # 2x input, not the 5m rate 3.75


def test_anthropic_batch_and_long_context_bands() -> None:
    model = "claude-sonnet-4-5-20250929"
    cases = {
        ("standard", "0-200k"): (D("3"), D("15"), D("0.3")),
        ("standard", "200k-1M"): (D("6"), D("22.5"), D("0.6")),
        ("batch", "0-200k"): (D("1.5"), D("7.5"), D("0.15")),
        ("batch", "200k-1M"): (D("3"), D("11.25"), D("0.3")),
    }
    for (tier, window), expected in cases.items():
        point = anthropic_price_point(tier, window)
        got = tuple(
            r.list_price
            for cls in ("input", "output", "cache_read")
            if (r := BOOK.rate("anthropic", model, cls, point, DAY)) is not None
        )
        assert got == expected, (tier, window)
    # web search: $10 per 1,000 requests, one PricingUnit = 1,000 requests
    rate = BOOK.rate("anthropic", model, "web_search", PricePoint(), DAY)
    assert rate is not None and (rate.list_price, rate.per) == (D("10"), 1_000)


def test_priority_tier_uses_standard_list_rates() -> None:
    point = anthropic_price_point("priority", "0-200k")
    rate = BOOK.rate("anthropic", "claude-sonnet-4-5-20250929", "input", point, DAY)
    assert rate is not None and rate.list_price == D("3")


def test_unknown_model_has_no_rate_and_overrides_fill_gaps() -> None:
    assert BOOK.rate("openai", "ft-secret-model", "input", PricePoint(), DAY) is None
    book = PriceBook(
        ROWS,
        [
            Override("openai", "ft-secret-model", rate=D("7.5")),
            Override("openai", "gpt-5*", token_class="output", discount_pct=D("20")),
        ],
    )
    rate = book.rate("openai", "ft-secret-model", "input", PricePoint(), DAY)
    assert rate is not None and rate.list_price == rate.contracted_price == D("7.5")
    rate = book.rate("openai", "gpt-5-2025-08-07", "output", PricePoint(), DAY)
    assert rate is not None and (rate.list_price, rate.contracted_price) == (D("10"), D("8"))
    rate = book.rate("openai", "gpt-5-2025-08-07", "input", PricePoint(), DAY)
    assert rate is not None and rate.contracted_price == D("1.25")


def test_prices_are_date_versioned() -> None:
    # the batch variant of gpt-5 is modelled from 2026-10-14 on; before it the standard rate applies
    before = BOOK.rate("openai", "gpt-5-2025-08-07", "input", PricePoint("batch"), date(2026, 10, 13))
    after = BOOK.rate("openai", "gpt-5-2025-08-07", "input", PricePoint("batch"), date(2026, 10, 14))
    assert before is not None and after is not None
    assert (before.list_price, after.list_price) == (D("1.25"), D("0.625"))


def test_cost_is_exact_or_rounded_to_the_nano() -> None:
    assert cost(D("2.5"), pricing_quantity(1_234_567, 1_000_000)) == D("3.0864175")
    assert cost(D("0.0375"), pricing_quantity(1, 1_000_000)) == D("0.000000038")  # 3.75e-8 half-even


# --- properties --------------------------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=10**10)


@settings(max_examples=200, deadline=None)
@given(
    text=counts,
    audio=counts,
    image=counts,
    ctext=counts,
    caudio=counts,
    cimage=counts,
    write=counts,
    otext=counts,
)
def test_openai_parts_partition_input_and_output(**c: int) -> None:
    row = openai_row(**c)
    parts = openai_token_parts(row)
    inputs = ("input", "input_audio", "input_image", "cached_input", "cached_input_audio")
    assert (
        sum(parts[k] for k in inputs) + parts["cached_input_image"] + parts["cache_write"]
        == row["input_tokens"]
    )
    assert parts["output"] + parts["output_audio"] + parts["output_image"] == row["output_tokens"]
    assert all(v >= 0 for v in parts.values())


@settings(max_examples=200, deadline=None)
@given(uncached=counts, cached=counts, out=counts)
def test_openai_more_cache_hits_never_cost_more(uncached: int, cached: int, out: int) -> None:
    # aider#5516: cost(cached=100%) < cost(cached=0%); the same tokens as cache hits never cost more
    model, point = "gpt-5-2025-08-07", PricePoint()
    hits = openai_token_parts(openai_row(text=uncached, ctext=cached, otext=out))
    misses = openai_token_parts(openai_row(text=uncached + cached, otext=out))
    with_hits, _ = list_cost(BOOK, "openai", model, hits, point, DAY)
    without, _ = list_cost(BOOK, "openai", model, misses, point, DAY)
    assert with_hits <= without
    # and the hand formula, to the last digit
    expected = (D(uncached) * D("1.25") + D(cached) * D("0.125") + D(out) * D("10")) / 1_000_000
    assert with_hits == expected


@settings(max_examples=200, deadline=None)
@given(u=counts, w5=counts, w1=counts, r=counts, o=counts, tier=st.sampled_from(["standard", "batch"]))
def test_anthropic_total_is_the_sum_of_disjoint_parts(
    u: int, w5: int, w1: int, r: int, o: int, tier: str
) -> None:
    row = {
        "uncached_input_tokens": u,
        "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1},
        "cache_read_input_tokens": r,
        "output_tokens": o,
    }
    rates = {"standard": ("1", "1.25", "2", "0.1", "5"), "batch": ("0.5", "0.625", "1", "0.05", "2.5")}[tier]
    expected = sum(D(n) * D(p) for n, p in zip((u, w5, w1, r, o), rates, strict=True)) / 1_000_000
    parts = anthropic_token_parts(row)
    total, complete = list_cost(
        BOOK, "anthropic", "claude-haiku-4-5-20251001", parts, anthropic_price_point(tier, "0-200k"), DAY
    )
    assert complete and total == expected


@settings(max_examples=100, deadline=None)
@given(
    inp=st.integers(0, 10**9),
    cached=st.integers(0, 10**9),
    out=st.integers(0, 10**9),
    model=st.sampled_from(["gpt-5-2025-08-07", "gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06"]),
    tier=st.sampled_from(["default", "flex", "priority", "batch"]),
)
def test_agrees_with_genai_prices_calc_price(inp: int, cached: int, out: int, model: str, tier: str) -> None:
    # cross-check with the package's own calculator on non-tiered models (it takes cached as part of input)
    point = openai_price_point(tier, tier == "batch")
    parts = openai_token_parts(openai_row(text=inp, ctext=cached, otext=out))
    ours, _ = list_cost(BOOK, "openai", model, parts, point, DAY)
    context = {"processing": "batch"} if tier == "batch" else {"service_tier": tier}
    theirs = calc_price(
        Usage(input_tokens=inp + cached, cache_read_tokens=cached, output_tokens=out),
        model_ref=model,
        provider_id="openai",
        genai_request_timestamp=datetime(2026, 11, 20, 12, tzinfo=UTC),
        price_context=context,
    ).total_price
    assert ours == theirs
