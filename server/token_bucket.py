"""A token bucket: tokens come back continuously at `rate` per second, up to `capacity`."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Rate limiting for one key (a provider's outbound HTTP calls in this process; the per-org RunPipeline
    rate and the ledger's load budget are shared buckets in the state store).

    `rate` and `capacity` may be changed between calls (a plan changed); the tokens already there stay,
    capped at the new capacity on the next refill.
    """

    def __init__(
        self,
        rate: float,
        capacity: float,
        *,
        tokens: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity if tokens is None else tokens
        self._clock = clock
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self) -> bool:
        """Take one token if there is one."""
        self._refill()
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def spend(self) -> None:
        """Take one token even if there is none: the bucket goes into debt, later takes wait for it."""
        self._refill()
        self._tokens -= 1.0

    def wait_seconds(self) -> float:
        """Seconds until a token will be there (0 if one is)."""
        return max(0.0, (1.0 - self._tokens) / self.rate)
