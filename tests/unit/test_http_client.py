"""The outbound HTTP client against a real local aiohttp server (tests/fakes/provider.py)."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import jwt as google_jwt
from prometheus_client import REGISTRY

from server.credentials.model import Credential
from server.errors import TerminalError, TransientError
from server.http.client import HttpSettings, OutboundHttp, parse_retry_after, redact_url
from server.http.types import Paging
from server.localstack.process import free_port
from server.providers import ProviderRegistry, ProviderSpec
from tests.fakes.provider import FakeProvider, Reply

SECRET = "sk-test-" + "s3cr3t" * 6


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeProvider]:
    server = FakeProvider()
    await server.start()
    yield server
    await server.stop()


def provider(pid: str, base_url: str, auth: dict[str, Any], **extra: Any) -> ProviderSpec:
    fields = extra.pop("fields", {"token": {"secret": True}})
    return ProviderSpec.model_validate(
        {
            "id": pid,
            "display_name": pid.title(),
            "base_url": base_url,
            "auth": auth,
            "credential": {"fingerprint": next(iter(fields)), "fields": fields},
            "rate_limits": extra.pop(
                "rate_limits",
                {
                    "per_org": {"requests_per_minute": 6000, "concurrent": 8},
                    "per_process": {"requests_per_minute": 60000, "concurrent": 64},
                },
            ),
            **extra,
        }
    )


def credential(pid: str, **fields: str) -> Credential:
    return Credential(
        id=f"cred_{pid}",
        org_slug="acme",
        provider=pid,
        name="default",
        version=1,
        fields=fields or {"token": SECRET},
        secret_fields=frozenset({"token", "admin_api_key", "client_secret", "password", "private_key"}),
    )


class Sleeps:
    """Records the client's waits and sleeps for real, but at most 10 ms each."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(min(seconds, 0.01))


def client(
    fake: FakeProvider, *specs: ProviderSpec, jitter: float = 0.5, **settings: Any
) -> tuple[Any, Sleeps]:
    sleeps = Sleeps()
    registry = ProviderRegistry({s.id: s for s in specs} or {"api": provider("api", fake.url, BEARER)})
    defaults: dict[str, Any] = {"backoff_initial": 1.0, "backoff_max": 30.0, "read_timeout": 2.0}
    out = OutboundHttp(
        registry, HttpSettings(**{**defaults, **settings}), sleep=sleeps, jitter=lambda: jitter
    )
    return out, sleeps


BEARER = {"scheme": "bearer", "field": "token"}


async def test_429_retry_after_seconds_is_honoured(fake: FakeProvider) -> None:
    fake.script(
        "/a/seconds", Reply(429, {"error": "slow down"}, {"Retry-After": "7"}), Reply(200, {"ok": True})
    )
    out, sleeps = client(fake)
    before = REGISTRY.get_sample_value("provider_http_throttled_total", {"provider": "api"}) or 0
    body = await out.bind("acme", "run_1", "s1").get_json("api", "/a/seconds", credential=credential("api"))
    assert body == {"ok": True}
    assert sleeps.delays == [7.0]
    assert len(fake.requests("/a/seconds")) == 2
    assert REGISTRY.get_sample_value("provider_http_throttled_total", {"provider": "api"}) == before + 1
    await out.close()


async def test_429_retry_after_http_date_is_honoured(fake: FakeProvider) -> None:
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=5), usegmt=True)
    fake.script("/a/date", Reply(429, b"", {"Retry-After": when}), Reply(200, {"ok": 1}))
    out, sleeps = client(fake)
    assert await out.bind("acme").get_json("api", "/a/date") == {"ok": 1}
    assert len(sleeps.delays) == 1 and 3.0 <= sleeps.delays[0] <= 5.0
    await out.close()


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0  # in the past: at once
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


async def test_5xx_backs_off_exponentially_with_jitter_then_succeeds(fake: FakeProvider) -> None:
    fake.script("/a/flaky", Reply(500, b"oops"), Reply(503, b"busy"), Reply(502), Reply(200, {"n": 3}))
    out, sleeps = client(fake, jitter=0.5)
    assert await out.bind("acme").get_json("api", "/a/flaky") == {"n": 3}
    assert sleeps.delays == [0.5, 1.0, 2.0]  # 0.5 x min(30, 1 x 2^n)
    await out.close()


async def test_5xx_exhausts_attempts_as_transient(fake: FakeProvider) -> None:
    fake.script("/a/down", Reply(503, b"down"))
    out, _ = client(fake, max_attempts=3)
    with pytest.raises(TransientError) as caught:
        await out.bind("acme").get_json("api", "/a/down")
    assert caught.value.reason == "PROVIDER_UNAVAILABLE"
    assert "after 3 attempts" in caught.value.message
    assert len(fake.requests("/a/down")) == 3
    await out.close()


async def test_retry_after_beyond_the_cap_ends_the_call(fake: FakeProvider) -> None:
    fake.script("/a/later", Reply(429, b"", {"Retry-After": "3600"}))
    out, sleeps = client(fake, backoff_max=30.0)
    with pytest.raises(TransientError) as caught:
        await out.bind("acme").get_json("api", "/a/later")
    assert caught.value.reason == "PROVIDER_RATE_LIMITED"
    assert sleeps.delays == [] and len(fake.requests("/a/later")) == 1
    await out.close()


async def test_total_retry_budget(fake: FakeProvider) -> None:
    fake.script("/a/budget", Reply(429, b"", {"Retry-After": "20"}))
    out, sleeps = client(fake, retry_budget=45.0, max_attempts=10)
    with pytest.raises(TransientError, match="retry budget"):
        await out.bind("acme").get_json("api", "/a/budget")
    assert sleeps.delays == [20.0, 20.0]
    await out.close()


async def test_slow_body_times_out_and_is_retried(fake: FakeProvider) -> None:
    fake.script("/a/slow", Reply(200, {"rows": list(range(200))}, stall=1.5), Reply(200, {"rows": [1]}))
    out, _ = client(fake, read_timeout=0.3)
    started = time.monotonic()
    assert await out.bind("acme").get_json("api", "/a/slow") == {"rows": [1]}
    assert time.monotonic() - started < 1.4
    assert len(fake.requests("/a/slow")) == 2
    await out.close()


async def test_slow_headers_time_out_then_give_up(fake: FakeProvider) -> None:
    fake.script("/a/hang", Reply(200, {"x": 1}, delay=1.0))
    out, _ = client(fake, read_timeout=0.2, max_attempts=2)
    with pytest.raises(TransientError) as caught:
        await out.bind("acme").get_json("api", "/a/hang")
    assert caught.value.reason == "PROVIDER_UNAVAILABLE" and "Timeout" in caught.value.message
    await out.close()


async def test_malformed_json_is_terminal_without_the_body(fake: FakeProvider) -> None:
    fake.script("/a/bad", Reply(200, b'{"data": [1, 2,, "sk-leak"'))
    out, _ = client(fake)
    with pytest.raises(TerminalError) as caught:
        await out.bind("acme").get_json("api", "/a/bad")
    assert caught.value.reason == "PROVIDER_BAD_RESPONSE"
    assert "sk-leak" not in caught.value.message
    assert len(fake.requests("/a/bad")) == 1
    await out.close()


async def test_numbers_are_exact_decimals_by_default(fake: FakeProvider) -> None:
    fake.script("/a/money", Reply(200, b'{"amount": 0.1, "big": 12345678901234567890.123456789, "n": 3}'))
    out, _ = client(fake)
    exact = await out.bind("acme").get_json("api", "/a/money")
    assert exact == {"amount": Decimal("0.1"), "big": Decimal("12345678901234567890.123456789"), "n": 3}
    assert type(exact["n"]) is int
    loose = await out.bind("acme").get_json("api", "/a/money", exact=False)
    assert isinstance(loose["amount"], float)
    fake.script("/a/nan", Reply(200, b'{"amount": NaN}'))
    with pytest.raises(TerminalError, match="not valid JSON"):
        await out.bind("acme").get_json("api", "/a/nan")
    await out.close()


async def test_401_is_credential_rejected_and_echoed_secrets_are_masked(fake: FakeProvider) -> None:
    echo = {"error": {"message": f"Incorrect API key provided: {SECRET}. Check it."}}
    fake.script("/a/401", Reply(401, echo))
    fake.script("/a/403", Reply(403, {"error": "forbidden"}))
    fake.script("/a/404", Reply(404, {"message": "no such thing"}))
    out, sleeps = client(fake)
    http = out.bind("acme")
    with pytest.raises(TerminalError) as caught:
        await http.get_json("api", f"/a/401?api_key={SECRET}", credential=credential("api"))
    assert caught.value.reason == "CREDENTIAL_REJECTED"
    assert SECRET not in caught.value.message and "Incorrect API key provided: ***" in caught.value.message
    assert "api_key=***" in caught.value.message
    with pytest.raises(TerminalError) as forbidden:
        await http.get_json("api", "/a/403", credential=credential("api"))
    assert forbidden.value.reason == "CREDENTIAL_REJECTED"
    with pytest.raises(TerminalError) as missing:
        await http.get_json("api", "/a/404")
    assert missing.value.reason == "PROVIDER_REJECTED" and "no such thing" in missing.value.message
    assert sleeps.delays == [] and len(fake.requests("/a/401")) == 1
    await out.close()


async def test_response_size_cap(fake: FakeProvider) -> None:
    fake.script("/a/huge", Reply(200, b"[" + b"1," * 5000 + b"1]"))
    out, _ = client(fake, max_response_bytes=4096)
    with pytest.raises(TerminalError) as caught:
        await out.bind("acme").get_json("api", "/a/huge")
    assert caught.value.reason == "PROVIDER_RESPONSE_TOO_LARGE"
    async with out.bind("acme").stream("api", "GET", "/a/huge") as response:  # streaming is not capped
        body = b"".join([c async for c in response.chunks(1024)])
    assert response.status == 200 and len(body) == 10003
    await out.close()


async def test_cursor_pagination_and_a_repeated_cursor(fake: FakeProvider) -> None:
    pages = {
        None: {"data": [1], "has_more": True, "next_page": "c2"},
        "c2": {"data": [2], "has_more": True, "next_page": "c3"},
        "c3": {"data": [3], "has_more": False, "next_page": None},
    }
    fake.script("/a/pages", lambda r: Reply(200, pages[r.query.get("page")]))
    out, _ = client(fake)
    paging = Paging("cursor", next_field="next_page", param="page", has_more_field="has_more")
    got = [
        p["data"][0] async for p in out.bind("acme").paginate("api", "/a/pages", paging, params={"limit": 1})
    ]
    assert got == [1, 2, 3]
    assert [r.query for r in fake.requests("/a/pages")][-2:] == [
        {"limit": "1", "page": "c2"},
        {"limit": "1", "page": "c3"},
    ]

    loop = {
        None: {"data": [1], "has_more": True, "next_page": "c2"},
        "c2": {"data": [2], "has_more": True, "next_page": "c2"},
    }
    fake.script("/a/loop", lambda r: Reply(200, loop[r.query.get("page")]))
    seen: list[int] = []
    with pytest.raises(TerminalError) as caught:
        async for page in out.bind("acme").paginate("api", "/a/loop", paging):
            seen.append(page["data"][0])
    assert caught.value.reason == "PAGINATION_LOOP" and seen == [1, 2]
    await out.close()


async def test_page_token_and_max_pages(fake: FakeProvider) -> None:
    fake.script(
        "/a/endless",
        lambda r: Reply(
            200, {"items": [], "nextPageToken": f"t{int(r.query.get('pageToken', 't0')[1:]) + 1}"}
        ),
    )
    out, _ = client(fake)
    paging = Paging("page_token", next_field="nextPageToken", param="pageToken")
    count = 0
    with pytest.raises(TerminalError) as caught:
        async for _ in out.bind("acme").paginate("api", "/a/endless", paging, max_pages=5):
            count += 1
    assert caught.value.reason == "PAGINATION_LIMIT" and count == 5
    await out.close()


async def test_next_url_from_the_link_header(fake: FakeProvider) -> None:
    def page(r: Any) -> Reply:
        n = int(r.query.get("p", "1"))
        headers = {"Link": f'<{fake.url}/a/linked?p={n + 1}>; rel="next"'} if n < 3 else {}
        return Reply(200, {"n": n}, headers)

    fake.script("/a/linked", page)
    out, _ = client(fake)
    got = [b["n"] async for b in out.bind("acme").paginate("api", "/a/linked", Paging("next_url"))]
    assert got == [1, 2, 3]
    await out.close()


async def test_urls_outside_the_provider_are_refused(fake: FakeProvider) -> None:
    out, _ = client(fake)
    with pytest.raises(TerminalError) as caught:
        await out.bind("acme").get_json("api", "http://127.0.0.2:1/steal", credential=credential("api"))
    assert caught.value.reason == "PROVIDER_URL_REJECTED"
    await out.close()


async def test_auth_schemes_from_the_registry(fake: FakeProvider) -> None:
    anthropic = provider(
        "anthropic",
        fake.url,
        {"scheme": "api_key_header", "header": "x-api-key", "field": "admin_api_key"},
        headers={"anthropic-version": "2023-06-01"},
        fields={"admin_api_key": {"secret": True}},
    )
    basic = provider(
        "basicapi",
        fake.url,
        {"scheme": "basic", "username_field": "user", "password_field": "password"},
        fields={"user": {}, "password": {"secret": True}},
    )
    oauth = provider(
        "oauthapi",
        fake.url,
        {
            "scheme": "oauth2_client_credentials",
            "token_url": "/oauth/token",
            "client_id_field": "client_id",
            "client_secret_field": "client_secret",
            "scopes": ["read"],
        },
        fields={"client_id": {}, "client_secret": {"secret": True}},
    )
    open_api = provider("open", fake.url, {"scheme": "none"}, fields={"token": {"required": False}})
    fake.script("/auth/check", Reply(200, {"ok": True}))
    fake.script(
        "/oauth/token",
        Reply(200, {"access_token": "tok-abc-123", "expires_in": 3600, "token_type": "bearer"}),
    )
    out, _ = client(fake, anthropic, basic, oauth, open_api)
    http = out.bind("acme")
    await http.get_json("anthropic", "/auth/check", credential=credential("anthropic", admin_api_key=SECRET))
    sent = fake.requests("/auth/check")[-1].headers
    assert (
        sent["x-api-key"] == SECRET
        and sent["anthropic-version"] == "2023-06-01"
        and "Authorization" not in sent
    )
    await http.get_json(
        "basicapi", "/auth/check", credential=credential("basicapi", user="u", password="p w")
    )
    assert fake.requests("/auth/check")[-1].headers["Authorization"] == "Basic dTpwIHc="
    for _ in range(2):
        await http.get_json(
            "oauthapi", "/auth/check", credential=credential("oauthapi", client_id="cid", client_secret="cs")
        )
        assert fake.requests("/auth/check")[-1].headers["Authorization"] == "Bearer tok-abc-123"
    token_calls = fake.requests("/oauth/token")
    assert len(token_calls) == 1 and token_calls[0].headers["Authorization"] == "Basic Y2lkOmNz"
    await http.get_json("open", "/auth/check")
    assert "Authorization" not in fake.requests("/auth/check")[-1].headers
    with pytest.raises(TerminalError) as caught:
        await http.get_json(
            "basicapi", "/auth/check", credential=credential("anthropic", admin_api_key=SECRET)
        )
    assert caught.value.reason == "CREDENTIAL_PROVIDER_MISMATCH"
    await out.close()


async def test_rate_limit_per_org_and_concurrency_cap(fake: FakeProvider) -> None:
    limited = provider(
        "limited",
        fake.url,
        BEARER,
        rate_limits={
            "per_org": {"requests_per_minute": 60, "concurrent": 2},
            "per_process": {"requests_per_minute": 6000, "concurrent": 50},
        },
    )
    fake.script("/a/limited", Reply(200, {"ok": 1}, delay=0.05))
    out, sleeps = client(fake, limited)
    acme, globex = out.bind("acme"), out.bind("globex")
    await asyncio.gather(*(acme.get_json("limited", "/a/limited") for _ in range(8)))
    assert fake.max_active["/a/limited"] == 2  # the per-org concurrency cap
    # 60 rpm bursts 6: the 7th and 8th requests of acme waited for tokens; globex has its own bucket
    assert sleeps.delays and all(0 < d <= 1.0 for d in sleeps.delays)
    waited = len(sleeps.delays)
    await asyncio.gather(*(globex.get_json("limited", "/a/limited") for _ in range(6)))
    assert len(sleeps.delays) == waited
    await out.close()


def test_redact_url() -> None:
    url = "https://user:pw@api.example.com/v1/x?api_key=abc&page=2&access_token=t&limit=5"
    assert redact_url(url) == "https://api.example.com/v1/x?api_key=***&page=2&access_token=***&limit=5"
    assert redact_url("https://h/p/sk-secret-value", ["sk-secret-value"]) == "https://h/p/***"


async def test_google_service_account_jwt_bearer(fake: FakeProvider) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token_url = f"{fake.url}/sa/token"
    seen: list[dict[str, Any]] = []

    async def token(request: Any) -> Reply:
        form = await request.post()
        claims = google_jwt.decode(form["assertion"], certs=public, audience=token_url)
        seen.append({"grant_type": form["grant_type"], **claims})
        return Reply(200, {"access_token": "ya29.test-token", "expires_in": 3599, "token_type": "Bearer"})

    fake.script("/sa/token", token)
    fake.script("/sa/api", Reply(200, {"ok": True}))
    spec = provider(
        "gcpsa",
        fake.url,
        {
            "scheme": "google_service_account",
            "scopes": ["https://www.googleapis.com/auth/bigquery.readonly"],
            "token_url": "/sa/token",
        },
        fields={"client_email": {}, "private_key_id": {"secret": True}, "private_key": {"secret": True}},
    )
    out, _ = client(fake, spec)
    sa = credential(
        "gcpsa", client_email="svc@proj.iam.gserviceaccount.com", private_key_id="kid-1", private_key=pem
    )
    for _ in range(2):
        assert await out.bind("acme").get_json("gcpsa", "/sa/api", credential=sa) == {"ok": True}
        assert fake.requests("/sa/api")[-1].headers["Authorization"] == "Bearer ya29.test-token"
    assert len(seen) == 1  # cached until a minute before it expires
    assert seen[0]["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert seen[0]["iss"] == "svc@proj.iam.gserviceaccount.com"
    assert seen[0]["scope"] == "https://www.googleapis.com/auth/bigquery.readonly"
    broken = credential("gcpsa", client_email="x@y", private_key_id="kid-2", private_key="not a key")
    broken_id = Credential(
        id="cred_other",
        org_slug="acme",
        provider="gcpsa",
        name="default",
        version=1,
        fields=broken.reveal(),
        secret_fields=frozenset({"private_key", "private_key_id"}),
    )
    with pytest.raises(TerminalError) as caught:
        await out.bind("acme").get_json("gcpsa", "/sa/api", credential=broken_id)
    assert caught.value.reason == "CREDENTIAL_REJECTED" and "not a key" not in caught.value.message
    await out.close()


async def test_a_stream_holds_its_slot_until_read_and_expected_statuses_return(fake: FakeProvider) -> None:
    single = provider(
        "single",
        fake.url,
        BEARER,
        rate_limits={
            "per_org": {"requests_per_minute": 6000, "concurrent": 1},
            "per_process": {"requests_per_minute": 6000, "concurrent": 10},
        },
    )
    fake.script("/s/export", Reply(200, b"x" * 300_000))
    fake.script("/s/gone", Reply(404, {"message": "no export yet"}))
    out, _ = client(fake, single)
    http = out.bind("acme")
    async with http.stream("single", "GET", "/s/export") as response:
        other = asyncio.create_task(http.request("single", "GET", "/s/gone", expect=(404,)))
        await asyncio.sleep(0.2)
        assert not other.done()  # the org's only slot is the open stream's
        size = sum([len(c) async for c in response.chunks()])
    gone = await asyncio.wait_for(other, 5)
    assert size == 300_000 and gone.status == 404 and gone.json() == {"message": "no export yet"}
    await out.close()


async def test_connection_refused_is_retried_then_transient(fake: FakeProvider) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out, sleeps = client(fake, provider("nowhere", closed, BEARER), max_attempts=3)
    with pytest.raises(TransientError) as caught:
        await out.bind("acme").get_json("nowhere", "/x")
    assert caught.value.reason == "PROVIDER_UNAVAILABLE" and "ClientConnectorError" in caught.value.message
    assert len(sleeps.delays) == 2
    await out.close()
