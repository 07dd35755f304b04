"""A local provider sandbox: real HTTP servers speaking the OpenAI and Anthropic admin usage/cost protocols.

Tests, benchmarks and `make run` use the same servers (no provider account needed). Usage is synthetic and
deterministic (a hash of admin key, day and dimensions), and the costs are consistent with it: every cost
line is a usage count times the sandbox's own price, so the cost API and the usage API agree to the cent's
smallest unit, except long-context traffic (only in the OpenAI cost API, as with the real one) and
Anthropic Priority Tier usage (never in its cost report, as with the real one).

Protocol, as documented by the providers (1-day buckets only):
- OpenAI: `GET /v1/organization/usage/{endpoint}` (ten endpoints), `GET /v1/organization/costs` and
  `GET /v1/organization/projects`; `Authorization: Bearer <admin key>`; `start_time` (inclusive) /
  `end_time` (exclusive) in Unix seconds, `limit` buckets per page, `page` = the previous `next_page`,
  `group_by` as repeated keys or `group_by[]`. Cost amounts are JSON numbers in USD.
- Anthropic: `GET /v1/organizations/usage_report/messages` and `GET /v1/organizations/cost_report`;
  `x-api-key` and `anthropic-version` headers; RFC 3339 `starting_at` / `ending_at`, `group_by[]`;
  cost amounts are decimal strings in cents.
Buckets without usage come back with `results: []`; every result carries an unknown extra field
(`sandbox_note`), as new provider fields do.

Failure modes are switched per server with `faults.add(path_part, kind, times)`: `429` (with
`Retry-After`), `500`, `503`, `malformed` (a 200 whose body is cut), `repeat_cursor` (the next page names
the page just served), `401`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from aiohttp import web

DAY = 86_400
MTOK = Decimal(1_000_000)


def _h(*parts: object) -> int:
    """A stable 64-bit number from the parts (the sandbox's only source of variation)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _dumps(value: Any) -> bytes:
    """JSON where Decimals are written as JSON numbers, digit for digit (the way providers send money)."""
    marker = "\x00D"

    def default(obj: Any) -> Any:
        if isinstance(obj, Decimal):
            return f"{marker}{obj:f}"
        raise TypeError(type(obj).__name__)

    text = json.dumps(value, default=default, separators=(",", ":"))
    return re.sub(r'"\\u0000D([-0-9.]+)"', r"\1", text).encode()


# --- failure modes -----------------------------------------------------------------------------------------


@dataclass
class Fault:
    path_part: str
    kind: str
    times: int
    retry_after: int = 1


@dataclass
class Faults:
    """Failure modes to serve, each for `times` matching requests (then the server behaves again)."""

    items: list[Fault] = field(default_factory=list)
    served: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path_part: str, kind: str, times: int = 1, retry_after: int = 1) -> None:
        if kind not in {"429", "500", "503", "malformed", "repeat_cursor", "401"}:
            raise ValueError(f"unknown fault {kind}")
        self.items.append(Fault(path_part, kind, times, retry_after))

    def clear(self) -> None:
        self.items.clear()

    def take(self, path: str, kinds: Iterable[str]) -> Fault | None:
        wanted = set(kinds)
        for fault in self.items:
            if fault.kind in wanted and fault.path_part in path and fault.times > 0:
                fault.times -= 1
                self.served.append((path, fault.kind))
                return fault
        return None


# --- paging over day buckets -------------------------------------------------------------------------------


def _page_token(index: int) -> str:
    return "page_" + base64.urlsafe_b64encode(f"bucket:{index}".encode()).decode()


def _page_index(token: str) -> int:
    try:
        return int(base64.urlsafe_b64decode(token.removeprefix("page_").encode()).decode().split(":")[1])
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise Reply(web.Response(status=400, text="invalid page")) from exc


def _days(start: date, end_exclusive: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((end_exclusive - start).days)]


def _multi(request: web.Request, name: str) -> list[str]:
    """A repeated query key, in either encoding (`k=a&k=b` or `k[]=a&k[]=b`)."""
    return [*request.query.getall(name, []), *request.query.getall(f"{name}[]", [])]


def _int(request: web.Request, name: str, default: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise Reply(web.Response(status=400, text=f"{name} is required"))
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise Reply(web.Response(status=400, text=f"{name} must be an integer")) from exc


def _aggregate(
    records: Iterable[dict[str, Any]], dims: tuple[str, ...], group_by: list[str], metrics: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Sum the metrics of the records per requested group; ungrouped dimensions come back null."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rec in records:
        key = tuple(rec[d] if d in group_by else None for d in dims)
        row = out.get(key)
        if row is None:
            row = out[key] = {d: rec[d] if d in group_by else None for d in dims} | dict.fromkeys(metrics, 0)
        for m in metrics:
            row[m] += rec[m]
    return list(out.values())


# --- OpenAI ------------------------------------------------------------------------------------------------


# The sandbox's OpenAI prices, USD per 1M tokens: (input, cached input, cache write, output).
def _d(*values: str) -> tuple[Decimal, ...]:
    return tuple(map(Decimal, values))


OPENAI_PRICES: dict[tuple[str, str], tuple[Decimal, ...]] = {
    ("gpt-4o-mini-2024-07-18", "default"): _d("0.15", "0.075", "0.15", "0.6"),
    ("gpt-4o-mini-2024-07-18", "batch"): _d("0.075", "0.075", "0.075", "0.3"),
    ("gpt-5.5-2026-04-23", "default"): _d("5", "0.5", "5", "30"),
    ("gpt-5.5-2026-04-23", "batch"): _d("2.5", "0.25", "2.5", "15"),
    ("gpt-5.5-2026-04-23", "flex"): _d("2.5", "0.25", "2.5", "15"),
    ("gpt-5.5-2026-04-23", "priority"): _d("12.5", "1.25", "12.5", "75"),
    ("text-embedding-3-small", "default"): _d("0.02", "0.02", "0.02", "0.02"),
}
OPENAI_LONG_CONTEXT = {"input": Decimal(2), "cached input": Decimal(2), "output": Decimal("1.5")}
OPENAI_PROJECTS = (("proj_sandbox_alpha", "Alpha", None), ("proj_sandbox_beta", "Beta", 1_700_000_000))
# (model, batch, service_tier) combinations the sandbox uses
OPENAI_COMBOS = (
    ("gpt-4o-mini-2024-07-18", False, "default"),
    ("gpt-4o-mini-2024-07-18", True, "default"),
    ("gpt-5.5-2026-04-23", False, "default"),
    ("gpt-5.5-2026-04-23", True, "default"),
    ("gpt-5.5-2026-04-23", False, "flex"),
    ("gpt-5.5-2026-04-23", False, "priority"),
)
COMPLETION_METRICS = (
    "input_tokens",
    "input_cached_tokens",
    "input_cache_write_tokens",
    "input_uncached_tokens",
    "input_text_tokens",
    "input_audio_tokens",
    "input_image_tokens",
    "input_cached_text_tokens",
    "input_cached_audio_tokens",
    "input_cached_image_tokens",
    "output_tokens",
    "output_text_tokens",
    "output_audio_tokens",
    "output_image_tokens",
    "num_model_requests",
)
USER_DIMS = ("project_id", "user_id", "api_key_id", "model")


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI usage endpoint: result object, dimensions (group_by values) and metric fields."""

    object: str
    dims: tuple[str, ...]
    metrics: tuple[str, ...]


OPENAI_ENDPOINTS: dict[str, Endpoint] = {
    "completions": Endpoint(
        "organization.usage.completions.result", (*USER_DIMS, "batch", "service_tier"), COMPLETION_METRICS
    ),
    "embeddings": Endpoint(
        "organization.usage.embeddings.result", USER_DIMS, ("input_tokens", "num_model_requests")
    ),
    "moderations": Endpoint(
        "organization.usage.moderations.result", USER_DIMS, ("input_tokens", "num_model_requests")
    ),
    "images": Endpoint(
        "organization.usage.images.result", (*USER_DIMS, "size", "source"), ("images", "num_model_requests")
    ),
    "audio_speeches": Endpoint(
        "organization.usage.audio_speeches.result", USER_DIMS, ("characters", "num_model_requests")
    ),
    "audio_transcriptions": Endpoint(
        "organization.usage.audio_transcriptions.result", USER_DIMS, ("seconds", "num_model_requests")
    ),
    "vector_stores": Endpoint("organization.usage.vector_stores.result", ("project_id",), ("usage_bytes",)),
    "code_interpreter_sessions": Endpoint(
        "organization.usage.code_interpreter_sessions.result", ("project_id",), ("num_sessions",)
    ),
    "file_search_calls": Endpoint(
        "organization.usage.file_searches.result",
        ("project_id", "user_id", "api_key_id", "vector_store_id"),
        ("num_requests",),
    ),
    "web_search_calls": Endpoint(
        "organization.usage.web_searches.result",
        ("project_id", "user_id", "api_key_id", "model", "context_level"),
        ("num_model_requests", "num_requests"),
    ),
}


def _empty_day(seed: str, day: date) -> bool:
    """Every seventh day of an org has no usage at all (empty buckets prove zero)."""
    return _h(seed, "empty", day) % 7 == 0


def openai_completions(seed: str, day: date) -> Iterator[dict[str, Any]]:
    """The finest-grained completions records of one day (then aggregated per requested group_by)."""
    if _empty_day(seed, day):
        return
    for project, _, _ in OPENAI_PROJECTS:
        for model, batch, tier in OPENAI_COMBOS:
            h = _h(seed, day, project, model, batch, tier)
            if h % 5 == 0:
                continue  # not used that day
            text = (h % 9_000 + 100) * 100
            audio = (h >> 8) % 3 * 1_000 if not batch else 0
            image = (h >> 12) % 4 * 500
            cached_text = (h >> 16) % 5_000 * 100
            cached_audio = 0
            cached_image = (h >> 20) % 3 * 200
            cache_write = (h >> 24) % 4 * 1_000 if model.startswith("gpt-5") else 0
            out_text = (h >> 28) % 3_000 * 100 + 100
            out_audio = (h >> 32) % 2 * 300 if not batch else 0
            uncached = text + audio + image
            cached = cached_text + cached_audio + cached_image
            yield {
                "project_id": project,
                "user_id": f"user_{h % 3}",
                "api_key_id": f"key_{project[-5:]}_{h % 2}",
                "model": model,
                "batch": batch,
                "service_tier": tier,
                "input_tokens": uncached + cached + cache_write,
                "input_cached_tokens": cached,
                "input_cache_write_tokens": cache_write,
                "input_uncached_tokens": uncached,
                "input_text_tokens": text,
                "input_audio_tokens": audio,
                "input_image_tokens": image,
                "input_cached_text_tokens": cached_text,
                "input_cached_audio_tokens": cached_audio,
                "input_cached_image_tokens": cached_image,
                "output_tokens": out_text + out_audio,
                "output_text_tokens": out_text,
                "output_audio_tokens": out_audio,
                "output_image_tokens": 0,
                "num_model_requests": h % 500 + 1,
            }


def openai_long_context(seed: str, day: date, project: str) -> dict[str, int]:
    """Tokens of gpt-5.5 default-tier requests over 272K on that day (part of the usage counts above)."""
    h = _h(seed, "long", day, project)
    if h % 3 != 0:
        return {}
    return {
        "input": (h % 50 + 1) * 1_000,
        "cached input": (h >> 8) % 20 * 1_000,
        "output": (h >> 16) % 9 * 100,
    }


def openai_other(seed: str, endpoint: str, day: date) -> Iterator[dict[str, Any]]:
    """Records of the endpoints other than completions (a few per project and day)."""
    if _empty_day(seed, day):
        return
    spec = OPENAI_ENDPOINTS[endpoint]
    for project, _, _ in OPENAI_PROJECTS:
        h = _h(seed, day, project, endpoint)
        if h % 4 == 0:
            continue
        rec: dict[str, Any] = {
            "project_id": project,
            "user_id": f"user_{h % 3}",
            "api_key_id": f"key_{project[-5:]}_{h % 2}",
            "model": {"embeddings": "text-embedding-3-small", "moderations": "omni-moderation-latest"}.get(
                endpoint, "gpt-image-1" if endpoint == "images" else "tts-1"
            ),
            "size": "1024x1024",
            "source": "image.generation",
            "vector_store_id": f"vs_{h % 2}",
            "context_level": ("low", "medium", "high")[h % 3],
        }
        for i, metric in enumerate(spec.metrics):
            rec[metric] = (h >> (8 * i)) % 1_000 + 1
        yield {k: rec[k] for k in (*spec.dims, *spec.metrics)}


def openai_cost_lines(seed: str, day: date) -> Iterator[dict[str, Any]]:
    """Cost lines of one day: (project, api key, line item, amount, quantity), from the usage and prices."""
    per_line: dict[tuple[str, str, str], int] = {}
    for rec in openai_completions(seed, day):
        tier = "batch" if rec["batch"] else rec["service_tier"]
        prefix = "" if tier == "default" else f"{tier} | "
        model = rec["model"]
        parts = {
            "input": rec["input_uncached_tokens"],
            "cached input": rec["input_cached_tokens"],
            "cache writes": rec["input_cache_write_tokens"],
            "output": rec["output_tokens"],
        }
        if model.startswith("gpt-5.5") and tier == "default":
            for cls, tokens in openai_long_context(seed, day, rec["project_id"]).items():
                key = (rec["project_id"], rec["api_key_id"], f"{model}, {cls}, long context")
                per_line[key] = per_line.get(key, 0) + min(tokens, parts[cls])
                parts[cls] -= min(tokens, parts[cls])
        for cls, tokens in parts.items():
            if tokens:
                key = (rec["project_id"], rec["api_key_id"], f"{prefix}{model}, {cls}")
                per_line[key] = per_line.get(key, 0) + tokens
    for rec in openai_other(seed, "embeddings", day):  # moderations are free: no cost line
        key = (rec["project_id"], rec["api_key_id"], f"{rec['model']}, input")
        per_line[key] = per_line.get(key, 0) + rec["input_tokens"]
    for (project, key_id, line_item), tokens in sorted(per_line.items()):
        yield {
            "project_id": project,
            "api_key_id": key_id,
            "line_item": line_item,
            "quantity": tokens,
            "amount": openai_line_amount(line_item, tokens),
        }


def openai_line_amount(line_item: str, tokens: int) -> Decimal:
    """What the sandbox bills for a line item: tokens x its price (x the long-context factor)."""
    tier, _, rest = line_item.rpartition(" | ")
    model, cls, *long = [p.strip() for p in rest.split(",")]
    prices = OPENAI_PRICES[(model, tier or "default")]
    rate = prices[("input", "cached input", "cache writes", "output").index(cls)]
    if long:
        rate *= OPENAI_LONG_CONTEXT[cls]
    return tokens * rate / MTOK


class Reply(Exception):
    """An error response raised from inside a handler (turned back into the response by `_replies`)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


@web.middleware
async def _replies(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except Reply as reply:
        return reply.response
    return response


def _openai_error(status: int, message: str, kind: str, code: str | None = None) -> Reply:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return Reply(web.Response(status=status, body=_dumps(body), content_type="application/json"))


class OpenAISandbox:
    """The OpenAI organization admin endpoints over synthetic usage (one data set per admin key)."""

    def __init__(self, keys: Mapping[str, str], faults: Faults, today: Callable[[], date]) -> None:
        self.keys = dict(keys)  # admin key -> seed
        self.faults = faults
        self.today = today
        self.requests: list[tuple[str, dict[str, list[str]]]] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/organization/usage/{endpoint}", self.usage)
        app.router.add_get("/v1/organization/costs", self.costs)
        app.router.add_get("/v1/organization/projects", self.projects)

    def _seed(self, request: web.Request) -> str:
        self.requests.append((request.path, {k: request.query.getall(k) for k in request.query}))
        fault = self.faults.take(request.path, ("401", "429", "500", "503"))
        if fault is not None:
            raise _fault_response(fault, _openai_error)
        auth = request.headers.get("Authorization", "")
        seed = self.keys.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None
        if seed is None:
            raise _openai_error(401, "Incorrect API key provided.", "invalid_request_error", "bad_key")
        return seed

    def _window(self, request: web.Request, max_limit: int) -> tuple[list[date], int]:
        start = _int(request, "start_time")
        end = _int(request, "end_time", int(_midnight(self.today() + timedelta(days=1))))
        if request.query.get("bucket_width", "1d") != "1d":
            raise _openai_error(400, "the sandbox serves 1d buckets only", "invalid_request_error")
        limit = _int(request, "limit", 7)
        if not 1 <= limit <= max_limit:
            raise _openai_error(400, f"limit must be 1..{max_limit}", "invalid_request_error")
        first = datetime.fromtimestamp(start - start % DAY, UTC).date()
        last = datetime.fromtimestamp(end - 1, UTC).date() + timedelta(days=1)
        return _days(first, max(first, last)), limit

    async def usage(self, request: web.Request) -> web.Response:
        seed = self._seed(request)
        name = request.match_info["endpoint"]
        spec = OPENAI_ENDPOINTS.get(name)
        if spec is None:
            raise _openai_error(404, f"unknown usage endpoint {name}", "invalid_request_error")
        group_by = _multi(request, "group_by")
        if bad := [g for g in group_by if g not in spec.dims]:
            raise _openai_error(400, f"invalid group_by {bad[0]}", "invalid_request_error")
        days, limit = self._window(request, 31)

        def results(day: date) -> list[dict[str, Any]]:
            recs = openai_completions(seed, day) if name == "completions" else openai_other(seed, name, day)
            rows = _aggregate(recs, spec.dims, group_by, spec.metrics)
            return [{"object": spec.object, **r, "sandbox_note": "unknown field"} for r in rows]

        return await _bucket_page(request, self.faults, days, limit, results, _openai_bucket)

    async def costs(self, request: web.Request) -> web.Response:
        seed = self._seed(request)
        group_by = _multi(request, "group_by")
        dims = ("project_id", "line_item", "api_key_id")
        if bad := [g for g in group_by if g not in dims]:
            raise _openai_error(400, f"invalid group_by {bad[0]}", "invalid_request_error")
        days, limit = self._window(request, 180)

        def results(day: date) -> list[dict[str, Any]]:
            out: dict[tuple[Any, ...], dict[str, Any]] = {}
            for line in openai_cost_lines(seed, day):
                key = tuple(line[d] if d in group_by else None for d in dims)
                row = out.setdefault(key, {"amount": Decimal(0), "quantity": 0})
                row["amount"] += line["amount"]
                row["quantity"] += line["quantity"]
            return [
                {
                    "object": "organization.costs.result",
                    "amount": {"value": v["amount"], "currency": "usd"},
                    **dict(zip(dims, k, strict=True)),
                    "quantity": v["quantity"] if "line_item" in group_by else None,
                    "quantity_unit": "tokens" if "line_item" in group_by else None,
                    "sandbox_note": "unknown field",
                }
                for k, v in out.items()
            ]

        return await _bucket_page(request, self.faults, days, limit, results, _openai_bucket)

    async def projects(self, request: web.Request) -> web.Response:
        self._seed(request)
        limit = _int(request, "limit", 20)
        after = request.query.get("after")
        archived = request.query.get("include_archived") == "true"
        rows = [
            {
                "id": pid,
                "object": "organization.project",
                "name": name,
                "created_at": 1_690_000_000,
                "archived_at": archived_at,
                "status": "archived" if archived_at else "active",
                "residency": "GLOBAL",
            }
            for pid, name, archived_at in OPENAI_PROJECTS
            if archived or archived_at is None
        ]
        start = next((i + 1 for i, r in enumerate(rows) if r["id"] == after), 0)
        page = rows[start : start + limit]
        body = {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + limit < len(rows),
        }
        return web.Response(body=_dumps(body), content_type="application/json")


def _midnight(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def _openai_bucket(day: date, results: list[dict[str, Any]]) -> dict[str, Any]:
    start = int(_midnight(day))
    return {"object": "bucket", "start_time": start, "end_time": start + DAY, "results": results}


def _anthropic_bucket(day: date, results: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "starting_at": f"{day.isoformat()}T00:00:00Z",
        "ending_at": f"{(day + timedelta(days=1)).isoformat()}T00:00:00Z",
        "results": results,
    }


def _fault_response(fault: Fault, error: Callable[..., Reply]) -> Reply:
    if fault.kind == "401":
        return error(401, "invalid x-api-key", "authentication_error")
    if fault.kind == "429":
        reply = error(429, "Rate limit reached", "rate_limit_error")
        reply.response.headers["Retry-After"] = str(fault.retry_after)
        return reply
    return error(int(fault.kind), "The server had an error", "api_error")


async def _bucket_page(
    request: web.Request,
    faults: Faults,
    days: list[date],
    limit: int,
    results: Callable[[date], list[dict[str, Any]]],
    bucket: Callable[[date, list[dict[str, Any]]], dict[str, Any]],
) -> web.Response:
    """One page of day buckets (`limit` per page), with the page faults applied."""
    token = request.query.get("page")
    index = _page_index(token) if token else 0
    chunk = days[index : index + limit]
    # a big page is built off the event loop, like any real server would
    data = await asyncio.to_thread(lambda: [bucket(d, results(d)) for d in chunk])
    has_more = index + limit < len(days)
    next_page = _page_token(index + limit) if has_more else None
    fault = faults.take(request.path, ("repeat_cursor", "malformed"))
    if fault is not None and fault.kind == "repeat_cursor":
        has_more, next_page = True, token or _page_token(0)
    body = _dumps({"object": "page", "data": data, "has_more": has_more, "next_page": next_page})
    if fault is not None and fault.kind == "malformed":
        body = body[: len(body) // 2]
    return web.Response(body=body, content_type="application/json")


# --- Anthropic ---------------------------------------------------------------------------------------------

# USD per 1M tokens: (uncached input, 5m cache write, 1h cache write, cache read, output)
ANTHROPIC_PRICES: dict[tuple[str, str, str], tuple[Decimal, ...]] = {
    ("claude-sonnet-4-5-20250929", "standard", "0-200k"): _d("3", "3.75", "6", "0.3", "15"),
    ("claude-sonnet-4-5-20250929", "standard", "200k-1M"): _d("6", "7.5", "12", "0.6", "22.5"),
    ("claude-sonnet-4-5-20250929", "batch", "0-200k"): _d("1.5", "1.875", "3", "0.15", "7.5"),
    ("claude-haiku-4-5-20251001", "standard", "0-200k"): _d("1", "1.25", "2", "0.1", "5"),
    ("claude-haiku-4-5-20251001", "batch", "0-200k"): _d("0.5", "0.625", "1", "0.05", "2.5"),
}
ANTHROPIC_TOKEN_TYPES = (
    "uncached_input_tokens",
    "cache_creation.ephemeral_5m_input_tokens",
    "cache_creation.ephemeral_1h_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)
ANTHROPIC_WORKSPACES = ("wrkspc_sandbox_prod", None)  # None: the Default workspace
ANTHROPIC_DIMS = (
    "workspace_id",
    "api_key_id",
    "account_id",
    "service_account_id",
    "model",
    "service_tier",
    "context_window",
    "inference_geo",
)
ANTHROPIC_METRICS = (*ANTHROPIC_TOKEN_TYPES, "web_search_requests")
ANTHROPIC_COMBOS = (
    ("claude-sonnet-4-5-20250929", "standard", "0-200k"),
    ("claude-sonnet-4-5-20250929", "standard", "200k-1M"),
    ("claude-sonnet-4-5-20250929", "batch", "0-200k"),
    ("claude-sonnet-4-5-20250929", "priority", "0-200k"),
    ("claude-haiku-4-5-20251001", "standard", "0-200k"),
    ("claude-haiku-4-5-20251001", "batch", "0-200k"),
)
WEB_SEARCH_CENTS = Decimal(1)  # $10 per 1,000 searches


def anthropic_records(seed: str, day: date) -> Iterator[dict[str, Any]]:
    """The finest-grained messages usage records of one day."""
    if _empty_day(seed, day):
        return
    for workspace in ANTHROPIC_WORKSPACES:
        for model, tier, window in ANTHROPIC_COMBOS:
            h = _h(seed, day, workspace, model, tier, window)
            if h % 5 == 0:
                continue
            rec: dict[str, Any] = {
                "workspace_id": workspace,
                "api_key_id": f"apikey_{h % 2}",
                "account_id": None,
                "service_account_id": None,
                "model": model,
                "service_tier": tier,
                "context_window": window,
                "inference_geo": "not_available",
                "web_search_requests": (h >> 40) % 3 if tier == "standard" else 0,
            }
            for i, token_type in enumerate(ANTHROPIC_TOKEN_TYPES):
                rec[token_type] = (h >> (8 * i)) % 200 * 1_000
            yield rec


def anthropic_cost_lines(seed: str, day: date) -> Iterator[dict[str, Any]]:
    """Cost report rows of one day, finest grain: per workspace, model, tier, window and token type."""
    for rec in anthropic_records(seed, day):
        if rec["service_tier"] == "priority":
            continue  # paid through the commitment: never in the cost report
        prices = ANTHROPIC_PRICES[(rec["model"], rec["service_tier"], rec["context_window"])]
        name = "Claude Sonnet 4.5" if "sonnet" in rec["model"] else "Claude Haiku 4.5"
        tier = rec["service_tier"]
        for token_type, price in zip(ANTHROPIC_TOKEN_TYPES, prices, strict=True):
            if rec[token_type]:
                yield {
                    "workspace_id": rec["workspace_id"],
                    "description": f"{name} Usage - {token_type} ({tier}, {rec['context_window']})",
                    "cost_type": "tokens",
                    "model": rec["model"],
                    "service_tier": rec["service_tier"],
                    "context_window": rec["context_window"],
                    "token_type": token_type,
                    "cents": rec[token_type] * price * 100 / MTOK,
                }
        if rec["web_search_requests"]:
            yield {
                "workspace_id": rec["workspace_id"],
                "description": "Web Search Usage",
                "cost_type": "web_search",
                "model": None,
                "service_tier": None,
                "context_window": None,
                "token_type": None,
                "cents": rec["web_search_requests"] * WEB_SEARCH_CENTS,
            }


def _anthropic_error(status: int, message: str, kind: str, code: str | None = None) -> Reply:
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_sandbox"}
    return Reply(web.Response(status=status, body=_dumps(body), content_type="application/json"))


class AnthropicSandbox:
    """Anthropic's legacy admin usage and cost report over synthetic usage."""

    def __init__(self, keys: Mapping[str, str], faults: Faults, today: Callable[[], date]) -> None:
        self.keys = dict(keys)
        self.faults = faults
        self.today = today
        self.requests: list[tuple[str, dict[str, list[str]]]] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/organizations/usage_report/messages", self.messages)
        app.router.add_get("/v1/organizations/cost_report", self.cost_report)
        app.router.add_get("/v1/organizations/users", self.users)

    def _seed(self, request: web.Request) -> str:
        self.requests.append((request.path, {k: request.query.getall(k) for k in request.query}))
        fault = self.faults.take(request.path, ("401", "429", "500", "503"))
        if fault is not None:
            raise _fault_response(fault, _anthropic_error)
        seed = self.keys.get(request.headers.get("x-api-key", ""))
        if seed is None:
            raise _anthropic_error(401, "invalid x-api-key", "authentication_error")
        if not request.headers.get("anthropic-version"):
            raise _anthropic_error(400, "anthropic-version header is required", "invalid_request_error")
        return seed

    def _window(self, request: web.Request) -> tuple[list[date], int]:
        try:
            start = datetime.fromisoformat(request.query["starting_at"].replace("Z", "+00:00"))
            raw_end = request.query.get("ending_at")
            end = (
                datetime.fromisoformat(raw_end.replace("Z", "+00:00"))
                if raw_end
                else datetime.fromtimestamp(_midnight(self.today() + timedelta(days=1)), UTC)
            )
        except (KeyError, ValueError) as exc:
            raise _anthropic_error(400, "starting_at must be RFC 3339", "invalid_request_error") from exc
        if request.query.get("bucket_width", "1d") != "1d":
            raise _anthropic_error(400, "the sandbox serves 1d buckets only", "invalid_request_error")
        limit = _int(request, "limit", 7)
        if not 1 <= limit <= 31:
            raise _anthropic_error(400, "limit must be 1..31", "invalid_request_error")
        first = start.astimezone(UTC).date()
        last = (end.astimezone(UTC) - timedelta(microseconds=1)).date() + timedelta(days=1)
        return _days(first, max(first, last)), limit

    async def messages(self, request: web.Request) -> web.Response:
        seed = self._seed(request)
        group_by = _multi(request, "group_by")
        if bad := [g for g in group_by if g not in ANTHROPIC_DIMS]:
            raise _anthropic_error(400, f"invalid group_by {bad[0]}", "invalid_request_error")
        days, limit = self._window(request)

        def results(day: date) -> list[dict[str, Any]]:
            rows = _aggregate(anthropic_records(seed, day), ANTHROPIC_DIMS, group_by, ANTHROPIC_METRICS)
            return [
                {
                    "uncached_input_tokens": r["uncached_input_tokens"],
                    "cache_creation": {
                        "ephemeral_5m_input_tokens": r["cache_creation.ephemeral_5m_input_tokens"],
                        "ephemeral_1h_input_tokens": r["cache_creation.ephemeral_1h_input_tokens"],
                    },
                    "cache_read_input_tokens": r["cache_read_input_tokens"],
                    "output_tokens": r["output_tokens"],
                    "server_tool_use": {"web_search_requests": r["web_search_requests"]},
                    **{d: r[d] for d in ANTHROPIC_DIMS},
                    "sandbox_note": "unknown field",
                }
                for r in rows
            ]

        return await _bucket_page(request, self.faults, days, limit, results, _anthropic_bucket)

    async def users(self, request: web.Request) -> web.Response:
        """One user: what `credentials test` calls to check a key."""
        self._seed(request)
        user = {"id": "user_sandbox", "type": "user", "email": "admin@example.com", "role": "admin"}
        body = {"data": [user], "has_more": False, "first_id": "user_sandbox", "last_id": "user_sandbox"}
        return web.Response(body=_dumps(body), content_type="application/json")

    async def cost_report(self, request: web.Request) -> web.Response:
        seed = self._seed(request)
        group_by = _multi(request, "group_by")
        if bad := [g for g in group_by if g not in ("workspace_id", "description")]:
            raise _anthropic_error(400, f"invalid group_by {bad[0]}", "invalid_request_error")
        days, limit = self._window(request)
        detail = ("cost_type", "model", "service_tier", "context_window", "token_type")

        def results(day: date) -> list[dict[str, Any]]:
            out: dict[tuple[Any, ...], dict[str, Any]] = {}
            for line in anthropic_cost_lines(seed, day):
                key = (
                    line["workspace_id"] if "workspace_id" in group_by else None,
                    line["description"] if "description" in group_by else None,
                )
                row = out.get(key)
                if row is None:
                    row = out[key] = {
                        "workspace_id": key[0],
                        "description": key[1],
                        **{d: line[d] if "description" in group_by else None for d in detail},
                        "cents": Decimal(0),
                    }
                row["cents"] += line["cents"]
            return [
                {
                    "currency": "USD",
                    "amount": f"{r.pop('cents'):f}",
                    "inference_geo": None,
                    **r,
                    "sandbox_note": "unknown field",
                }
                for r in out.values()
            ]

        return await _bucket_page(request, self.faults, days, limit, results, _anthropic_bucket)


# --- the server --------------------------------------------------------------------------------------------


class ProviderSandbox:
    """Both sandboxes on one aiohttp server (127.0.0.1, a free port unless given)."""

    def __init__(
        self,
        openai_keys: Mapping[str, str] | None = None,
        anthropic_keys: Mapping[str, str] | None = None,
        today: Callable[[], date] | None = None,
    ) -> None:
        self.faults = Faults()
        clock = today or (lambda: datetime.now(UTC).date())
        self.openai = OpenAISandbox(openai_keys or {}, self.faults, clock)
        self.anthropic = AnthropicSandbox(anthropic_keys or {}, self.faults, clock)
        self.app = web.Application(middlewares=[_replies])
        self.openai.routes(self.app)
        self.anthropic.routes(self.app)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> ProviderSandbox:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
