"""Authentication: org API keys (`x-api-key`) and the root key (`x-ca-root-key`).

Org keys are looked up by SHA-256 hash in the meta tables (key ⋈ profile ⋈ subscription). A verified key
is cached for `ttl` seconds, so a revoked key stops working within that TTL (10 s locally, 30 s in
stage/prod); unknown keys are never cached but count as failures. Each client (the last
`x-forwarded-for` address, the one Envoy appended, else the peer's address without its port) may fail
`failures_per_minute` times a minute; after that its calls are refused with RESOURCE_EXHAUSTED until the
window has room again.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from server.errors import PermissionDeniedError, ThrottledError, UnauthenticatedError
from server.orgs import OrgContext, hash_key


class Access(Enum):
    """What a method requires."""

    PUBLIC = "public"
    ROOT = "root"
    ORG = "org"


@dataclass(frozen=True, slots=True)
class Policy:
    """A method's requirement; `scope` applies to org keys."""

    access: Access
    scope: str = ""


@dataclass(frozen=True, slots=True)
class RootPrincipal:
    """The caller presented the root key."""

    name: str = "root"


Principal = OrgContext | RootPrincipal | None

KeyLookup = Callable[[str, datetime], Awaitable[OrgContext | None]]


class FailureThrottle:
    """Sliding one-minute window of failed attempts per client."""

    def __init__(self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._limit = limit
        self._window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str) -> deque[float]:
        times = self._failures.get(client)
        if times is None:
            return deque()
        cutoff = self._clock() - self._window
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[client]
        return times

    def check(self, client: str) -> None:
        """Raise ThrottledError if `client` used up its failures."""
        times = self._recent(client)
        if len(times) >= self._limit:
            raise ThrottledError(
                "too many failed authentication attempts",
                reason="AUTH_THROTTLED",
                retry_after=max(1.0, times[0] + self._window - self._clock()),
            )

    @property
    def counting(self) -> bool:
        """Whether failures of any client are on record (else no client can be throttled)."""
        return bool(self._failures)

    def record(self, client: str) -> None:
        """Count one failure for `client`."""
        self._failures.setdefault(client, deque()).append(self._clock())


class Authenticator:
    """Checks the credentials of one call against a method's policy."""

    def __init__(
        self,
        *,
        root_key: str,
        lookup: KeyLookup,
        ttl: float,
        failures_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root_key = root_key.encode()
        self._lookup = lookup
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[float, OrgContext]] = {}
        self._lookups: dict[str, asyncio.Future[OrgContext | None]] = {}
        self.throttle = FailureThrottle(failures_per_minute, clock=clock)

    async def authenticate(
        self, policy: Policy, metadata: Mapping[str, str], client: Callable[[], str]
    ) -> Principal:
        """Return who is calling, or raise an AuthError / ThrottledError. `client()` names who failed
        attempts are counted against; it is only asked when failures are on record or this call fails."""
        if policy.access is Access.PUBLIC:
            return None
        if self.throttle.counting:
            self.throttle.check(client())
        try:
            if policy.access is Access.ROOT:
                return self._root(metadata)
            return await self._org(policy, metadata)
        except UnauthenticatedError:
            self.throttle.record(client())
            raise

    def _root(self, metadata: Mapping[str, str]) -> RootPrincipal:
        presented = metadata.get("x-ca-root-key")
        if presented is None:
            if "x-api-key" in metadata:
                raise PermissionDeniedError(
                    "this call needs the root key, not an org API key", reason="ROOT_KEY_REQUIRED"
                )
            raise UnauthenticatedError(
                "missing X-CA-Root-Key header",
                reason="ROOT_KEY_MISSING",
                metadata={"header": "X-CA-Root-Key"},
            )
        if not self._root_key or not hmac.compare_digest(presented.encode(), self._root_key):
            raise UnauthenticatedError("invalid root key", reason="ROOT_KEY_INVALID")
        return RootPrincipal()

    async def _org(self, policy: Policy, metadata: Mapping[str, str]) -> OrgContext:
        presented = metadata.get("x-api-key")
        if presented is None:
            if "x-ca-root-key" in metadata:
                raise PermissionDeniedError(
                    "this call needs an org API key, not the root key", reason="ORG_KEY_REQUIRED"
                )
            raise UnauthenticatedError(
                "missing X-API-Key header", reason="API_KEY_MISSING", metadata={"header": "X-API-Key"}
            )
        org = await self._verified(hash_key(presented))
        if org is None:
            raise UnauthenticatedError("invalid, revoked or expired API key", reason="API_KEY_INVALID")
        if policy.scope and policy.scope not in org.scopes:
            raise PermissionDeniedError(
                f"API key lacks scope {policy.scope}",
                reason="SCOPE_MISSING",
                metadata={"scope": policy.scope},
            )
        return org

    async def _verified(self, key_hash: str) -> OrgContext | None:
        now = self._clock()
        cached = self._cache.get(key_hash)
        if cached and cached[0] > now:
            return cached[1]
        # Single flight: concurrent calls with the same key share one lookup (no stampede at expiry).
        pending = self._lookups.get(key_hash)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(key_hash, datetime.now(UTC)))
            self._lookups[key_hash] = pending
            pending.add_done_callback(lambda _: self._lookups.pop(key_hash, None))
        org = await asyncio.shield(pending)
        if org is None:
            self._cache.pop(key_hash, None)
        else:
            self._cache[key_hash] = (now + self._ttl, org)
        return org


def check_org(principal: Principal, org_slug: str) -> None:
    """Refuse an org key whose org differs from the org named in the request."""
    if isinstance(principal, OrgContext) and principal.org_slug != org_slug:
        raise PermissionDeniedError(
            "API key does not belong to this org", reason="ORG_MISMATCH", metadata={"org_slug": org_slug}
        )
