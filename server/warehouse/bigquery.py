"""The warehouse adapter: the only module that imports `google.cloud.bigquery`.

The same code talks to BigQuery (stage, prod) and to the `bqemulator` emulator (local, tests); only the
endpoint differs. Blocking client calls run on the adapter's own thread pool, never on the event loop.
Values always travel as bound query parameters, except the arguments of `CALL`, which the emulator
cannot bind (scripts reject parameters there): those are rendered by `sql.literal` from typed,
validated values. Vendor errors are mapped once, in `_mapped`, to transient or terminal domain errors.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any, BinaryIO, TypeVar

import orjson
import requests.exceptions
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.oauth2 import service_account

from server.errors import AlreadyExistsError, NotFoundError, TerminalError, TransientError
from server.warehouse import sql
from server.warehouse.schema import TableInfo, TableSchema
from server.warehouse.sql import Typed

T = TypeVar("T")

__all__ = ["BigQueryWarehouse", "QueryResult", "RoutineInfo", "StagedWindow", "Typed"]

Row = dict[str, Any]

GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
BIGQUERY_SCOPE = "https://www.googleapis.com/auth/bigquery"

_TRANSIENT_REASONS = frozenset(
    {"backendError", "rateLimitExceeded", "internalError", "jobRateLimitExceeded", "jobBackendError"}
)


# DDL types of the scalar columns `ensure_table` may add (NUMERIC with its scale: see the emulator caveats)
_DDL_TYPES = {
    "STRING": "STRING",
    "INT64": "INT64",
    "INTEGER": "INT64",
    "NUMERIC": "NUMERIC(38, 9)",
    "BOOL": "BOOL",
    "BOOLEAN": "BOOL",
    "DATE": "DATE",
    "TIMESTAMP": "TIMESTAMP",
    "JSON": "JSON",
    "FLOAT64": "FLOAT64",
}


@dataclass(frozen=True, slots=True)
class RoutineInfo:
    """What the warehouse knows of one routine."""

    dataset: str
    name: str
    full_name: str
    created: datetime | None
    modified: datetime | None
    definition: str
    routine_type: str

    @property
    def routine_type_is_procedure(self) -> bool:
        """Whether the routine is a stored procedure (not a function)."""
        return self.routine_type == "PROCEDURE"


@dataclass(frozen=True, slots=True)
class QueryResult:
    """Rows of a query plus the job statistics that callers report."""

    rows: list[Row]
    job_id: str
    bytes_processed: int
    num_dml_affected_rows: int


def _scalar_type(value: Any) -> str:
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT64"
    if isinstance(value, Decimal):
        return "NUMERIC"
    if isinstance(value, float):
        return "FLOAT64"
    if isinstance(value, str):
        return "STRING"
    if isinstance(value, datetime):
        return "TIMESTAMP"
    if isinstance(value, date):
        return "DATE"
    if isinstance(value, bytes):
        return "BYTES"
    raise TypeError(f"no BigQuery type for {type(value).__name__}; wrap the value in Typed")


def _parameter(name: str, value: Any) -> bigquery.ScalarQueryParameter | bigquery.ArrayQueryParameter:
    if isinstance(value, Typed):
        if value.type.startswith("ARRAY<"):
            return bigquery.ArrayQueryParameter(name, value.type[6:-1], list(value.value))
        return bigquery.ScalarQueryParameter(name, value.type, value.value)
    if isinstance(value, list | tuple):
        if not value:
            raise TypeError(f"empty array parameter @{name} needs Typed('ARRAY<T>', [])")
        return bigquery.ArrayQueryParameter(name, _scalar_type(value[0]), list(value))
    return bigquery.ScalarQueryParameter(name, _scalar_type(value), value)


def _error_message(exc: gexc.GoogleAPICallError) -> str:
    errors = getattr(exc, "errors", None) or []
    if errors and isinstance(errors[0], dict) and errors[0].get("message"):
        return str(errors[0]["message"]).split("\n")[0]
    return str(exc.message).split("\n")[0]


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Map vendor exceptions to domain errors (the single seam for this adapter).

    The message says what failed in our words; the vendor's own text (table names, SQL, internal
    messages) goes to `detail`, which only the server log sees.
    """
    try:
        yield
    except auth_exceptions.RefreshError as exc:
        # The token endpoint refused the service account (wrong, revoked or disabled key).
        raise TerminalError(
            f"{what}: the service account was rejected", reason="CREDENTIAL_REJECTED", detail=str(exc)[:300]
        ) from exc
    except auth_exceptions.TransportError as exc:
        raise _unavailable(what, f"token endpoint unreachable ({type(exc).__name__})") from exc
    except gexc.Forbidden as exc:
        reasons = {e.get("reason") for e in (exc.errors or []) if isinstance(e, dict)}
        if reasons & _TRANSIENT_REASONS:
            raise _unavailable(what, _error_message(exc)) from exc
        raise TerminalError(
            f"{what}: permission denied", reason="WAREHOUSE_PERMISSION_DENIED", detail=_error_message(exc)
        ) from exc
    except gexc.NotFound as exc:
        raise NotFoundError(
            f"{what}: not found", reason="WAREHOUSE_NOT_FOUND", detail=_error_message(exc)
        ) from exc
    except gexc.Conflict as exc:
        raise AlreadyExistsError(
            f"{what}: already exists", reason="WAREHOUSE_CONFLICT", detail=_error_message(exc)
        ) from exc
    except (gexc.TooManyRequests, gexc.ServerError) as exc:
        raise _unavailable(what, _error_message(exc)) from exc
    except gexc.GoogleAPICallError as exc:
        reasons = {e.get("reason") for e in (exc.errors or []) if isinstance(e, dict)}
        if reasons & _TRANSIENT_REASONS:
            raise _unavailable(what, _error_message(exc)) from exc
        raise TerminalError(
            f"{what}: the warehouse rejected it", reason="WAREHOUSE_REJECTED", detail=_error_message(exc)
        ) from exc
    except (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        concurrent.futures.TimeoutError,
        gexc.RetryError,
    ) as exc:
        raise _unavailable(what, f"warehouse unreachable ({type(exc).__name__}: {exc})") from exc


def _unavailable(what: str, detail: str) -> TransientError:
    return TransientError(
        f"{what}: the warehouse is unavailable; try again later",
        reason="WAREHOUSE_UNAVAILABLE",
        detail=detail,
    )


class BigQueryWarehouse:
    """Async facade over the official BigQuery client."""

    def __init__(
        self,
        *,
        project: str,
        location: str,
        endpoint: str = "",
        job_timeout: float = 300.0,
        retry_deadline: float = 30.0,
        max_concurrency: int = 16,
        google_token_url: str = GOOGLE_TOKEN_URL,
        credentials: Any = None,
    ) -> None:
        options = ClientOptions(api_endpoint=endpoint) if endpoint else None
        if credentials is None and endpoint:
            credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
        self.project = sql.check_project(project)
        self.location = location
        self.endpoint = endpoint
        self.google_token_url = google_token_url
        self._retry_deadline = retry_deadline
        self._client = bigquery.Client(
            project=project, location=location, credentials=credentials, client_options=options
        )
        self._job_timeout = job_timeout
        self._retry = bigquery.DEFAULT_RETRY.with_deadline(retry_deadline)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_concurrency, thread_name_prefix="bigquery")
        self.jobs_started = 0

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        def call() -> T:
            with _mapped(what):
                return fn()

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def _ref(self, dataset: str, name: str = "") -> str:
        """`project.dataset[.name]` for the client's calls, each part validated."""
        ref = f"{self.project}.{sql.check_name(dataset)}"
        return f"{ref}.{sql.check_name(name)}" if name else ref

    def table_ref(self, dataset: str, table: str) -> str:
        """`project.dataset.table`, validated and backtick-quoted."""
        return sql.table(self.project, dataset, table)

    async def query(self, statement: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        """Run one query (or script without parameters) and return its rows."""
        return (await self.query_job(statement, params)).rows

    async def query_job(
        self,
        statement: str,
        params: Mapping[str, Any] | None = None,
        *,
        job_timeout: float | None = None,
        what: str = "query failed",
    ) -> QueryResult:
        """Run one query; return rows and job statistics (`job_timeout` bounds the job; `what` starts
        the message of an error)."""
        config = bigquery.QueryJobConfig(
            query_parameters=[_parameter(k, v) for k, v in (params or {}).items()]
        )

        def run() -> QueryResult:
            self.jobs_started += 1
            job = self._client.query(statement, job_config=config, retry=self._retry, job_retry=None)
            rows = [dict(r.items()) for r in job.result(timeout=job_timeout or self._job_timeout)]
            return QueryResult(
                rows,
                job.job_id or "",
                int(job.total_bytes_processed or 0),
                int(job.num_dml_affected_rows or 0),
            )

        return await self._run(what, run)

    async def call_procedure(
        self, dataset: str, name: str, args: Sequence[Any], *, job_timeout: float | None = None
    ) -> QueryResult:
        """`CALL dataset.name(args…)` and return the rows of the procedure's last SELECT."""
        statement = f"CALL {sql.routine(self.project, dataset, name)}({', '.join(map(sql.literal, args))})"
        return await self.query_job(statement, job_timeout=job_timeout, what=f"procedure {name} failed")

    async def ensure_dataset(self, dataset: str) -> None:
        """Create the dataset if it does not exist."""
        ref = bigquery.Dataset(self._ref(dataset))
        ref.location = self.location
        await self._run(
            f"create dataset {dataset}",
            partial(self._client.create_dataset, ref, exists_ok=True, retry=self._retry),
        )

    async def dataset_exists(self, dataset: str) -> bool:
        """Whether the dataset exists."""
        ref = self._ref(dataset)
        try:
            await self._run(f"dataset {dataset}", partial(self._client.get_dataset, ref, retry=self._retry))
        except NotFoundError:
            return False
        return True

    async def delete_dataset(self, dataset: str) -> None:
        """Drop a dataset and everything in it (tests and local resets)."""
        await self._run(
            f"delete dataset {dataset}",
            partial(
                self._client.delete_dataset,
                self._ref(dataset),
                delete_contents=True,
                not_found_ok=True,
                retry=self._retry,
            ),
        )

    async def ensure_tables(self, dataset: str, schemas: Sequence[TableSchema]) -> None:
        """Create the dataset and each of its tables that is missing."""
        await self.ensure_dataset(dataset)
        await asyncio.gather(*(self.ensure_table(dataset, s) for s in schemas))

    def _table(self, dataset: str, schema: TableSchema, expires: datetime | None = None) -> bigquery.Table:
        """The client's table object for a schema file (fields, description, partitioning, clustering,
        expiration time)."""
        table = bigquery.Table(
            self._ref(dataset, schema.name),
            schema=[bigquery.SchemaField.from_api_repr(f) for f in schema.fields],
        )
        table.description = schema.description
        if schema.partition_field:
            table.time_partitioning = bigquery.TimePartitioning(field=schema.partition_field)
        if schema.clustering:
            table.clustering_fields = list(schema.clustering)
        table.expires = expires
        return table

    async def ensure_table(
        self, dataset: str, schema: TableSchema, *, expires: datetime | None = None
    ) -> None:
        """Create the table from its schema file if missing (NUMERIC keeps its 9 decimals this way);
        `expires` sets its expiration time (BigQuery drops it then: staging tables of a crashed run).

        A table created from an older schema file gets the NULLABLE scalar columns added since (one
        `ALTER TABLE ADD COLUMN IF NOT EXISTS` each; the emulator ignores schema patches).
        """
        table = self._table(dataset, schema, expires)
        existing = await self._run(
            f"create table {dataset}.{schema.name}",
            partial(self._client.create_table, table, exists_ok=True, retry=self._retry),
        )
        have = {f.name for f in existing.schema or ()}
        for added in schema.fields:
            ddl_type = _DDL_TYPES.get(str(added["type"]))
            if added["name"] in have or added.get("mode", "NULLABLE") != "NULLABLE" or ddl_type is None:
                continue
            column = sql.check_name(str(added["name"]), "column")
            target = self.table_ref(dataset, schema.name)
            await self.query(f"ALTER TABLE {target} ADD COLUMN IF NOT EXISTS `{column}` {ddl_type}")

    async def load_rows(
        self, dataset: str, table: str, rows: Sequence[Mapping[str, Any]], *, replace: bool = False
    ) -> int:
        """Bulk-load rows with one resumable load job (the emulator rejects multipart uploads)."""
        if not rows:
            return 0
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.NEWLINE_DELIMITED_JSON,
            write_disposition="WRITE_TRUNCATE" if replace else "WRITE_APPEND",
        )
        target = self._ref(dataset, table)

        def run() -> int:
            # Serialised here, on the adapter's thread, so a big batch never stalls the event loop.
            payload = b"\n".join(orjson.dumps(r, default=_json_default) for r in rows)
            self._load_payload(payload, target, config)
            return len(rows)  # the job is atomic: all rows or an error (the emulator misreports output_rows)

        return await self._run(f"load into {dataset}.{table}", run)

    async def load_ndjson(self, dataset: str, table: str, payload: bytes) -> None:
        """Append rows already serialised as newline-delimited JSON with one load job (for rows that
        another system formats, e.g. PostgreSQL's `row_to_json`, so no Python object is made per row)."""
        if not payload:
            return
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.NEWLINE_DELIMITED_JSON, write_disposition="WRITE_APPEND"
        )
        target = self._ref(dataset, table)
        await self._run(f"load into {dataset}.{table}", partial(self._load_payload, payload, target, config))

    def _load_payload(self, payload: bytes, target: Any, config: bigquery.LoadJobConfig) -> None:
        self.jobs_started += 1
        # No `size=`: that makes the client use a resumable upload (the emulator rejects multipart ones).
        job = self._client.load_table_from_file(io.BytesIO(payload), target, job_config=config)
        job.result(timeout=self._job_timeout)

    async def drop_table(self, dataset: str, table: str) -> None:
        """Drop a table if it exists."""
        await self._run(
            f"drop table {dataset}.{table}",
            partial(
                self._client.delete_table, self._ref(dataset, table), not_found_ok=True, retry=self._retry
            ),
        )

    async def table_info(self, project: str, dataset: str, table: str) -> TableInfo:
        """What `tables.get` says of any table this client can see (another project's too).

        `NotFoundError` (`WAREHOUSE_NOT_FOUND`) when it does not exist, `TerminalError`
        (`WAREHOUSE_PERMISSION_DENIED`) when the credential may not read its metadata.
        """
        ref = ".".join(
            (sql.check_project(project), sql.check_name(dataset, "dataset"), sql.check_name(table, "table"))
        )

        def run() -> TableInfo:
            found = self._client.get_table(ref, retry=self._retry)
            partitioning = found.time_partitioning
            return TableInfo(
                table_id=ref,
                table_type=str(found.table_type or "TABLE"),
                partition_type=str(partitioning.type_) if partitioning is not None else None,
                partition_field=partitioning.field if partitioning is not None else None,
                location=found.location,
                num_rows=found.num_rows,
                fields=tuple(f.to_api_repr() for f in found.schema),
            )

        return await self._run(f"table {table}", run)

    @asynccontextmanager
    async def as_service_account(
        self, info: Mapping[str, Any], *, project: str, scopes: Sequence[str] = (BIGQUERY_SCOPE,)
    ) -> AsyncIterator[BigQueryWarehouse]:
        """The same warehouse (endpoint, location) seen as another principal: a customer's service account.

        `info` is the service account's JSON key, held in memory only; its token is fetched (and
        refreshed before expiry) by google-auth on this adapter's threads from the registry's token URL
        (`google_token_url`), never from the document's own `token_uri`. Jobs run in `project`.
        A rejected key surfaces as `CREDENTIAL_REJECTED` on the first call.
        """
        document = {**info, "token_uri": self.google_token_url}
        try:
            credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                document, scopes=list(scopes)
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise TerminalError(
                "the service account key is unusable", reason="CREDENTIAL_REJECTED", detail=type(exc).__name__
            ) from None
        other = BigQueryWarehouse(
            project=project,
            location=self.location,
            endpoint=self.endpoint,
            job_timeout=self._job_timeout,
            retry_deadline=self._retry_deadline,
            max_concurrency=4,
            google_token_url=self.google_token_url,
            credentials=credentials,
        )
        try:
            yield other
        finally:
            await other.close()

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
        """Swap one window of a table, all or nothing: returns the number of rows the window now holds.

        The window is the target's rows with `column` BETWEEN `start` AND `end` (and each `equals` column
        equal to its value). The new rows (newline-delimited JSON, read from `ndjson` by one resumable load
        job) go into a staging table made from the same schema; then one MERGE inserts them and deletes the
        window's old rows. A failure before the MERGE leaves the target untouched; the MERGE is atomic.
        """
        async with self.staged_window(dataset, schema, parquet=False) as stage:
            if ndjson.seek(0, io.SEEK_END):  # no rows: the staging table stays empty (an empty upload fails)
                ndjson.seek(0)
                await stage.load(ndjson)
            return await stage.swap(column=column, start=start, end=end, equals=equals)

    @asynccontextmanager
    async def staged_window(
        self, dataset: str, schema: TableSchema, *, parquet: bool = True
    ) -> AsyncIterator[StagedWindow]:
        """A staging table for one all-or-nothing window swap of `schema`'s table (see `StagedWindow`).

        Parquet staging has every column NULLABLE and JSON columns as STRING (BigQuery loads JSON
        columns only from CSV, Avro or NDJSON); the MERGE parses them and the target enforces its
        modes. The staging table expires after a day and is dropped when the block ends.
        """
        await self.ensure_table(dataset, schema)
        fields = schema.fields
        if parquet:
            fields = tuple(
                {**f, "mode": "NULLABLE", **({"type": "STRING"} if f["type"] == "JSON" else {})}
                for f in schema.fields
            )
        stage = TableSchema(f"_stage_{schema.name}_{uuid.uuid4().hex[:12]}", "staging", fields)
        staging = self._table(dataset, stage)
        staging.expires = datetime.now(UTC) + timedelta(days=1)  # gone even if this process dies mid-way
        await self._run(
            f"create table {dataset}.{stage.name}",
            partial(self._client.create_table, staging, retry=self._retry),
        )
        try:
            yield StagedWindow(self, dataset, schema, stage.name, parquet)
        finally:
            await self.drop_table(dataset, stage.name)

    async def list_routines(self, dataset: str) -> list[RoutineInfo]:
        """The routines of a dataset, ordered by name (definitions left empty)."""

        def run() -> list[RoutineInfo]:
            found = self._client.list_routines(self._ref(dataset), retry=self._retry)
            return sorted((self._info(dataset, r) for r in found), key=lambda r: r.name)

        return await self._run(f"list routines of {dataset}", run)

    async def get_routine(self, dataset: str, name: str) -> RoutineInfo:
        """One routine with its definition; `NotFoundError` if it does not exist."""
        ref = self._ref(dataset, name)
        routine = await self._run(
            f"routine {dataset}.{name}", partial(self._client.get_routine, ref, retry=self._retry)
        )
        return self._info(dataset, routine)

    async def delete_routine(self, dataset: str, name: str) -> None:
        """Drop one routine; `NotFoundError` if it does not exist."""
        ref = self._ref(dataset, name)
        await self._run(
            f"routine {dataset}.{name}", partial(self._client.delete_routine, ref, retry=self._retry)
        )

    def _info(self, dataset: str, routine: Any) -> RoutineInfo:
        return RoutineInfo(
            dataset=dataset,
            name=routine.routine_id,
            full_name=f"{self.project}.{dataset}.{routine.routine_id}",
            created=routine.created,
            modified=routine.modified,
            definition=routine.body or "",
            routine_type=routine.type_ or "",
        )

    async def close(self) -> None:
        """Release the client and the thread pool."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._client.close)


class StagedWindow:
    """One window swap in progress: files appended to a staging table by load jobs, then one MERGE.

    `load` may be called while the caller still produces later files (each is one load job appending
    to the staging table); nothing reaches the target before `swap`, whose MERGE inserts the staged
    rows and deletes the window's old ones atomically. Made by `BigQueryWarehouse.staged_window`.
    """

    def __init__(
        self, warehouse: BigQueryWarehouse, dataset: str, schema: TableSchema, name: str, parquet: bool
    ) -> None:
        self._wh = warehouse
        self.dataset = dataset
        self.schema = schema
        self.name = name
        self._parquet = parquet

    async def load(self, source: BinaryIO) -> None:
        """Append one file (Parquet, or NDJSON for `parquet=False`) with one resumable load job."""
        wh = self._wh
        config = bigquery.LoadJobConfig(
            source_format=(
                bigquery.SourceFormat.PARQUET
                if self._parquet
                else bigquery.SourceFormat.NEWLINE_DELIMITED_JSON
            ),
            write_disposition="WRITE_APPEND",
            create_disposition="CREATE_NEVER",  # a load still running when the stage is dropped fails
        )

        def load() -> None:
            wh.jobs_started += 1
            # No `size=`: that makes the client use a resumable upload.
            job = wh._client.load_table_from_file(source, wh._ref(self.dataset, self.name), job_config=config)
            job.result(timeout=wh._job_timeout)

        await wh._run(f"load into {self.dataset}.{self.name}", load)

    async def swap(
        self,
        *,
        column: str,
        start: date,
        end: date,
        equals: Mapping[str, str] | None = None,
        expected: int | None = None,
    ) -> int:
        """Replace the target's window (`column` BETWEEN `start` AND `end`, each `equals` column equal to
        its value) with the staged rows in one MERGE; return the staged row count. With `expected`, a
        staging table holding another count fails (`WAREHOUSE_LOAD_INCOMPLETE`) before the MERGE."""
        wh, schema = self._wh, self.schema
        target, staged = wh.table_ref(self.dataset, schema.name), wh.table_ref(self.dataset, self.name)
        rows = int((await wh.query(f"SELECT COUNT(*) AS n FROM {staged}"))[0]["n"])
        if expected is not None and rows != expected:
            raise TerminalError(
                f"the staging table of {schema.name} holds {rows} rows, {expected} were loaded",
                reason="WAREHOUSE_LOAD_INCOMPLETE",
            )
        names = [sql.check_name(c, "column") for c in schema.column_names]
        parsed = {f["name"] for f in schema.fields if f["type"] == "JSON"} if self._parquet else set()
        cols = ", ".join(f"`{c}`" for c in names)
        values = ", ".join(f"PARSE_JSON(S.`{c}`)" if c in parsed else f"S.`{c}`" for c in names)
        conditions = [f"T.`{sql.check_name(column, 'column')}` BETWEEN @window_start AND @window_end"]
        params: dict[str, Any] = {"window_start": start, "window_end": end}
        for i, (name, value) in enumerate(sorted((equals or {}).items())):
            conditions.append(f"T.`{sql.check_name(name, 'column')}` = @eq_{i}")
            params[f"eq_{i}"] = value
        await wh.query_job(
            f"MERGE {target} AS T USING {staged} AS S ON FALSE "
            f"WHEN NOT MATCHED BY TARGET THEN INSERT ({cols}) VALUES ({values}) "
            f"WHEN NOT MATCHED BY SOURCE AND {' AND '.join(conditions)} THEN DELETE",
            params,
        )
        return rows


def _json_default(value: Any) -> Any:
    """What orjson cannot write itself (it writes datetimes and dates as RFC 3339 already)."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"cannot serialise {type(value).__name__}")
