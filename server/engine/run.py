"""The in-memory view of a pipeline run: its state, its steps and its event history."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

RunState = Literal["PENDING", "RUNNING", "COMPLETED", "FAILED", "TIMEOUT", "CANCELLING", "CANCELLED"]
TERMINAL: frozenset[str] = frozenset({"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"})
ACTIVE: frozenset[str] = frozenset({"PENDING", "RUNNING", "CANCELLING"})


@dataclass(slots=True)
class StepView:
    """One step's current state in a run."""

    step_id: str
    ps_type: str
    state: str = "PENDING"
    attempts: int = 0
    duration_ms: int = 0
    rows_written: int = 0
    error: str = ""
    error_reason: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        """JSON-ready form, for the ledger's `steps` column."""
        return {
            "step_id": self.step_id,
            "ps_type": self.ps_type,
            "state": self.state,
            "attempts": self.attempts,
            "duration_ms": self.duration_ms,
            "rows_written": self.rows_written,
            "error": self.error,
            "error_reason": self.error_reason,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepView:
        """Inverse of `as_json`."""
        return cls(
            step_id=data["step_id"],
            ps_type=data["ps_type"],
            state=data["state"],
            attempts=data["attempts"],
            duration_ms=data["duration_ms"],
            rows_written=data["rows_written"],
            error=data["error"],
            error_reason=data["error_reason"],
            started_at=datetime.fromisoformat(data["started_at"]) if data.get("started_at") else None,
            ended_at=datetime.fromisoformat(data["ended_at"]) if data.get("ended_at") else None,
        )


@dataclass(frozen=True, slots=True)
class Event:
    """One watched event: a run-level state change (step_id empty) or a step change."""

    at: datetime
    run_state: str
    step_id: str = ""
    step_state: str = ""
    attempt: int = 0
    error: str = ""


@dataclass(eq=False)
class Run:
    """A run as this process knows it."""

    run_id: str
    org_slug: str
    pipeline_key: str
    pipeline_id: str
    trigger: str
    triggered_by: str
    parameters: dict[str, str]
    request_id: str
    create_time: datetime
    state: str = "PENDING"
    start_time: datetime | None = None
    end_time: datetime | None = None
    reason: str = ""
    error: str = ""
    steps: dict[str, StepView] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    dedupe_key: str = ""
    _changed: asyncio.Event | None = field(default=None, repr=False)  # made when someone waits
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def terminal(self) -> bool:
        """Whether the run has ended."""
        return self.state in TERMINAL

    def notify(self, event: Event) -> None:
        """Append an event and wake the watchers."""
        self.events.append(event)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def next_change(self) -> asyncio.Event:
        """An event set by the next `notify` (only runs someone watches pay for one)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed
