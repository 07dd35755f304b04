"""Event-loop stall monitor: how late a short sleep wakes up on the server's loop while a cell runs."""

from __future__ import annotations

import asyncio
import contextlib
import time

TICK = 0.005


class LagMonitor:
    """Samples the loop every `TICK` seconds; `max_ms` is the worst oversleep seen."""

    def __init__(self) -> None:
        self.max_ms = 0.0
        self.over_50ms = 0
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            began = time.perf_counter()
            await asyncio.sleep(TICK)
            late = (time.perf_counter() - began - TICK) * 1000.0
            self.max_ms = max(self.max_ms, late)
            self.over_50ms += late > 50.0

    async def __aenter__(self) -> LagMonitor:
        self._task = asyncio.create_task(self._loop(), name="bench-lag-monitor")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
