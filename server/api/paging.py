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
        raise InvalidInputError(
            "invalid page token",
            [FieldViolation("page_token", "not a token from this API")],
            reason="INVALID_PAGE_TOKEN",
        ) from exc


def paginate(
    items: Sequence[T], key: Callable[[T], str], page_size: int, token: str, *, default: int, maximum: int
) -> tuple[list[T], str]:
    """The page of `items` (ordered by `key`) after the token, and the next token ('' on the last page)."""
    if page_size < 0:
        raise InvalidInputError("page_size must not be negative", [FieldViolation("page_size", "negative")])
    size = min(page_size or default, maximum)
    after = decode_token(token)
    remaining = [i for i in items if key(i) > after]
    page = remaining[:size]
    return page, encode_token(key(page[-1])) if len(remaining) > size else ""
