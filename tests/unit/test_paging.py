"""`server.api.paging`: AIP-158 pages over name-ordered lists."""

from __future__ import annotations

import base64
import json

import pytest

from server.api import paging
from server.errors import InvalidInputError

NAMES = [f"item_{i:02d}" for i in range(7)]


def walk(items: list[str], page_size: int, *, default: int = 100, maximum: int = 1000) -> list[list[str]]:
    """Every page of `items`, following next_page_token until it is empty."""
    pages: list[list[str]] = []
    token = ""
    while True:
        page, token = paging.paginate(items, lambda s: s, page_size, token, default=default, maximum=maximum)
        pages.append(page)
        if not token:
            return pages
        assert len(pages) <= len(items), "paging does not end"


@pytest.mark.parametrize(
    ("page_size", "expected"),
    [
        (1, [[n] for n in NAMES]),
        (3, [NAMES[0:3], NAMES[3:6], NAMES[6:7]]),
        (7, [NAMES]),
        (8, [NAMES]),
    ],
)
def test_walking_pages_visits_every_item_once(page_size: int, expected: list[list[str]]) -> None:
    assert walk(NAMES, page_size) == expected


def test_last_page_has_an_empty_token_and_earlier_pages_do_not() -> None:
    page, token = paging.paginate(NAMES, lambda s: s, 4, "", default=100, maximum=1000)
    assert page == NAMES[:4] and token != ""
    page, token = paging.paginate(NAMES, lambda s: s, 4, token, default=100, maximum=1000)
    assert page == NAMES[4:] and token == ""


def test_exactly_full_last_page_has_no_token() -> None:
    page, token = paging.paginate(
        NAMES[:4], lambda s: s, 2, paging.encode_token(NAMES[1]), default=100, maximum=1000
    )
    assert page == NAMES[2:4]
    assert token == ""


def test_empty_list() -> None:
    assert paging.paginate([], lambda s: s, 10, "", default=100, maximum=1000) == ([], "")


def test_paging_uses_the_key_not_the_position() -> None:
    # An item inserted before the cursor between calls does not shift the next page.
    first, token = paging.paginate(NAMES, lambda s: s, 2, "", default=100, maximum=1000)
    grown = sorted([*NAMES, "item_00a"])
    second, _ = paging.paginate(grown, lambda s: s, 2, token, default=100, maximum=1000)
    assert first == NAMES[:2]
    assert second == NAMES[2:4]


def test_key_function_is_used_for_objects() -> None:
    items = [{"name": n} for n in NAMES]
    page, token = paging.paginate(items, lambda d: d["name"], 2, "", default=100, maximum=1000)
    assert page == items[:2]
    assert paging.decode_token(token) == NAMES[1]


@pytest.mark.parametrize("after", ["item_03", "", "ünïcödé/with spaces", "x" * 500, '{"after": 1}'])
def test_tokens_round_trip_and_are_opaque(after: str) -> None:
    token = paging.encode_token(after)
    assert paging.decode_token(token) == after
    if after:
        assert after not in token
    # URL-safe: usable in a query string as is.
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_empty_token_means_first_page() -> None:
    assert paging.decode_token("") == ""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        "a",
        "%%%%",
        _b64(b"not json"),
        _b64(b"\xff\xfe\xfd"),
        _b64(json.dumps({"before": "x"}).encode()),
        _b64(json.dumps(["after"]).encode()),
        _b64(json.dumps("after").encode()),
        _b64(json.dumps(5).encode()),
        _b64(json.dumps({"after": None}).encode()),
        _b64(json.dumps({"after": 5}).encode()),
        _b64(b"[" * 100_000 + b"]" * 100_000),
    ],
)
def test_garbage_token_is_invalid_input(token: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        paging.paginate(NAMES, lambda s: s, 2, token, default=100, maximum=1000)
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert [v.field for v in caught.value.violations] == ["page_token"]


def test_negative_page_size_is_invalid_input() -> None:
    with pytest.raises(InvalidInputError) as caught:
        paging.paginate(NAMES, lambda s: s, -1, "", default=100, maximum=1000)
    assert [v.field for v in caught.value.violations] == ["page_size"]


def test_zero_page_size_means_the_default() -> None:
    page, token = paging.paginate(NAMES, lambda s: s, 0, "", default=3, maximum=1000)
    assert page == NAMES[:3]
    assert paging.decode_token(token) == NAMES[2]


def test_page_size_is_capped_at_the_maximum() -> None:
    page, token = paging.paginate(NAMES, lambda s: s, 1_000_000, "", default=2, maximum=5)
    assert page == NAMES[:5]
    assert paging.decode_token(token) == NAMES[4]
    assert walk(NAMES, 1_000_000, maximum=5) == [NAMES[:5], NAMES[5:]]


def test_default_is_capped_at_the_maximum_too() -> None:
    page, _ = paging.paginate(NAMES, lambda s: s, 0, "", default=50, maximum=4)
    assert page == NAMES[:4]
