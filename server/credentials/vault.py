"""Decrypted credentials for steps: a short in-memory cache, and the org-scoped view a step gets.

`CredentialVault.for_org(org)` is what `StepContext.secrets` is: its `get(provider, name)` can only
read that org's rows, and the AAD check makes a row copied from another org unreadable anyway. A
decrypted credential is kept in memory for `ttl` seconds per (org, provider, name) with its version
(a replaced secret is picked up within the TTL); failures are never cached. Concurrent steps asking
for the same credential share one decryption.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from server import metrics
from server.credentials.model import Credential
from server.credentials.store import CredentialStore
from server.errors import ServiceError

Key = tuple[str, str, str]


class CredentialVault:
    """Loads credentials through the store, caches them briefly."""

    def __init__(
        self, store: CredentialStore, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[Key, tuple[Credential, float]] = {}
        self._locks: dict[Key, asyncio.Lock] = {}

    def for_org(self, org_slug: str) -> OrgSecrets:
        """The secrets of one org (what a step's context holds)."""
        return OrgSecrets(self, org_slug)

    async def get(self, org_slug: str, provider: str, name: str = "default") -> Credential:
        """The decrypted credential, from the cache while it is fresh."""
        key = (org_slug, provider, name)
        cached = self._cache.get(key)
        if cached is not None and cached[1] > self._clock():
            metrics.labelled(metrics.CREDENTIAL_DECRYPTS, provider, "cached").inc()
            return cached[0]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._cache.get(key)
            if cached is not None and cached[1] > self._clock():
                return cached[0]
            try:
                credential = await self.store.load(org_slug, provider, name)
            except ServiceError:
                metrics.labelled(metrics.CREDENTIAL_DECRYPTS, provider, "failed").inc()
                raise
            metrics.labelled(metrics.CREDENTIAL_DECRYPTS, provider, "ok").inc()
            if self._ttl > 0:
                self._cache[key] = (credential, self._clock() + self._ttl)
            return credential

    def forget(self, org_slug: str) -> None:
        """Drop an org's cached credentials (after set or delete in this process)."""
        for key in [k for k in self._cache if k[0] == org_slug]:
            del self._cache[key]


class OrgSecrets:
    """`Secrets` of one org: there is no parameter that names another org."""

    __slots__ = ("_org", "_vault")

    def __init__(self, vault: CredentialVault, org_slug: str) -> None:
        self._vault = vault
        self._org = org_slug

    async def get(self, provider: str, name: str = "default") -> Credential:
        """The org's credential `name` for `provider`."""
        return await self._vault.get(self._org, provider, name)

    def __repr__(self) -> str:
        return f"OrgSecrets(org_slug={self._org!r})"
