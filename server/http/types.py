"""What the HTTP client returns, and how a paged endpoint is walked."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, Protocol

import orjson

from server.errors import TerminalError


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_json(body: bytes, *, exact: bool = True, what: str = "response") -> Any:
    """Parse a JSON body; `exact`: non-integer numbers become `Decimal` (never a float).

    Malformed JSON (or NaN/Infinity) raises TerminalError `PROVIDER_BAD_RESPONSE`, without the body.
    """
    try:
        if exact:
            return json.loads(body, parse_float=Decimal, parse_constant=_no_constant)
        return orjson.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise TerminalError(
            f"{what}: the body is not valid JSON ({len(body)} bytes)", reason="PROVIDER_BAD_RESPONSE"
        ) from exc


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete response: status, headers (lower-case names), body bytes, the redacted URL."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str

    def json(self, *, exact: bool = True) -> Any:
        """The body parsed as JSON (see `parse_json`)."""
        return parse_json(self.body, exact=exact, what=self.url)


class StreamedResponse(Protocol):
    """A response whose body is read in chunks (large exports)."""

    @property
    def status(self) -> int:
        """The HTTP status."""
        ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Response headers, lower-case names."""
        ...

    @property
    def url(self) -> str:
        """The redacted URL."""
        ...

    def chunks(self, size: int = 65536) -> AsyncIterator[bytes]:
        """The body, chunk by chunk."""
        ...


@dataclass(frozen=True, slots=True)
class Paging:
    """How a list endpoint is paged. Fields are dotted paths into the JSON body (`meta.next`).

    - `cursor`: the body's `next_field` holds a cursor sent back as query parameter `param`; when
      `has_more_field` is set the walk stops once it is false (OpenAI, Anthropic: `has_more`, `next_page`
      -> `page`).
    - `page_token`: like `cursor` with no has-more flag; an absent or empty token ends the walk (Google:
      `nextPageToken` -> `pageToken`).
    - `header_cursor`: like `cursor`, the cursor read from the response header `next_field`.
    - `next_url`: the body's `next_field` holds the next page's URL (absolute or relative to the
      provider); with `next_field=""` the `Link: <...>; rel="next"` header is followed instead.
    - `offset` / `page_number`: query parameter `param` starts at `start` and grows by the number of
      records of each page (offset) or by one (page number); `size_param` carries `page_size`. The walk
      ends at an empty page, or a page with fewer than `page_size` records (when `page_size` is set);
      `records_field` says where a page's records are ("": the body is the list).
    """

    style: Literal["cursor", "page_token", "header_cursor", "next_url", "offset", "page_number"]
    next_field: str = ""
    param: str = ""
    has_more_field: str = ""
    records_field: str = ""
    size_param: str = ""
    page_size: int = 0
    start: int = 0

    def __post_init__(self) -> None:
        if self.style in ("cursor", "page_token", "header_cursor") and not (self.next_field and self.param):
            raise ValueError(f"{self.style} paging needs next_field and param")
        if self.style in ("offset", "page_number") and not self.param:
            raise ValueError(f"{self.style} paging needs param")


def dig(body: Any, path: str) -> Any:
    """The value at a dotted path of a JSON body, or None."""
    value = body
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
