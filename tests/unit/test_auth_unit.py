"""`Authenticator`, `FailureThrottle` and `check_org` with a fake clock and a dict standing in for the key
store (the lookup function is the only seam; everything else is the real code)."""

from __future__ import annotations

from datetime import datetime

import pytest

from server.api.guard import _client_of, _peer_address
from server.auth import (
    Access,
    Authenticator,
    FailureThrottle,
    Policy,
    RootPrincipal,
    check_org,
)
from server.errors import PermissionDeniedError, ThrottledError, UnauthenticatedError
from server.orgs import OrgContext, hash_key

ROOT = "unit-root-key-0123456789abcdef0123456789"
KEY = "ca_unit_key_" + "k" * 32
ORG_READ = Policy(Access.ORG, "pipelines:read")
ROOT_POLICY = Policy(Access.ROOT)
TTL = 10.0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def org(slug: str = "acme", scopes: tuple[str, ...] = ("pipelines:read", "pipelines:run")) -> OrgContext:
    return OrgContext(
        org_slug=slug,
        org_api_key_id=f"key_{slug}",
        dataset=f"{slug}_local",
        scopes=frozenset(scopes),
        daily_limit=100,
        monthly_limit=3000,
        concurrent_limit=5,
        requests_per_minute=60,
    )


class KeyStore:
    """Key hash -> org; records every lookup."""

    def __init__(self) -> None:
        self.keys: dict[str, OrgContext] = {}
        self.lookups: list[str] = []

    def add(self, api_key: str, context: OrgContext) -> None:
        self.keys[hash_key(api_key)] = context

    def remove(self, api_key: str) -> None:
        del self.keys[hash_key(api_key)]

    async def lookup(self, key_hash: str, now: datetime) -> OrgContext | None:
        assert now.tzinfo is not None
        self.lookups.append(key_hash)
        return self.keys.get(key_hash)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> KeyStore:
    keys = KeyStore()
    keys.add(KEY, org())
    return keys


@pytest.fixture
def auth(clock: Clock, store: KeyStore) -> Authenticator:
    return Authenticator(root_key=ROOT, lookup=store.lookup, ttl=TTL, failures_per_minute=3, clock=clock)


def org_key(api_key: str = KEY) -> dict[str, str]:
    return {"x-api-key": api_key}


# --- cache --------------------------------------------------------------------------------------------


async def test_verified_key_is_cached_for_ttl(auth: Authenticator, clock: Clock, store: KeyStore) -> None:
    first = await auth.authenticate(ORG_READ, org_key(), lambda: "c")
    assert first == org()
    assert len(store.lookups) == 1
    clock.advance(TTL - 0.01)
    assert await auth.authenticate(ORG_READ, org_key(), lambda: "c") == org()
    assert len(store.lookups) == 1
    clock.advance(0.02)
    assert await auth.authenticate(ORG_READ, org_key(), lambda: "c") == org()
    assert len(store.lookups) == 2
    # The cache entry was refreshed by the second lookup.
    clock.advance(TTL - 0.01)
    await auth.authenticate(ORG_READ, org_key(), lambda: "c")
    assert len(store.lookups) == 2


async def test_revocation_visible_after_ttl(auth: Authenticator, clock: Clock, store: KeyStore) -> None:
    await auth.authenticate(ORG_READ, org_key(), lambda: "c")
    store.remove(KEY)
    clock.advance(TTL / 2)
    # Within the TTL the cached verification still holds (documented trade-off).
    assert await auth.authenticate(ORG_READ, org_key(), lambda: "c") == org()
    clock.advance(TTL / 2 + 0.01)
    with pytest.raises(UnauthenticatedError) as caught:
        await auth.authenticate(ORG_READ, org_key(), lambda: "c")
    assert caught.value.reason == "API_KEY_INVALID"
    # The stale entry is gone: every further call asks the store again.
    lookups = len(store.lookups)
    with pytest.raises(UnauthenticatedError):
        await auth.authenticate(ORG_READ, org_key(), lambda: "c")
    assert len(store.lookups) == lookups + 1


async def test_unknown_keys_are_not_cached(auth: Authenticator, store: KeyStore) -> None:
    other = "ca_other_" + "o" * 34
    for _ in range(2):
        with pytest.raises(UnauthenticatedError) as caught:
            await auth.authenticate(ORG_READ, org_key(other), lambda: "c")
        assert caught.value.reason == "API_KEY_INVALID"
    assert store.lookups == [hash_key(other)] * 2
    # Issued a moment later, the key works at once (no negative caching).
    store.add(other, org("globex"))
    principal = await auth.authenticate(ORG_READ, org_key(other), lambda: "c")
    assert isinstance(principal, OrgContext)
    assert principal.org_slug == "globex"


async def test_lookup_gets_the_hash_not_the_key(auth: Authenticator, store: KeyStore) -> None:
    await auth.authenticate(ORG_READ, org_key(), lambda: "c")
    assert store.lookups == [hash_key(KEY)]
    assert KEY not in store.lookups[0]
    assert len(store.lookups[0]) == 64


# --- org keys -----------------------------------------------------------------------------------------


async def test_org_key_missing_and_root_key_on_org_method(auth: Authenticator, store: KeyStore) -> None:
    with pytest.raises(UnauthenticatedError) as missing:
        await auth.authenticate(ORG_READ, {}, lambda: "c")
    assert missing.value.reason == "API_KEY_MISSING"
    assert missing.value.metadata == {"header": "X-API-Key"}
    with pytest.raises(PermissionDeniedError) as root:
        await auth.authenticate(ORG_READ, {"x-ca-root-key": ROOT}, lambda: "c")
    assert root.value.reason == "ORG_KEY_REQUIRED"
    assert store.lookups == []


async def test_scope(clock: Clock, store: KeyStore) -> None:
    runner = "ca_runner_" + "r" * 33
    store.add(runner, org(scopes=("pipelines:run",)))
    auth = Authenticator(root_key=ROOT, lookup=store.lookup, ttl=TTL, failures_per_minute=3, clock=clock)
    with pytest.raises(PermissionDeniedError) as caught:
        await auth.authenticate(ORG_READ, org_key(runner), lambda: "c")
    assert caught.value.reason == "SCOPE_MISSING"
    assert caught.value.metadata == {"scope": "pipelines:read"}
    # A policy without a scope accepts any valid org key; the scope check also applies to cached keys.
    assert isinstance(await auth.authenticate(Policy(Access.ORG), org_key(runner), lambda: "c"), OrgContext)
    with pytest.raises(PermissionDeniedError):
        await auth.authenticate(ORG_READ, org_key(runner), lambda: "c")
    assert len(store.lookups) == 1


async def test_public_needs_nothing(auth: Authenticator, store: KeyStore) -> None:
    assert await auth.authenticate(Policy(Access.PUBLIC), {}, lambda: "c") is None
    assert await auth.authenticate(Policy(Access.PUBLIC), org_key("garbage"), lambda: "c") is None
    assert store.lookups == []


# --- root key -----------------------------------------------------------------------------------------


async def test_root_key_exact_match(auth: Authenticator) -> None:
    principal = await auth.authenticate(ROOT_POLICY, {"x-ca-root-key": ROOT}, lambda: "c")
    assert principal == RootPrincipal()
    # With an org key as well, the root method still takes the root key.
    assert (
        await auth.authenticate(ROOT_POLICY, {"x-ca-root-key": ROOT, **org_key()}, lambda: "c")
        == RootPrincipal()
    )


@pytest.mark.parametrize(
    "presented", [ROOT[:-1], ROOT + "x", ROOT.upper(), "", " " + ROOT, ROOT[1:], "x" * len(ROOT)]
)
async def test_root_key_near_misses(clock: Clock, store: KeyStore, presented: str) -> None:
    auth = Authenticator(root_key=ROOT, lookup=store.lookup, ttl=TTL, failures_per_minute=100, clock=clock)
    with pytest.raises(UnauthenticatedError) as caught:
        await auth.authenticate(ROOT_POLICY, {"x-ca-root-key": presented}, lambda: "c")
    assert caught.value.reason == "ROOT_KEY_INVALID"


async def test_unset_root_key_accepts_nothing(clock: Clock, store: KeyStore) -> None:
    auth = Authenticator(root_key="", lookup=store.lookup, ttl=TTL, failures_per_minute=100, clock=clock)
    with pytest.raises(UnauthenticatedError) as caught:
        await auth.authenticate(ROOT_POLICY, {"x-ca-root-key": ""}, lambda: "c")
    assert caught.value.reason == "ROOT_KEY_INVALID"


async def test_root_key_missing_and_org_key_on_root_method(auth: Authenticator) -> None:
    with pytest.raises(UnauthenticatedError) as missing:
        await auth.authenticate(ROOT_POLICY, {}, lambda: "c")
    assert missing.value.reason == "ROOT_KEY_MISSING"
    assert missing.value.metadata == {"header": "X-CA-Root-Key"}
    with pytest.raises(PermissionDeniedError) as org_only:
        await auth.authenticate(ROOT_POLICY, org_key(), lambda: "c")
    assert org_only.value.reason == "ROOT_KEY_REQUIRED"


# --- throttling ---------------------------------------------------------------------------------------


async def test_fourth_failure_is_throttled(auth: Authenticator, clock: Clock) -> None:
    for _ in range(3):
        with pytest.raises(UnauthenticatedError):
            await auth.authenticate(ORG_READ, org_key("ca_bad"), lambda: "10.0.0.1")
        clock.advance(1)
    with pytest.raises(ThrottledError) as caught:
        await auth.authenticate(ORG_READ, org_key("ca_bad"), lambda: "10.0.0.1")
    assert caught.value.reason == "AUTH_THROTTLED"
    assert caught.value.retry_after == pytest.approx(57.0)
    # Throttled calls are refused before the key is looked at, valid or not, org or root.
    with pytest.raises(ThrottledError):
        await auth.authenticate(ORG_READ, org_key(), lambda: "10.0.0.1")
    with pytest.raises(ThrottledError):
        await auth.authenticate(ROOT_POLICY, {"x-ca-root-key": ROOT}, lambda: "10.0.0.1")
    # Another client is unaffected.
    assert isinstance(await auth.authenticate(ORG_READ, org_key(), lambda: "10.0.0.2"), OrgContext)
    # Once the first failure leaves the window, one more attempt is allowed.
    clock.advance(57)
    assert isinstance(await auth.authenticate(ORG_READ, org_key(), lambda: "10.0.0.1"), OrgContext)


async def test_the_client_is_only_worked_out_once_failures_are_on_record(auth: Authenticator) -> None:
    asked: list[str] = []

    def client() -> str:
        asked.append("asked")
        return "10.0.0.9"

    assert isinstance(await auth.authenticate(ORG_READ, org_key(), client), OrgContext)
    assert asked == []  # nothing on record: nobody can be throttled
    with pytest.raises(UnauthenticatedError):
        await auth.authenticate(ORG_READ, org_key("ca_bad"), client)
    assert asked == ["asked"]  # the failure is counted against it
    assert isinstance(await auth.authenticate(ORG_READ, org_key(), client), OrgContext)
    assert asked == ["asked", "asked"]  # now every call is checked


async def test_permission_denied_does_not_count(auth: Authenticator) -> None:
    for _ in range(10):
        with pytest.raises(PermissionDeniedError):
            await auth.authenticate(ORG_READ, {"x-ca-root-key": ROOT}, lambda: "c")
        with pytest.raises(PermissionDeniedError):
            await auth.authenticate(ROOT_POLICY, org_key(), lambda: "c")
    assert auth.throttle.check("c") is None


async def test_missing_and_root_failures_count(auth: Authenticator) -> None:
    with pytest.raises(UnauthenticatedError):
        await auth.authenticate(ORG_READ, {}, lambda: "c")
    with pytest.raises(UnauthenticatedError):
        await auth.authenticate(ROOT_POLICY, {}, lambda: "c")
    with pytest.raises(UnauthenticatedError):
        await auth.authenticate(ROOT_POLICY, {"x-ca-root-key": "nope"}, lambda: "c")
    with pytest.raises(ThrottledError):
        await auth.authenticate(ORG_READ, org_key(), lambda: "c")


def test_throttle_window_slides(clock: Clock) -> None:
    throttle = FailureThrottle(3, clock=clock)
    start = clock.now
    for offset in (0, 10, 20):
        clock.now = start + offset
        throttle.check("c")
        throttle.record("c")
    clock.now = start + 30
    with pytest.raises(ThrottledError) as caught:
        throttle.check("c")
    assert caught.value.retry_after == pytest.approx(30.0)
    # At exactly 60 s the first failure has left the window.
    clock.now = start + 60
    throttle.check("c")
    throttle.record("c")
    with pytest.raises(ThrottledError) as again:
        throttle.check("c")
    assert again.value.retry_after == pytest.approx(10.0)  # until the failure at +10 expires
    clock.now = start + 70
    throttle.check("c")


def test_throttle_retry_after_is_at_least_one_second(clock: Clock) -> None:
    throttle = FailureThrottle(1, clock=clock)
    throttle.record("c")
    clock.advance(59.9)
    with pytest.raises(ThrottledError) as caught:
        throttle.check("c")
    assert caught.value.retry_after == 1.0
    clock.advance(0.1)
    throttle.check("c")


def test_throttle_forgets_idle_clients(clock: Clock) -> None:
    throttle = FailureThrottle(2, clock=clock)
    for client in ("a", "b", "c"):
        throttle.record(client)
    clock.advance(61)
    for client in ("a", "b", "c"):
        throttle.check(client)
    assert throttle._failures == {}


# --- org matching -------------------------------------------------------------------------------------


def test_check_org() -> None:
    acme = org("acme")
    check_org(acme, "acme")
    with pytest.raises(PermissionDeniedError) as caught:
        check_org(acme, "globex")
    assert caught.value.reason == "ORG_MISMATCH"
    assert caught.value.metadata == {"org_slug": "globex"}
    with pytest.raises(PermissionDeniedError):
        check_org(acme, "")
    with pytest.raises(PermissionDeniedError):
        check_org(acme, "ACME")
    # The root key may name any org.
    check_org(RootPrincipal(), "globex")
    check_org(RootPrincipal(), "")


# --- client identity (the throttle's key) -------------------------------------------------------------


class Peer:
    """The one method of grpc's ServicerContext that `_client_of` uses."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:127.0.0.1:54321", "127.0.0.1"),
        ("ipv6:[::1]:54321", "::1"),
        ("ipv6:%5B::1%5D:54321", "::1"),
        ("unix:/tmp/socket", "unix:/tmp/socket"),
    ],
)
def test_peer_address_drops_port(peer: str, address: str) -> None:
    assert _peer_address(peer) == address


def test_client_is_last_forwarded_hop() -> None:
    peer = Peer("ipv4:127.0.0.1:1111")
    trusted = frozenset({"127.0.0.1"})
    assert _client_of({"x-forwarded-for": "203.0.113.7"}, peer, trusted) == "203.0.113.7"  # type: ignore[arg-type]
    spoofed = {"x-forwarded-for": "198.51.100.1, 203.0.113.7"}
    assert _client_of(spoofed, peer, trusted) == "203.0.113.7"  # type: ignore[arg-type]
    assert _client_of({"x-forwarded-for": "203.0.113.7,"}, peer, trusted) == "203.0.113.7"  # type: ignore[arg-type]
    assert _client_of({}, peer, trusted) == "127.0.0.1"  # type: ignore[arg-type]


def test_forwarded_for_is_ignored_from_an_untrusted_peer() -> None:
    direct = Peer("ipv4:10.1.2.3:4444")
    trusted = frozenset({"127.0.0.1"})
    assert _client_of({"x-forwarded-for": "203.0.113.7"}, direct, trusted) == "10.1.2.3"  # type: ignore[arg-type]
    assert _client_of({"x-forwarded-for": "198.51.100.9"}, direct, trusted) == "10.1.2.3"  # type: ignore[arg-type]


def test_client_ignores_the_source_port() -> None:
    peer = Peer("ipv4:127.0.0.1:1111")
    trusted = frozenset({"127.0.0.1"})
    assert _client_of({}, Peer("ipv4:127.0.0.1:2222"), trusted) == _client_of({}, peer, trusted)  # type: ignore[arg-type]
