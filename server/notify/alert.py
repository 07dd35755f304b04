"""What a notification is about."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Alert:
    """Something to tell the org about: RUN_FAILED, RUN_TIMED_OUT, RUN_RECOVERED or QUOTA_EXCEEDED."""

    event: str
    org_slug: str
    pipeline_key: str
    run_id: str
    state: str
    reason: str
    error: str
    attempt: int
