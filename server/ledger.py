"""The analytics copy of the run ledger in BigQuery: `pipeline_run_events` (every run and step transition,
one STEP_ATTEMPT row per attempt) and `pipeline_runs` (one row per finished run), exported from the state
store (PostgreSQL, where the ledger lives and where every reader of runs reads) in batches.

Each export is one load job per table, taken from the state store's outbox (finished runs not yet marked
exported, with their events), never DML or streaming; a run's events reach BigQuery once it has ended.
BigQuery allows a fixed number of load jobs per table per day (1,500), so periodic exports draw on a
budget of `loads_per_day` shared by every replica: a token bucket in the state store holding an hour of it
and starting with one load; while busy for long, rows go out in bigger, rarer batches instead of failing
with quotaExceeded. One replica exports at a time (an advisory lock). Events go first and the runs' rows
after them, so a run row never exists without its transitions. An export whose answer was lost is loaded
again: readers of the copy tolerate a row stored twice. Nothing is read back from BigQuery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from server.state.store import StateStore
from server.warehouse.bigquery import BigQueryWarehouse

log = logging.getLogger(__name__)

RUNS = "pipeline_runs"
EVENTS = "pipeline_run_events"
EXPORT_LOCK = 0x5049_5045_4C45_44  # "PIPELED": one exporter at a time over all replicas


class Ledger:
    """Exports the run history from the state store to BigQuery within the daily load-job budget."""

    def __init__(
        self,
        warehouse: BigQueryWarehouse,
        dataset: str,
        store: StateStore,
        *,
        interval: float = 60.0,
        loads_per_day: int = 0,
    ) -> None:
        self._wh = warehouse
        self._dataset = dataset
        self._store = store
        self._interval = interval
        self._loads_per_day = loads_per_day
        self._task: asyncio.Task[None] | None = None
        self.exported = 0  # runs exported by this replica since it started

    async def _budget(self) -> bool:
        """Take one export from the shared budget (always granted without a limit)."""
        if not self._loads_per_day:
            return True
        per_day = float(self._loads_per_day)
        wait = await self._store.take_token(
            f"ledger-loads:{self._dataset}", per_day / 86400.0, max(1.0, per_day / 24.0), 1.0
        )
        return wait == 0

    async def _load(self, kind: str, ndjson: bytes) -> None:
        await self._wh.load_ndjson(self._dataset, EVENTS if kind == "events" else RUNS, ndjson)

    async def flush(self) -> int:
        """Export every finished run not yet exported now, regardless of the budget; return how many."""
        total = 0
        for _ in range(1000):
            done = await self._store.export(self._load, lock_key=EXPORT_LOCK)
            if done is None:  # another replica is exporting: wait for it
                await asyncio.sleep(0.05)
                continue
            total += done
            self.exported += done
            if not done:
                return total
        return total

    async def _tick(self) -> None:
        if await self._store.unexported() and await self._budget():
            self.exported += await self._store.export(self._load, lock_key=EXPORT_LOCK) or 0

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._tick()
            except Exception as exc:  # the rows stay in the outbox; the next tick retries
                log.warning("ledger export failed, will retry: %s", type(exc).__name__)

    def start(self) -> None:
        """Start the periodic export."""
        self._task = asyncio.create_task(self._loop(), name="ledger-export")

    async def close(self) -> None:
        """Stop exporting; what is left stays in the outbox for the next export of any replica."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
