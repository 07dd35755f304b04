"""Stored procedures and migrations of the central dataset, deployed from `procedures/{domain}/{name}.sql`.

A file holds one `CREATE OR REPLACE PROCEDURE` whose name must equal the file stem; `${project}` and
`${dataset}` are replaced by the project and the central dataset. Sync compares the file's SHA-256 with
the checksum recorded at the last sync (`procedure_sync_state`) and re-creates only what changed.

Migrations live in `procedures/migrations/` and take `(p_dataset STRING, p_dry_run BOOL)`. They run
against org datasets only (the dataset of an ACTIVE org; never the central dataset): one named dataset,
or every active org's dataset with bounded concurrency. Each execution is recorded in
`migration_history`; a migration applied (not dry-run) to a dataset is not applied to it again with the
same checksum unless forced. Executions of one migration on one dataset are serialised in this process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import string
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.errors import FieldViolation, InvalidInputError, NotFoundError, ServiceError, TerminalError
from server.warehouse import sql
from server.warehouse.bigquery import BigQueryWarehouse, RoutineInfo, Row
from server.warehouse.rows import json_value

MIGRATIONS = "migrations"


@dataclass(frozen=True, slots=True)
class ProcedureFile:
    """One procedure source file."""

    name: str
    domain: str
    path: Path
    source: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file's text."""
        return hashlib.sha256(self.source.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ProcedureView:
    """A deployed procedure with what sync knows of it."""

    routine: RoutineInfo
    domain: str
    checksum: str
    file_checksum: str


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What sync did with one file: created, updated, unchanged or failed."""

    name: str
    domain: str
    outcome: str
    checksum: str
    error: str = ""


@dataclass(frozen=True, slots=True)
class MigrationRun:
    """One recorded execution of a migration."""

    name: str
    dataset: str
    checksum: str
    dry_run: bool
    executed_by: str
    executed_at: datetime
    rows: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class MigrationOutcome:
    """What one dataset of a migration call got: its execution (or the earlier one that applied it),
    or the reason and message of its failure."""

    dataset: str
    run: MigrationRun | None
    already_applied: bool = False
    error_reason: str = ""
    error: str = ""


def read_files(folder: Path) -> list[ProcedureFile]:
    """Every `*.sql` under `folder/{domain}/`, ordered by name; names must be unique identifiers."""
    files: dict[str, ProcedureFile] = {}
    for path in sorted(folder.glob("*/*.sql")):
        name = sql.check_name(path.stem, str(path))
        if name in files:
            raise InvalidInputError(
                f"procedure {name} is defined twice", [FieldViolation(str(path), "duplicate")]
            )
        files[name] = ProcedureFile(name, path.parent.name, path, path.read_text())
    return sorted(files.values(), key=lambda f: f.name)


class ProcedureManager:
    """Sync, list, get, delete and run migrations."""

    def __init__(
        self,
        warehouse: BigQueryWarehouse,
        dataset: str,
        folder: Path,
        *,
        org_datasets: Callable[[], Awaitable[list[str]]],
        migration_concurrency: int = 4,
    ) -> None:
        self._wh = warehouse
        self._dataset = dataset
        self._folder = folder
        self._org_datasets = org_datasets
        self._concurrency = migration_concurrency
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _t(self, table: str) -> str:
        return self._wh.table_ref(self._dataset, table)

    def files(self) -> list[ProcedureFile]:
        """The procedure files of this build."""
        return read_files(self._folder)

    def _render(self, file: ProcedureFile) -> str:
        try:
            body = string.Template(file.source).substitute(project=self._wh.project, dataset=self._dataset)
        except (KeyError, ValueError) as exc:
            raise TerminalError(
                f"{file.path.name}: only ${{project}} and ${{dataset}} may follow a $ ({exc})",
                reason="PROCEDURE_TEMPLATE_INVALID",
            ) from exc
        declared = re.search(r"CREATE\s+OR\s+REPLACE\s+PROCEDURE\s+`?[\w.-]+\.(\w+)`?\s*\(", body, re.I)
        if declared is None or declared.group(1) != file.name:
            raise TerminalError(
                f"{file.path.name} must CREATE OR REPLACE PROCEDURE ${{project}}.${{dataset}}.{file.name}",
                reason="PROCEDURE_NAME_MISMATCH",
            )
        return body

    async def _checksums(self) -> dict[str, str]:
        rows = await self._wh.query(f"SELECT procedure_name, checksum FROM {self._t('procedure_sync_state')}")
        return {r["procedure_name"]: r["checksum"] for r in rows}

    async def sync(
        self, *, force: bool = False, names: Sequence[str] = (), domain: str = ""
    ) -> list[SyncResult]:
        """Deploy the selected files; one result per file."""
        files = self.files()
        known = {f.name for f in files}
        missing = [
            FieldViolation(f"names[{i}]", f"no procedure file named {n!r}")
            for i, n in enumerate(names)
            if n not in known
        ]
        if domain and domain not in {f.domain for f in files}:
            missing.append(FieldViolation("domain", f"no folder procedures/{domain}"))
        if missing:
            raise InvalidInputError("unknown procedures", missing, reason="PROCEDURE_FILE_NOT_FOUND")
        chosen = [f for f in files if (not names or f.name in names) and (not domain or f.domain == domain)]
        routines, recorded = await asyncio.gather(self._wh.list_routines(self._dataset), self._checksums())
        deployed = {r.name for r in routines}
        results: list[SyncResult] = []
        try:
            for file in chosen:
                results.append(
                    await self._sync_one(file, file.name in deployed, recorded.get(file.name), force)
                )
        finally:  # record what was deployed even if a transient error stops the sync half-way
            await self._record_synced([r for r in results if r.outcome in ("created", "updated")])
        return results

    async def _record_synced(self, done: list[SyncResult]) -> None:
        if done:
            await self._wh.query(
                f"DELETE FROM {self._t('procedure_sync_state')} WHERE procedure_name IN UNNEST(@n)",
                {"n": [r.name for r in done]},
            )
            now = datetime.now(UTC)
            await self._wh.load_rows(
                self._dataset,
                "procedure_sync_state",
                [
                    {"procedure_name": r.name, "domain": r.domain, "checksum": r.checksum, "synced_at": now}
                    for r in done
                ],
            )

    async def _sync_one(
        self, file: ProcedureFile, exists: bool, recorded: str | None, force: bool
    ) -> SyncResult:
        if exists and recorded == file.checksum and not force:
            return SyncResult(file.name, file.domain, "unchanged", file.checksum)
        try:
            await self._wh.query(self._render(file))
        except TerminalError as exc:  # for the root key's caller: the warehouse's own words, bounded
            error = f"{exc.message}: {exc.detail}" if exc.detail else exc.message
            return SyncResult(file.name, file.domain, "failed", file.checksum, error[:1000])
        return SyncResult(file.name, file.domain, "updated" if exists else "created", file.checksum)

    async def deployed(self) -> list[ProcedureView]:
        """Every deployed procedure, ordered by name."""
        routines, recorded = await asyncio.gather(self._wh.list_routines(self._dataset), self._checksums())
        files = {f.name: f for f in self.files()}
        return [self._view(r, recorded, files) for r in routines if r.routine_type_is_procedure]

    async def get(self, name: str) -> ProcedureView:
        """One deployed procedure with its definition."""
        routine, recorded = await asyncio.gather(self._routine(name), self._checksums())
        return self._view(routine, recorded, {f.name: f for f in self.files()})

    async def delete(self, name: str) -> str:
        """Drop a procedure and forget its checksum; return its full name."""
        routine = await self._routine(name)
        await self._wh.delete_routine(self._dataset, name)
        await self._wh.query(
            f"DELETE FROM {self._t('procedure_sync_state')} WHERE procedure_name = @n", {"n": name}
        )
        return routine.full_name

    async def _routine(self, name: str) -> RoutineInfo:
        sql.check_name(name)
        try:
            return await self._wh.get_routine(self._dataset, name)
        except NotFoundError as exc:
            raise NotFoundError(
                f"procedure {name!r} not found", reason="PROCEDURE_NOT_FOUND", metadata={"name": name}
            ) from exc

    @staticmethod
    def _view(
        routine: RoutineInfo, recorded: dict[str, str], files: dict[str, ProcedureFile]
    ) -> ProcedureView:
        file = files.get(routine.name)
        return ProcedureView(
            routine,
            file.domain if file else "",
            recorded.get(routine.name, ""),
            file.checksum if file else "",
        )

    async def execute_migration(
        self, name: str, dataset: str, *, dry_run: bool, force: bool, executed_by: str
    ) -> list[MigrationOutcome]:
        """Run a migration against `dataset`, or against every active org's dataset when it is "".

        A named dataset that fails raises (the call fails); with every dataset, each one's failure is
        reported in its outcome and the others still run (at most `migration_concurrency` at once).
        """
        violations = []
        if not sql.NAME.fullmatch(name):
            violations.append(FieldViolation("name", "must be a procedure name"))
        if dataset and not sql.NAME.fullmatch(dataset):
            violations.append(FieldViolation("dataset", "letters, digits and underscores"))
        if violations:
            raise InvalidInputError("invalid migration request", violations)
        if dataset == self._dataset:
            raise InvalidInputError(
                "migrations run against org datasets, not the central dataset",
                [FieldViolation("dataset", "the central dataset")],
                reason="DATASET_NOT_ALLOWED",
                metadata={"dataset": dataset},
            )
        file = next((f for f in self.files() if f.name == name and f.domain == MIGRATIONS), None)
        if file is None:
            raise NotFoundError(
                f"no migration {name!r} in procedures/{MIGRATIONS}",
                reason="MIGRATION_NOT_FOUND",
                metadata={"name": name},
            )
        recorded, datasets = await asyncio.gather(self._checksums(), self._org_datasets())
        checksum = recorded.get(name)
        if checksum is None:
            raise NotFoundError(
                f"migration {name!r} is not deployed; run procedure sync first",
                reason="MIGRATION_NOT_DEPLOYED",
                metadata={"name": name},
            )
        if dataset:
            if dataset not in datasets:
                raise NotFoundError(
                    f"no active org has the dataset {dataset!r}",
                    reason="DATASET_NOT_FOUND",
                    metadata={"dataset": dataset},
                )
            return [await self._migrate(name, dataset, checksum, dry_run, force, executed_by)]
        limit = asyncio.Semaphore(self._concurrency)

        async def one(target: str) -> MigrationOutcome:
            async with limit:
                try:
                    return await self._migrate(name, target, checksum, dry_run, force, executed_by)
                except ServiceError as exc:
                    return MigrationOutcome(target, None, error_reason=exc.reason, error=exc.message)

        return list(await asyncio.gather(*(one(d) for d in sorted(datasets))))

    async def _migrate(
        self, name: str, dataset: str, checksum: str, dry_run: bool, force: bool, executed_by: str
    ) -> MigrationOutcome:
        async with self._locks.setdefault((name, dataset), asyncio.Lock()):
            if not dry_run and not force:
                earlier = await self._applied(name, dataset, checksum)
                if earlier is not None:
                    return MigrationOutcome(dataset, earlier, already_applied=True)
            result = await self._wh.call_procedure(self._dataset, name, [dataset, dry_run])
            run = MigrationRun(
                name,
                dataset,
                checksum,
                dry_run,
                executed_by,
                datetime.now(UTC),
                [json_value(r) for r in result.rows],
            )
            await self._record(run)
            return MigrationOutcome(dataset, run)

    async def _applied(self, name: str, dataset: str, checksum: str) -> MigrationRun | None:
        """The latest non-dry-run execution of this version (checksum) of the migration on `dataset`."""
        rows = await self._wh.query(
            f"SELECT * FROM {self._t('migration_history')} WHERE migration_name = @n AND dataset = @d "
            "AND checksum = @c AND NOT dry_run ORDER BY executed_at DESC LIMIT 1",
            {"n": name, "d": dataset, "c": checksum},
        )
        return self._run_of(rows[0]) if rows else None

    @staticmethod
    def _run_of(row: Row) -> MigrationRun:
        return MigrationRun(
            row["migration_name"],
            row["dataset"],
            row["checksum"],
            row["dry_run"],
            row["executed_by"],
            row["executed_at"],
            json.loads(row["result_rows"] or "[]"),
        )

    async def _record(self, run: MigrationRun) -> None:
        await self._wh.query(
            f"INSERT INTO {self._t('migration_history')} (execution_id, migration_name, dataset, checksum, "
            "dry_run, executed_by, executed_at, result_rows) VALUES (@id, @n, @d, @c, @dry, @by, @at, @rows)",
            {
                "id": uuid.uuid4().hex,
                "n": run.name,
                "d": run.dataset,
                "c": run.checksum,
                "dry": run.dry_run,
                "by": run.executed_by,
                "at": run.executed_at,
                "rows": json.dumps(run.rows),
            },
        )

    async def history(self, name: str, dataset: str) -> list[MigrationRun]:
        """Every recorded execution of `name` on `dataset`, oldest first."""
        rows = await self._wh.query(
            f"SELECT * FROM {self._t('migration_history')} WHERE migration_name = @n AND dataset = @d "
            "ORDER BY executed_at",
            {"n": name, "d": dataset},
        )
        return [self._run_of(r) for r in rows]
