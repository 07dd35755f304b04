"""`generic.api_extractor`: any paged JSON REST API into a table of the org, declared in the step's config.

The config is validated when the pipeline is loaded (unknown keys, missing options of the chosen auth or
pagination type, a primary key that is not a column, a path without `{parent}` under `for_each`, ... are
load errors). Calls go through the one HTTP client: the registry `provider` gives the base URL (a path
here is relative to it; absolute URLs elsewhere are refused), rate limits, concurrency, retries of
429/5xx/timeouts with Retry-After, response size caps and the page guards.

```yaml
- step_id: invoices
  ps_type: generic.api_extractor
  config:
    provider: generic            # registry provider (configs/system/providers.yml); default generic
    credential: default          # the org's credential of that provider; it holds the secrets below
    request:
      path: /v1/invoices         # relative to the provider's base URL; `{parent}` under for_each
      params: {status: paid}     # static query parameters (values are strings)
      headers: {Accept: application/json}   # static headers (no Authorization: that is `auth`)
    auth:                        # one of:
      type: none
      # type: bearer,  field: token                       -> Authorization: Bearer <token>
      # type: header,  name: X-Api-Key, field: token      -> X-Api-Key: <token>
      # type: query,   name: api_key, field: token        -> ?api_key=<token> (redacted in every log)
      # type: basic,   username_field: username, password_field: password
      # type: oauth2_client_credentials, token_url: /oauth/token, client_id_field: client_id,
      #       client_secret_field: client_secret, scopes: [read]
      #       (RFC 6749 4.4 with HTTP Basic client auth; the token is cached until a minute before it
      #        expires, minted once for concurrent calls, and minted again once after a 401)
    pagination:                  # one of:
      type: none                 # a single request
      # type: cursor,        cursor_path: meta.next_cursor, cursor_param: cursor, has_more_path: meta.has_more
      #                      (stops at an empty cursor, or when has_more_path is false)
      # type: header_cursor, cursor_header: X-Next-Cursor, cursor_param: cursor
      # type: next_url,      next_url_path: links.next    (absolute, or relative to the provider)
      # type: link_header                                  (Link: <...>; rel="next")
      # type: offset,        param: offset, size_param: limit, page_size: 100, start: 0
      # type: page_number,   param: page, size_param: per_page, page_size: 100, start: 1
      #                      (offset/page_number stop at an empty page or one shorter than page_size)
      max_pages: 1000            # more pages is PAGINATION_LIMIT (at most the provider's max_pages)
    records: $.data[*]           # where a page's records are: $ (the body is the list), $.a.b[*] or a.b
    for_each:                    # optional fan-out: one walk (a fresh paginator) per parent value
      values: [acct_1, acct_2]   # static values, or a parent listing:
      # path: /v1/accounts, records: $.data[*], field: id, pagination: {...}
    incremental:                 # optional: only records changed since the last successful run
      cursor_path: updated_at    # in each record
      param: updated_since       # query parameter that carries the lower bound
      kind: timestamp            # timestamp (ISO 8601, sent as ...Z) | integer
      initial_value: "2024-01-01T00:00:00Z"
      lag_seconds: 3600          # re-read this much before the stored cursor (late writes); the stored
                                 # cursor never passes now - lag (timestamps)
    table: vendor_invoices       # target table of the org dataset (created from `columns` if missing)
    primary_key: [id]            # rows are merged on it (load into a staging table, then one MERGE)
    columns:                     # the schema contract
      - {name: id, type: STRING, required: true}            # path defaults to the name
      - {name: amount, type: NUMERIC, path: total.amount}   # dotted path into the record
      - {name: updated_at, type: TIMESTAMP}
    unknown_fields: keep         # keep: top-level fields no column reads go to the JSON column x_extra;
                                 # reject: such a field fails the step (SCHEMA_CONTRACT_VIOLATION)
```

Types: STRING, INT64, NUMERIC (exact: numbers are parsed as Decimal by the client; more than 9
decimals is a violation, never rounded), BOOL, TIMESTAMP (ISO 8601 or epoch seconds, UTC), DATE, JSON.
A record whose value does not fit its column, or lacks a required one, fails the step with
`SCHEMA_CONTRACT_VIOLATION` (the message names the column, never the value). Records with the same key in
one run: the last one read wins.

State: the incremental cursor is kept per org (the org dataset's `api_extractor_state`), pipeline, step
and parent, as an append-only log read latest-first; it is written only after the MERGE succeeded, so a
failed run re-reads the same window next time (the MERGE makes that harmless). Lineage columns:
`x_parent` (the for_each value, "" without), `x_pipeline_id`, `x_run_id`, `x_ingested_at`.

Errors: `CREDENTIAL_NOT_FOUND`, `CREDENTIAL_REJECTED` (401/403, or the token endpoint refused),
`PROVIDER_REJECTED`, `PROVIDER_RATE_LIMITED`/`PROVIDER_UNAVAILABLE` (retries spent), `PAGINATION_LOOP`
(a cursor, URL or whole page seen before), `PAGINATION_LIMIT`, `PROVIDER_BAD_RESPONSE`,
`SCHEMA_CONTRACT_VIOLATION`. Outputs: `rows_written` (rows merged), `pages`, `records`, `cursors`.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, model_validator

from processors.base import Auth, Credential, Paging, StepContext, TableSchema, parse_config
from server.errors import TerminalError
from server.providers import (
    ApiKeyHeaderAuth,
    ApiKeyQueryAuth,
    BasicAuth,
    BearerAuth,
    NoAuth,
    OAuth2ClientCredentialsAuth,
)
from server.warehouse.schema import load_schema

IDENT = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
DOTTED = r"^[A-Za-z_$@][A-Za-z0-9_$@-]*(\.[A-Za-z_$@][A-Za-z0-9_$@-]*)*$"
PARAM = r"^[A-Za-z_][A-Za-z0-9_.\[\]-]{0,127}$"
HEADER = r"^[A-Za-z0-9-]{1,128}$"
SELECTOR = r"^(\$(\.[A-Za-z_][A-Za-z0-9_-]*)*(\[\*\])?|[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*)$"
STATE = load_schema(
    Path(__file__).resolve().parent.parent.parent / "configs" / "schemas" / "org" / "api_extractor_state.json"
)
LINEAGE = (
    {"name": "x_parent", "type": "STRING", "mode": "NULLABLE"},
    {"name": "x_pipeline_id", "type": "STRING", "mode": "REQUIRED"},
    {"name": "x_run_id", "type": "STRING", "mode": "REQUIRED"},
    {"name": "x_ingested_at", "type": "TIMESTAMP", "mode": "REQUIRED"},
)
BQ_TYPES = {
    "STRING": "STRING",
    "INT64": "INTEGER",
    "NUMERIC": "NUMERIC",
    "BOOL": "BOOLEAN",
    "TIMESTAMP": "TIMESTAMP",
    "DATE": "DATE",
    "JSON": "JSON",
}
NANO = Decimal("0.000000001")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- auth -----------------------------------------------------------------------------------------------


class NoneAuthSpec(_Strict):
    type: Literal["none"]


class BearerSpec(_Strict):
    type: Literal["bearer"]
    field: str = Field("token", pattern=IDENT)


class HeaderSpec(_Strict):
    type: Literal["header"]
    name: str = Field(pattern=HEADER)
    field: str = Field("token", pattern=IDENT)


class QuerySpec(_Strict):
    type: Literal["query"]
    name: str = Field(pattern=PARAM)
    field: str = Field("token", pattern=IDENT)


class BasicSpec(_Strict):
    type: Literal["basic"]
    username_field: str = Field("username", pattern=IDENT)
    password_field: str = Field("password", pattern=IDENT)


class OAuth2Spec(_Strict):
    type: Literal["oauth2_client_credentials"]
    token_url: str = Field(min_length=1, max_length=500)
    client_id_field: str = Field("client_id", pattern=IDENT)
    client_secret_field: str = Field("client_secret", pattern=IDENT)
    scopes: list[Annotated[str, Field(pattern=r"^\S{1,200}$")]] = Field(default_factory=list)


AuthSpec = Annotated[
    NoneAuthSpec | BearerSpec | HeaderSpec | QuerySpec | BasicSpec | OAuth2Spec, Field(discriminator="type")
]


def registry_auth(spec: NoneAuthSpec | BearerSpec | HeaderSpec | QuerySpec | BasicSpec | OAuth2Spec) -> Auth:
    """The step's auth as a registry scheme, which the HTTP client applies."""
    match spec:
        case BearerSpec():
            return BearerAuth(scheme="bearer", field=spec.field)
        case HeaderSpec():
            return ApiKeyHeaderAuth(scheme="api_key_header", field=spec.field, header=spec.name)
        case QuerySpec():
            return ApiKeyQueryAuth(scheme="api_key_query", field=spec.field, param=spec.name)
        case BasicSpec():
            return BasicAuth(
                scheme="basic", username_field=spec.username_field, password_field=spec.password_field
            )
        case OAuth2Spec():
            return OAuth2ClientCredentialsAuth(
                scheme="oauth2_client_credentials",
                token_url=spec.token_url,
                client_id_field=spec.client_id_field,
                client_secret_field=spec.client_secret_field,
                scopes=list(spec.scopes),
            )
    return NoAuth(scheme="none")


# -- pagination -----------------------------------------------------------------------------------------


class PaginationSpec(_Strict):
    type: Literal["none", "cursor", "header_cursor", "next_url", "link_header", "offset", "page_number"] = (
        "none"
    )
    cursor_path: str = Field("", pattern=DOTTED + "|^$")
    has_more_path: str = Field("", pattern=DOTTED + "|^$")
    cursor_header: str = Field("", pattern=HEADER + "|^$")
    cursor_param: str = Field("", pattern=PARAM + "|^$")
    next_url_path: str = Field("", pattern=DOTTED + "|^$")
    param: str = Field("", pattern=PARAM + "|^$")
    size_param: str = Field("", pattern=PARAM + "|^$")
    page_size: int = Field(0, ge=0, le=100_000)
    start: int | None = Field(None, ge=0)
    max_pages: int = Field(1000, ge=1, le=100_000)

    @model_validator(mode="after")
    def _needs(self) -> PaginationSpec:
        required = {
            "cursor": ("cursor_path", "cursor_param"),
            "header_cursor": ("cursor_header", "cursor_param"),
            "next_url": ("next_url_path",),
            "offset": ("param",),
            "page_number": ("param",),
        }.get(self.type, ())
        missing = [name for name in required if not getattr(self, name)]
        if missing:
            raise ValueError(f"{self.type} pagination needs {', '.join(missing)}")
        return self

    def paging(self, records: str) -> Paging | None:
        """The HTTP client's paging for this spec (None: one request)."""
        match self.type:
            case "cursor":
                return Paging("cursor", self.cursor_path, self.cursor_param, self.has_more_path)
            case "header_cursor":
                return Paging("header_cursor", self.cursor_header, self.cursor_param)
            case "next_url":
                return Paging("next_url", self.next_url_path)
            case "link_header":
                return Paging("next_url", "")
            case "offset" | "page_number":
                start = self.start if self.start is not None else (0 if self.type == "offset" else 1)
                return Paging(
                    self.type,
                    param=self.param,
                    records_field=records,
                    size_param=self.size_param,
                    page_size=self.page_size,
                    start=start,
                )
        return None


# -- the rest of the config -----------------------------------------------------------------------------


class RequestSpec(_Strict):
    path: str = Field(pattern=r"^/[^\s?#]{0,500}$")
    params: dict[Annotated[str, Field(pattern=PARAM)], Annotated[str, Field(max_length=500)]] = Field(
        default_factory=dict
    )
    headers: dict[Annotated[str, Field(pattern=HEADER)], Annotated[str, Field(max_length=500)]] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _no_auth_headers(self) -> RequestSpec:
        if any(h.lower() in ("authorization", "cookie") for h in self.headers):
            raise ValueError("Authorization and Cookie come from auth, never from headers")
        return self


class ForEachSpec(_Strict):
    values: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=1000
    )
    path: str = Field("", pattern=r"^(/[^\s?#]{0,500})?$")
    records: str = Field("$", pattern=SELECTOR)
    field: str = Field("", pattern=DOTTED + "|^$")
    pagination: PaginationSpec = PaginationSpec()

    @model_validator(mode="after")
    def _one_source(self) -> ForEachSpec:
        if bool(self.values) == bool(self.path):
            raise ValueError("give either values or a parent listing (path, records, field)")
        if self.path and not self.field:
            raise ValueError("a parent listing needs field")
        return self


class IncrementalSpec(_Strict):
    cursor_path: str = Field(pattern=DOTTED)
    param: str = Field(pattern=PARAM)
    kind: Literal["timestamp", "integer"] = "timestamp"
    initial_value: str = Field(max_length=64)
    lag_seconds: int = Field(0, ge=0, le=90 * 86400)

    @model_validator(mode="after")
    def _initial(self) -> IncrementalSpec:
        parse_cursor(self.initial_value, self.kind)  # raises ValueError
        return self


class Column(_Strict):
    name: str = Field(pattern=IDENT)
    type: Literal["STRING", "INT64", "NUMERIC", "BOOL", "TIMESTAMP", "DATE", "JSON"] = "STRING"
    path: str = Field("", pattern=DOTTED + "|^$")
    required: bool = False

    @property
    def source(self) -> str:
        return self.path or self.name


class ApiExtractorConfig(_Strict):
    """The step's config (see the module docstring)."""

    provider: str = Field("generic", pattern=r"^[a-z][a-z0-9_]*$")
    credential: str = Field("default", pattern=r"^[a-z][a-z0-9_]{0,62}$")
    request: RequestSpec
    auth: AuthSpec = NoneAuthSpec(type="none")
    pagination: PaginationSpec = PaginationSpec()
    records: str = Field("$", pattern=SELECTOR)
    for_each: ForEachSpec | None = None
    incremental: IncrementalSpec | None = None
    table: str = Field(pattern=IDENT)
    primary_key: list[Annotated[str, Field(pattern=IDENT)]] = Field(min_length=1, max_length=8)
    columns: list[Column] = Field(min_length=1, max_length=500)
    unknown_fields: Literal["keep", "reject"] = "keep"

    @model_validator(mode="after")
    def _consistent(self) -> ApiExtractorConfig:
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names) or any(n.lower().startswith("x_") for n in names):
            raise ValueError("column names must be unique and must not start with x_ (lineage)")
        missing = [k for k in self.primary_key if k not in names]
        if missing:
            raise ValueError(f"primary_key names no column: {', '.join(missing)}")
        if (self.for_each is not None) != ("{parent}" in self.request.path):
            raise ValueError("request.path holds {parent} exactly when for_each is set")
        return self


# -- values ---------------------------------------------------------------------------------------------


def selector(records: str) -> str:
    """`$.data[*]` / `data` -> the dotted path `data` ("" is the body itself)."""
    return records.removeprefix("$").removeprefix(".").removesuffix("[*]")


def dig(value: Any, path: str) -> Any:
    for part in path.split(".") if path else ():
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def records_of(body: Any, path: str) -> list[Any]:
    found = dig(body, path)
    if found is None:
        return []
    if not isinstance(found, list):
        raise TerminalError("the records selector does not point at a list", reason="PROVIDER_BAD_RESPONSE")
    return found


def parse_cursor(value: Any, kind: str) -> datetime | int:
    """A cursor value as a datetime (UTC) or an int; ValueError when it is neither."""
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int | str | Decimal):
            raise ValueError("an integer cursor must be an integer")
        return int(value)
    return timestamp(value)


def timestamp(value: Any) -> datetime:
    if isinstance(value, bool):
        raise ValueError("not a timestamp")
    if isinstance(value, int):
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, Decimal):
        seconds = int(value)
        micros = int(((value - seconds) * 1_000_000).to_integral_value())
        return datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=micros)
    if not isinstance(value, str):
        raise ValueError("not a timestamp")
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def cursor_text(value: datetime | int) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(value)


def lower_bound(inc: IncrementalSpec, stored: str | None) -> str:
    """The value of the incremental parameter: the stored cursor minus the lag, never before the initial
    value."""
    initial = parse_cursor(inc.initial_value, inc.kind)
    if stored is None:
        return cursor_text(initial)
    start = parse_cursor(stored, inc.kind)
    if isinstance(start, datetime) and isinstance(initial, datetime):
        return cursor_text(max(start - timedelta(seconds=inc.lag_seconds), initial))
    if isinstance(start, int) and isinstance(initial, int):
        return cursor_text(max(start - inc.lag_seconds, initial))
    return cursor_text(initial)  # pragma: no cover (one kind per spec)


def later(high: datetime | int | None, seen: datetime | int) -> datetime | int:
    """The greater cursor (both of the spec's kind)."""
    if high is None:
        return seen
    if isinstance(high, datetime) and isinstance(seen, datetime):
        return max(high, seen)
    if isinstance(high, int) and isinstance(seen, int):
        return max(high, seen)
    raise ValueError("mixed cursor kinds")  # pragma: no cover


def convert(value: Any, kind: str) -> Any:
    """A record's value as the column's type; ValueError when it does not fit."""
    if kind == "JSON":
        return value
    if kind == "STRING":
        if isinstance(value, dict | list):
            return json.dumps(value, default=str, separators=(",", ":"))
        return "true" if value is True else "false" if value is False else str(value)
    if kind == "BOOL":
        if not isinstance(value, bool):
            raise ValueError("not a boolean")
        return value
    if kind == "INT64":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError("not an integer")
        number = int(value)
        if not -(2**63) <= number < 2**63:
            raise ValueError("outside INT64")
        return number
    if kind == "NUMERIC":
        if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
            raise ValueError("not a decimal number")
        try:
            exact = Decimal(value)
        except InvalidOperation:
            raise ValueError("not a decimal number") from None
        if not exact.is_finite() or abs(exact) >= Decimal(10) ** 29 or exact != exact.quantize(NANO):
            raise ValueError("outside NUMERIC (29 digits, 9 decimals)")
        return exact
    if kind == "TIMESTAMP":
        return timestamp(value)
    if kind == "DATE":
        if not isinstance(value, str):
            raise ValueError("not a date")
        return (
            date.fromisoformat(value[:10])
            if len(value) > 10 and value[10] == "T"
            else date.fromisoformat(value)
        )
    raise ValueError(kind)  # pragma: no cover


def violation(message: str) -> TerminalError:
    return TerminalError(message[:300], reason="SCHEMA_CONTRACT_VIOLATION")


class ApiExtractor:
    """The processor (see the module docstring)."""

    Config = ApiExtractorConfig

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        config = parse_config(ApiExtractorConfig, step_config)
        auth = registry_auth(config.auth)
        credential = (
            None
            if config.auth.type == "none"
            else await context.secrets.get(config.provider, config.credential)
        )
        wh, dataset = context.warehouse, context.run.dataset
        target = self._schema(config)
        await wh.ensure_table(dataset, target)
        await wh.ensure_table(dataset, STATE)
        stored = await self._state(context) if config.incremental else {}
        parents = await self._parents(context, config, credential, auth)
        known = {c.source.split(".")[0] for c in config.columns}
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        pages = records = 0
        cursors: dict[str, str] = {}
        now = datetime.now(UTC)
        for parent in parents:
            path = config.request.path.replace("{parent}", quote(parent, safe=""))
            params: dict[str, str] = dict(config.request.params)
            inc = config.incremental
            high: datetime | int | None = None
            if inc is not None:
                params[inc.param] = lower_bound(inc, stored.get(parent))
            async for body in self._walk(
                context, config, credential, auth, path, params, config.pagination, config.records
            ):
                pages += 1
                for record in records_of(body, selector(config.records)):
                    records += 1
                    row = self._row(config, record, known, records)
                    row["x_parent"] = parent
                    rows[tuple(row[k] for k in config.primary_key)] = row
                    if inc is not None:
                        raw = dig(record, inc.cursor_path)
                        if raw is None:
                            raise violation(f"record {records}: no incremental cursor {inc.cursor_path}")
                        try:
                            seen = parse_cursor(raw, inc.kind)
                        except ValueError:
                            raise violation(
                                f"record {records}: the cursor {inc.cursor_path} is not a {inc.kind}"
                            ) from None
                        high = later(high, seen)
            if inc is not None and high is not None:
                if isinstance(high, datetime):
                    high = min(high, now - timedelta(seconds=inc.lag_seconds))
                cursors[parent] = cursor_text(high)
        lineage = {
            "x_pipeline_id": context.run.pipeline_id,
            "x_run_id": context.run.run_id,
            "x_ingested_at": now,
        }
        written = await self._merge(context, config, target, [row | lineage for row in rows.values()])
        if cursors:  # only after the rows are in
            await wh.load_rows(
                dataset,
                STATE.name,
                [
                    {
                        "pipeline_id": context.run.pipeline_id,
                        "step_id": context.step_id,
                        "partition_key": parent,
                        "cursor_value": value,
                        "x_run_id": context.run.run_id,
                        "updated_at": now,
                    }
                    for parent, value in cursors.items()
                ],
            )
        context.log.info(
            "%s: %d records from %d pages, %d rows merged into %s",
            config.request.path,
            records,
            pages,
            written,
            config.table,
        )
        return {
            "status": "SUCCESS",
            "rows_written": written,
            "pages": pages,
            "records": records,
            "cursors": cursors,
        }

    @staticmethod
    def _schema(config: ApiExtractorConfig) -> TableSchema:
        fields = [
            {
                "name": c.name,
                "type": BQ_TYPES[c.type],
                "mode": "REQUIRED" if c.name in config.primary_key else "NULLABLE",
            }
            for c in config.columns
        ]
        if config.unknown_fields == "keep":
            fields.append({"name": "x_extra", "type": "JSON", "mode": "NULLABLE"})
        return TableSchema(config.table, "generic.api_extractor target", (*fields, *LINEAGE))

    @staticmethod
    def _row(config: ApiExtractorConfig, record: Any, known: set[str], number: int) -> dict[str, Any]:
        if not isinstance(record, Mapping):
            raise violation(f"record {number} is not an object")
        row: dict[str, Any] = {}
        for column in config.columns:
            value = dig(record, column.source)
            if value is None:
                if column.required or column.name in config.primary_key:
                    raise violation(f"record {number}: required column {column.name} is missing")
                row[column.name] = None
                continue
            try:
                row[column.name] = convert(value, column.type)
            except ValueError as exc:
                raise violation(f"record {number}: column {column.name} ({column.type}): {exc}") from None
        unknown = sorted(k for k in record if k not in known)
        if unknown and config.unknown_fields == "reject":
            listed = ", ".join(k[:40] for k in unknown[:5])
            raise violation(f"record {number}: fields not in the schema contract: {listed}")
        if config.unknown_fields == "keep":
            row["x_extra"] = {k: record[k] for k in unknown} if unknown else None
        return row

    async def _walk(
        self,
        context: StepContext,
        config: ApiExtractorConfig,
        credential: Credential | None,
        auth: Auth,
        path: str,
        params: Mapping[str, str],
        pagination: PaginationSpec,
        records: str,
    ) -> AsyncIterator[Any]:
        """Every page of one listing: a fresh walk (and paginator state) per call."""
        paging = pagination.paging(selector(records))
        headers = dict(config.request.headers)
        if paging is None:
            yield await context.http.get_json(
                config.provider, path, params=params, headers=headers, credential=credential, auth=auth
            )
            return
        async for body in context.http.paginate(
            config.provider,
            path,
            paging,
            params=params,
            headers=headers,
            credential=credential,
            max_pages=pagination.max_pages,
            auth=auth,
        ):
            yield body

    async def _parents(
        self, context: StepContext, config: ApiExtractorConfig, credential: Credential | None, auth: Auth
    ) -> list[str]:
        spec = config.for_each
        if spec is None:
            return [""]
        if spec.values:
            return list(dict.fromkeys(spec.values))
        found: list[str] = []
        async for body in self._walk(
            context, config, credential, auth, spec.path, {}, spec.pagination, spec.records
        ):
            for record in records_of(body, selector(spec.records)):
                value = dig(record, spec.field)
                if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
                    found.append(str(value)[:200])
        return list(dict.fromkeys(found))

    @staticmethod
    async def _state(context: StepContext) -> dict[str, str]:
        table = context.warehouse.table_ref(context.run.dataset, STATE.name)
        rows = await context.warehouse.query(
            f"SELECT partition_key, cursor_value FROM {table} "
            "WHERE pipeline_id = @pipeline AND step_id = @step "
            "QUALIFY ROW_NUMBER() OVER (PARTITION BY partition_key ORDER BY updated_at DESC) = 1",
            {"pipeline": context.run.pipeline_id, "step": context.step_id},
        )
        return {str(r["partition_key"]): str(r["cursor_value"]) for r in rows}

    @staticmethod
    async def _merge(
        context: StepContext, config: ApiExtractorConfig, target: TableSchema, rows: list[dict[str, Any]]
    ) -> int:
        """Load the rows into a staging table and MERGE them on the primary key (one statement)."""
        if not rows:
            return 0
        wh, dataset = context.warehouse, context.run.dataset
        staging = f"{config.table}__staging_{re.sub(r'[^A-Za-z0-9_]', '_', context.run.run_id)[-40:]}"
        await wh.drop_table(dataset, staging)
        await wh.ensure_table(dataset, TableSchema(staging, "staging", target.fields))
        try:
            await wh.load_rows(dataset, staging, rows)
            names = target.column_names
            keys = set(config.primary_key)
            on = " AND ".join(f"T.{k} = S.{k}" for k in config.primary_key)
            update = ", ".join(f"{n} = S.{n}" for n in names if n not in keys)
            await wh.query(
                f"MERGE {wh.table_ref(dataset, config.table)} AS T "
                f"USING {wh.table_ref(dataset, staging)} AS S "
                f"ON {on} WHEN MATCHED THEN UPDATE SET {update} "
                f"WHEN NOT MATCHED THEN INSERT ({', '.join(names)}) "
                f"VALUES ({', '.join('S.' + n for n in names)})"
            )
        finally:
            await wh.drop_table(dataset, staging)
        return len(rows)


def get_engine() -> ApiExtractor:
    """The processor."""
    return ApiExtractor()
