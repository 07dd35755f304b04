"""AIP-158 paging over name-ordered lists with opaque tokens (base64 JSON cursors;
a forged token can only move the cursor within the caller's own list)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import TypeVar

from server.errors import FieldViolation, InvalidInputError

T = TypeVar("T")


def encode_token(after: str) -> str:
    """An opaque token meaning 'the items after `after`'."""
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode().rstrip("=")


def invalid_token() -> InvalidInputError:
    """The error for a page token this API did not issue."""
    return InvalidInputError(
        "invalid page token",
        [FieldViolation("page_token", "not a token from this API")],
        reason="INVALID_PAGE_TOKEN",
    )


def page_size(requested: int, *, default: int, maximum: int) -> int:
    """The page size to use: `default` for 0, capped at `maximum`; negative sizes are refused."""
    if requested < 0:
        raise InvalidInputError("page_size must not be negative", [FieldViolation("page_size", "negative")])
    return min(requested or default, maximum)


def decode_token(token: str) -> str:
    """The key a token points after; InvalidInputError for anything this API did not issue."""
    if not token:
        return ""
    try:
        after = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))["after"]
        if not isinstance(after, str):
            raise TypeError("the token's key is not a string")
        return after
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError) as exc:
        raise invalid_token() from exc


def paginate(
    items: Sequence[T], key: Callable[[T], str], requested: int, token: str, *, default: int, maximum: int
) -> tuple[list[T], str]:
    """The page of `items` (ordered by `key`) after the token, and the next token ('' on the last page)."""
    size = page_size(requested, default=default, maximum=maximum)
    after = decode_token(token)
    remaining = [i for i in items if key(i) > after]
    page = remaining[:size]
    return page, encode_token(key(page[-1])) if len(remaining) > size else ""
