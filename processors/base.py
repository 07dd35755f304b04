"""The processor contract: what a processor is given (`StepContext`) and what it returns.

A processor is a module `processors/{provider}/{domain}.py` (ps_type `{provider}.{domain}`) exposing
`get_engine()`. The returned object has `async execute(step_config, context) -> dict` whose `status` is
`SUCCESS`, `FAILED` or `SKIPPED`, plus outputs that later steps read as `steps.<step_id>.<key>`. It may
declare `Config`, a pydantic model that validates the step's `config` when the pipeline is loaded.

Processors reach the outside only through the context, whose adapters are typed here as Protocols, so
this module (and every processor) depends on no concrete adapter and never on the engine:

- `context.warehouse` (`Warehouse`): BigQuery queries, bulk loads, stored procedures.
- `context.http` (`HttpClient`): the one outbound HTTP client, bound to the run's org (rate limits,
  retries, auth from the provider registry, pagination, size caps, metrics and logs).
- `context.secrets` (`Secrets`): the run's org's provider credentials, decrypted on demand. It is scoped
  to the run's org by construction: there is no way to name another org.

Errors: raise `server.errors.TransientError` for what a retry may fix; the adapters already raise
domain errors with stable reasons (`CREDENTIAL_REJECTED`, `PROVIDER_RATE_LIMITED`, ...).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any, BinaryIO, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, StringConstraints, ValidationError

from server.credentials.model import Credential
from server.errors import FieldViolation, InvalidInputError
from server.http.types import HttpResponse, Paging, StreamedResponse
from server.providers import Auth
from server.warehouse.schema import TableInfo, TableSchema
from server.warehouse.sql import Typed

__all__ = [
    "Auth",
    "Credential",
    "HttpClient",
    "HttpResponse",
    "Paging",
    "Processor",
    "QueryResult",
    "RunIdentity",
    "Secrets",
    "StagedWindow",
    "StepContext",
    "StepStatus",
    "StreamedResponse",
    "TableInfo",
    "TableSchema",
    "Templated",
    "Typed",
    "Warehouse",
    "parse_config",
]

StepStatus = Literal["SUCCESS", "FAILED", "SKIPPED"]


# -- adapters -----------------------------------------------------------------------------------------


class QueryResult(Protocol):
    """Rows of a query plus the job statistics that processors report."""

    @property
    def rows(self) -> list[dict[str, Any]]: ...
    @property
    def job_id(self) -> str: ...
    @property
    def bytes_processed(self) -> int: ...
    @property
    def num_dml_affected_rows(self) -> int: ...


class StagedWindow(Protocol):
    """One all-or-nothing window swap in progress (`Warehouse.staged_window`): files appended to a
    staging table while later ones are produced, then one MERGE into the target."""

    async def load(self, source: BinaryIO) -> None:
        """Append one file (Parquet; NDJSON for `parquet=False`) to the staging table (one load job)."""
        ...

    async def swap(
        self,
        *,
        column: str,
        start: date,
        end: date,
        equals: Mapping[str, str] | None = None,
        expected: int | None = None,
    ) -> int:
        """Replace the window (`column` BETWEEN start AND end, `equals` columns equal) with the staged
        rows in one MERGE; return their count (`expected`: another count fails before the MERGE)."""
        ...


class Warehouse(Protocol):
    """The warehouse adapter as processors use it (`server/warehouse/bigquery.py` implements it).

    Values travel as bound parameters (`@name`); identifiers must come from `table_ref`. Money is
    `Decimal` (NUMERIC) both ways.
    """

    project: str

    def table_ref(self, dataset: str, table: str) -> str:
        """`project.dataset.table`, validated and backtick-quoted, for use in SQL text."""
        ...

    async def query(self, statement: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run one query; return its rows."""
        ...

    async def query_job(
        self, statement: str, params: Mapping[str, Any] | None = None, *, job_timeout: float | None = None
    ) -> QueryResult:
        """Run one query; return rows and job statistics."""
        ...

    async def call_procedure(
        self, dataset: str, name: str, args: Sequence[Any], *, job_timeout: float | None = None
    ) -> QueryResult:
        """`CALL dataset.name(args...)`; the rows of the procedure's last SELECT."""
        ...

    async def load_rows(
        self, dataset: str, table: str, rows: Sequence[Mapping[str, Any]], *, replace: bool = False
    ) -> int:
        """Bulk-load rows with one load job (atomic); return how many were written."""
        ...

    async def ensure_table(
        self, dataset: str, schema: TableSchema, *, expires: datetime | None = None
    ) -> None:
        """Create the table from its schema if it is missing (`expires`: BigQuery drops it then)."""
        ...

    async def drop_table(self, dataset: str, table: str) -> None:
        """Drop the table if it exists."""
        ...

    async def table_info(self, project: str, dataset: str, table: str) -> TableInfo:
        """`tables.get` of any table the principal can see (`WAREHOUSE_NOT_FOUND`,
        `WAREHOUSE_PERMISSION_DENIED`)."""
        ...

    def as_service_account(
        self, info: Mapping[str, Any], *, project: str, scopes: Sequence[str] = ...
    ) -> AbstractAsyncContextManager[Warehouse]:
        """`async with warehouse.as_service_account(key, project=p) as source:` the same warehouse seen
        as another principal (a customer's service account key, in memory only), jobs run in `project`.
        A rejected key surfaces as `CREDENTIAL_REJECTED`."""
        ...

    async def replace_window(
        self,
        dataset: str,
        schema: TableSchema,
        ndjson: BinaryIO,
        *,
        column: str,
        start: date,
        end: date,
        equals: Mapping[str, str] | None = None,
    ) -> int:
        """Swap a window of a table all or nothing (one load into staging, one MERGE); rows in the window."""
        ...

    def staged_window(
        self, dataset: str, schema: TableSchema, *, parquet: bool = True
    ) -> AbstractAsyncContextManager[StagedWindow]:
        """`async with warehouse.staged_window(dataset, schema) as stage:` a staging table for one window
        swap (`stage.load(file)` as files complete, then `stage.swap(...)`), dropped when the block ends;
        a block that fails before `swap` leaves the target untouched."""
        ...


class Secrets(Protocol):
    """The run's org's provider credentials (scoped to that org; there is no org parameter).

    `get` decrypts on demand (envelope encryption, a short in-memory cache per credential version).
    Errors are `server.errors` domain errors with stable reasons: `CREDENTIAL_NOT_FOUND` (terminal),
    `CREDENTIAL_UNREADABLE` (terminal: tampered row, row of another org, wrong key), `KMS_UNAVAILABLE`
    (transient). No error text ever holds a secret.
    """

    async def get(self, provider: str, name: str = "default") -> Credential:
        """The org's credential `name` for `provider`."""
        ...


class HttpClient(Protocol):
    """The one outbound HTTP client, bound to the run's org, run and step (`server/http/`).

    `provider` is a provider id of `configs/system/providers.yml`: it gives the base URL (a relative
    `path_or_url` is joined to it; an absolute URL must be on the provider's host), rate limits,
    concurrency, page limits and the auth scheme applied with `credential` (none when omitted).
    Retries 429/5xx/connection errors/timeouts (Retry-After honoured) and raises domain errors:
    `CREDENTIAL_REJECTED` (401/403), `PROVIDER_REJECTED` (other 4xx), `PROVIDER_RATE_LIMITED` and
    `PROVIDER_UNAVAILABLE` (transient, retries exhausted), `PROVIDER_RESPONSE_TOO_LARGE`,
    `PROVIDER_BAD_RESPONSE` (malformed JSON), `PAGINATION_LOOP`, `PAGINATION_LIMIT`. `auth` (a registry
    auth scheme, `server.providers.Auth`) replaces the provider's scheme for one call: a declarative
    step's own auth, with the same token cache, single-flight minting and one refresh after a 401.

    JSON numbers: with `exact=True` (the default) every non-integer number is a `Decimal` (parsed with
    `json.loads(parse_float=Decimal)`; money never passes through a float); `exact=False` parses with
    orjson into floats, for bodies that hold no money. Integers are always `int`.
    """

    async def request(
        self,
        provider: str,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        data: bytes | Mapping[str, str] | None = None,
        credential: Credential | None = None,
        expect: Sequence[int] = (),
        auth: Auth | None = None,
    ) -> HttpResponse:
        """One request (with retries); the whole body, up to the size cap.

        A 2xx is returned; a status listed in `expect` is returned instead of raised.
        """
        ...

    async def get_json(
        self,
        provider: str,
        path_or_url: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        credential: Credential | None = None,
        exact: bool = True,
        auth: Auth | None = None,
    ) -> Any:
        """GET and parse the JSON body."""
        ...

    async def post_json(
        self,
        provider: str,
        path_or_url: str,
        body: Any,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        credential: Credential | None = None,
        exact: bool = True,
    ) -> Any:
        """POST a JSON body and parse the JSON answer."""
        ...

    def paginate(
        self,
        provider: str,
        path_or_url: str,
        paging: Paging,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        credential: Credential | None = None,
        exact: bool = True,
        max_pages: int | None = None,
        auth: Auth | None = None,
    ) -> AsyncIterator[Any]:
        """GET page after page (each a parsed JSON body) until the last one.

        A cursor, token or URL seen before, or a page repeating an earlier one, raises
        `PAGINATION_LOOP`; more than `max_pages` (default: the provider's `max_pages`) raises
        `PAGINATION_LIMIT`.
        """
        ...

    def stream(
        self,
        provider: str,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        credential: Credential | None = None,
    ) -> AbstractAsyncContextManager[StreamedResponse]:
        """`async with http.stream(...) as response:` iterate `response.chunks()` for large bodies.

        Retries apply until the response headers arrive; the body is not size-capped.
        """
        ...


# -- the context ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunIdentity:
    """Which run a step belongs to."""

    run_id: str
    org_slug: str
    dataset: str
    pipeline_id: str
    pipeline_key: str


@dataclass(frozen=True)
class StepContext:
    """Everything a processor may use: identity, resolved parameters, earlier results, adapters."""

    run: RunIdentity
    step_id: str
    attempt: int
    parameters: Mapping[str, Any]
    steps: Mapping[str, Mapping[str, Any]]
    warehouse: Warehouse
    meta_dataset: str
    log: logging.LoggerAdapter[logging.Logger]
    http: HttpClient
    secrets: Secrets

    @property
    def start_date(self) -> date | None:
        """The run window's first day, when the run has one."""
        value = self.parameters.get("start_date")
        return date.fromisoformat(value) if isinstance(value, str) and value else None

    @property
    def end_date(self) -> date | None:
        """The run window's last day, when the run has one."""
        value = self.parameters.get("end_date")
        return date.fromisoformat(value) if isinstance(value, str) and value else None


@runtime_checkable
class Processor(Protocol):
    """What `get_engine()` returns."""

    async def execute(self, step_config: dict[str, Any], context: StepContext) -> dict[str, Any]:
        """Run the step; return `{"status": ..., **outputs}`."""
        ...


ModelT = TypeVar("ModelT", bound=BaseModel)

# A config value that is still a template at load time (`"{{ start_date }}"`); resolved before the step runs.
Templated = Annotated[str, StringConstraints(pattern=r"(\{\{|\{%)")]


def parse_config(model: type[ModelT], step_config: dict[str, Any]) -> ModelT:
    """Validate a step's resolved config with the processor's model; InvalidInputError names the fields."""
    try:
        return model.model_validate(step_config)
    except ValidationError as exc:
        raise InvalidInputError(
            "invalid step config",
            [FieldViolation("config." + ".".join(map(str, e["loc"])), e["msg"]) for e in exc.errors()],
            reason="INVALID_STEP_CONFIG",
        ) from exc
