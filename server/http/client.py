"""The one outbound HTTP client: every call to a provider API goes through `OutboundHttp`.

- One `aiohttp.ClientSession` per process (created in the running loop), a connection pool with a total
  and a per-host limit, connect / socket-read / total timeouts.
- Retries for 429, 5xx, connection errors and timeouts: exponential backoff with full jitter
  (`uniform(0, min(backoff_max, initial * 2**n))`); a `Retry-After` (seconds or HTTP-date) replaces the
  jittered delay. A delay above `backoff_max`, a total wait above `retry_budget` or `max_attempts`
  attempts end the call with a `TransientError` (`PROVIDER_RATE_LIMITED` / `PROVIDER_UNAVAILABLE`) that
  the engine may retry as a step. Other 4xx are terminal: 401/403 `CREDENTIAL_REJECTED`, the rest
  `PROVIDER_REJECTED`.
- Client-side limits from the registry: a token bucket per provider x org and per provider (requests per
  minute) and a concurrency cap per provider x org and per provider, so 500 orgs at 02:00 stay within
  what a provider allows this service.
- Bodies are capped (`max_response_bytes`, `PROVIDER_RESPONSE_TOO_LARGE`); `stream()` reads large bodies
  in chunks instead. JSON is parsed exactly (Decimal) by default, orjson on request (see `types.py`);
  big bodies are parsed off the event loop.
- Secrets never leave: URLs are logged and reported with sensitive query values masked, errors carry no
  request header and no body except a provider's short error message with every secret value of the
  credential replaced; auth headers are built per request from the credential and never logged.
- Metrics per provider (requests by outcome, retries by reason, 429s, latency) and a log line per retry
  and per failure with org, run and step ids.

`OutboundHttp.bind(org, run, step)` gives the `HttpClient` a step's context holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import aiohttp
import orjson

from server import metrics
from server.credentials.model import Credential
from server.errors import ServiceError, TerminalError, TransientError
from server.http.auth import AuthApplier
from server.http.types import HttpResponse, Paging, dig, parse_json
from server.providers import Auth, ProviderRegistry, ProviderSpec
from server.token_bucket import TokenBucket

log = logging.getLogger(__name__)

SENSITIVE_PARAM = re.compile(r"(key|token|secret|password|passwd|signature|sig|auth|code|credential)", re.I)
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;[^,]*\brel="?next"?', re.I)
_OFF_LOOP_BYTES = 1 << 20  # parse JSON bodies above 1 MiB in a thread
_ERROR_TEXT = 200  # characters of a provider's error message kept in our error


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Timeouts, retries, pool and size limits of the process's client."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    total_timeout: float = 300.0
    max_attempts: int = 5
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    retry_budget: float = 120.0
    max_response_bytes: int = 64 * 1024 * 1024
    max_connections: int = 100
    max_connections_per_host: int = 20


@dataclass(frozen=True, slots=True)
class CallIds:
    """Whose call this is (logs and rate-limit keys)."""

    org_slug: str
    run_id: str = ""
    step_id: str = ""

    def fields(self) -> dict[str, str]:
        """Log fields."""
        return {
            k: v
            for k, v in (("org_slug", self.org_slug), ("run_id", self.run_id), ("step_id", self.step_id))
            if v
        }


def redact_url(url: str, secrets: Sequence[str] = ()) -> str:
    """The URL without user info, with sensitive query values (and any known secret) masked."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    query = urlencode(
        [
            (k, "***" if SENSITIVE_PARAM.search(k) else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ],
        safe="*",
    )
    return redact_text(urlunsplit((parts.scheme, netloc, parts.path, query, "")), secrets)


def redact_text(text: str, secrets: Sequence[str]) -> str:
    """`text` with each secret value (4+ characters) replaced by `***`."""
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP-date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _provider_message(body: bytes, secrets: Sequence[str]) -> str:
    """A provider's short error message (`error.message`, `error`, `message`), secrets masked, bounded."""
    try:
        data = orjson.loads(body[:65536])
    except orjson.JSONDecodeError:
        return ""
    message: Any = None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        message = message if isinstance(message, str) else data.get("message")
    if not isinstance(message, str):
        return ""
    clean = "".join(c if c.isprintable() else " " for c in message)
    return redact_text(clean, secrets)[:_ERROR_TEXT]


class _Limits:
    """Token buckets and semaphores of one provider (process) or one provider x org."""

    def __init__(self, requests_per_minute: int, concurrent: int, clock: Callable[[], float]) -> None:
        rate = requests_per_minute / 60.0
        self.bucket = TokenBucket(rate, max(1.0, requests_per_minute / 10.0), clock=clock)
        self.slots = asyncio.Semaphore(concurrent)


class _Attempt:
    """What one failed attempt tells the retry loop."""

    def __init__(self, reason: str, detail: str, retry_after: float | None = None):
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class _Streamed:
    """An open response whose body is read in chunks."""

    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self._response = response
        self.status = response.status
        self.headers = {k.lower(): v for k, v in response.headers.items()}
        self.url = url

    async def chunks(self, size: int = 65536) -> AsyncIterator[bytes]:
        """The body, chunk by chunk."""
        try:
            async for chunk in self._response.content.iter_chunked(size):
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(
                f"{self.url}: the body stopped ({type(exc).__name__})", reason="PROVIDER_UNAVAILABLE"
            ) from exc


class OutboundHttp:
    """The process's HTTP client to providers (one per process; close it at shutdown)."""

    def __init__(
        self,
        registry: ProviderRegistry,
        settings: HttpSettings | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.settings = settings or HttpSettings()
        self._sleep = sleep
        self._jitter = jitter
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._process: dict[str, _Limits] = {}
        self._orgs: dict[tuple[str, str], _Limits] = {}
        self.auth = AuthApplier(self._fetch_token, clock)
        s = self.settings
        self._timeout = aiohttp.ClientTimeout(
            total=s.total_timeout, connect=s.connect_timeout, sock_read=s.read_timeout
        )
        # A streamed body may take longer than one attempt's total; each read still has its deadline.
        self._stream_timeout = aiohttp.ClientTimeout(connect=s.connect_timeout, sock_read=s.read_timeout)

    # -- lifecycle ---------------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            s = self.settings
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=s.max_connections, limit_per_host=s.max_connections_per_host
                ),
                timeout=self._timeout,
                trust_env=False,
                raise_for_status=False,
            )
        return self._session

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def bind(self, org_slug: str, run_id: str = "", step_id: str = "") -> BoundHttp:
        """The client for one org (and run and step): what `StepContext.http` is."""
        return BoundHttp(self, CallIds(org_slug, run_id, step_id))

    # -- the request path --------------------------------------------------------------------------

    def _limits(self, spec: ProviderSpec, org_slug: str) -> tuple[_Limits, _Limits]:
        process = self._process.get(spec.id)
        if process is None:
            p = spec.rate_limits.per_process
            process = self._process[spec.id] = _Limits(p.requests_per_minute, p.concurrent, self._clock)
        org = self._orgs.get((spec.id, org_slug))
        if org is None:
            o = spec.rate_limits.per_org
            org = self._orgs[(spec.id, org_slug)] = _Limits(o.requests_per_minute, o.concurrent, self._clock)
        return org, process

    async def _take(self, bucket: TokenBucket) -> None:
        for _ in range(10_000):
            if bucket.take():
                return
            await self._sleep(max(bucket.wait_seconds(), 0.001))
        raise TransientError("rate limiter starved", reason="PROVIDER_RATE_LIMITED")  # pragma: no cover

    @staticmethod
    def url(spec: ProviderSpec, path_or_url: str) -> str:
        """The absolute URL: a path joins the base URL; an absolute URL must be on the provider's host."""
        parts = urlsplit(path_or_url)
        if parts.scheme:
            base = urlsplit(spec.base_url)
            if (parts.scheme, parts.netloc) != (base.scheme, base.netloc):
                raise TerminalError(
                    f"{spec.id}: refusing a URL outside the provider's base URL ({parts.scheme}://{parts.hostname})",
                    reason="PROVIDER_URL_REJECTED",
                )
            return path_or_url
        if not spec.base_url:
            raise TerminalError(
                f"{spec.id} has no base URL: set PROVIDER_BASE_URL_{spec.id.upper()}",
                reason="PROVIDER_NOT_CONFIGURED",
            )
        return urljoin(spec.base_url.rstrip("/") + "/", path_or_url.lstrip("/"))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return self._jitter() * min(
            self.settings.backoff_max, self.settings.backoff_initial * 2.0 ** (attempt - 1)
        )

    async def _read(self, response: aiohttp.ClientResponse, url: str) -> bytes:
        cap = self.settings.max_response_bytes
        if response.content_length is not None and response.content_length > cap:
            raise TerminalError(
                f"{url}: response of {response.content_length} bytes exceeds the {cap}-byte cap",
                reason="PROVIDER_RESPONSE_TOO_LARGE",
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > cap:
                raise TerminalError(
                    f"{url}: response exceeds the {cap}-byte cap", reason="PROVIDER_RESPONSE_TOO_LARGE"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def send(
        self,
        ids: CallIds,
        provider: str,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        data: bytes | Mapping[str, str] | None = None,
        credential: Credential | None = None,
        expect: Sequence[int] = (),
        stream: bool = False,
        stack: contextlib.AsyncExitStack | None = None,
        auth: Auth | None = None,
    ) -> HttpResponse | _Streamed:
        """One call with limits, auth and retries (see the module docstring); `auth` replaces the
        registry's scheme for this call (a declarative step's own auth), with the same token handling."""
        spec = self.registry.get(provider)
        if auth is not None:
            spec = spec.model_copy(update={"auth": auth})
        target = self.url(spec, path_or_url)
        secrets = credential.secret_values() if credential is not None else []
        shown = redact_url(target, secrets)
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        body = orjson.dumps(json) if json is not None else None
        org_limits, process_limits = self._limits(spec, ids.org_slug)
        started = self._clock()
        waited = 0.0
        attempt = 0
        refreshed = False
        while True:
            attempt += 1
            request_headers = {**spec.headers, **(headers or {})}
            if body is not None:
                request_headers.setdefault("Content-Type", "application/json")
            request_headers.update(await self.auth.headers(spec, credential))
            sent_query = {**query, **self.auth.query_params(spec, credential)}
            failure: _Attempt
            async with contextlib.AsyncExitStack() as held:
                await held.enter_async_context(org_limits.slots)
                await held.enter_async_context(process_limits.slots)
                await self._take(org_limits.bucket)
                await self._take(process_limits.bucket)
                t0 = time.perf_counter()
                try:
                    response = await self._client().request(
                        method,
                        target,
                        params=sent_query or None,
                        headers=request_headers,
                        data=body if body is not None else data,
                        allow_redirects=False,
                        timeout=self._stream_timeout if stream else self._timeout,
                    )
                    status = response.status
                    if stream and (200 <= status < 300 or status in expect) and stack is not None:
                        # The caller reads the body later: the slots stay taken until it is done.
                        stack.push_async_exit(held.pop_all())
                        stack.push_async_callback(response.release)
                        self._observe(spec.id, str(status), t0)
                        return _Streamed(response, shown)
                    try:
                        content = await self._read(response, shown)
                    finally:
                        response.release()
                except ServiceError:
                    self._observe(spec.id, "error", t0)
                    raise
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self._observe(spec.id, "error", t0)
                    failure = _Attempt("PROVIDER_UNAVAILABLE", type(exc).__name__)
                else:
                    self._observe(spec.id, str(status), t0)
                    if 200 <= status < 300 or status in expect:
                        return HttpResponse(
                            status, {k.lower(): v for k, v in response.headers.items()}, content, shown
                        )
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                    message = _provider_message(content, secrets)
                    detail = f"HTTP {status}" + (f": {message}" if message else "")
                    if status == 429:
                        metrics.labelled(metrics.HTTP_THROTTLED, spec.id).inc()
                        failure = _Attempt("PROVIDER_RATE_LIMITED", detail, retry_after)
                    elif status >= 500 or status == 408:
                        failure = _Attempt("PROVIDER_UNAVAILABLE", detail, retry_after)
                    else:
                        if status in (401, 403) and credential is not None:
                            self.auth.forget(credential.id)
                            if status == 401 and not refreshed and self.auth.uses_tokens(spec):
                                # the token may have been revoked or expired early: mint one, once
                                refreshed = True
                                continue
                        reason = "CREDENTIAL_REJECTED" if status in (401, 403) else "PROVIDER_REJECTED"
                        self._log_failure(ids, spec.id, method, shown, attempt, detail, reason)
                        raise TerminalError(f"{spec.id}: {method} {shown}: {detail}", reason=reason)
            delay = self._delay(attempt, failure.retry_after)
            give_up = ""
            if attempt >= self.settings.max_attempts:
                give_up = f"after {attempt} attempts"
            elif delay > self.settings.backoff_max:
                give_up = f"the provider asks to wait {delay:.0f} s"
            elif waited + delay > self.settings.retry_budget:
                give_up = f"retry budget of {self.settings.retry_budget:.0f} s spent"
            if give_up:
                self._log_failure(ids, spec.id, method, shown, attempt, failure.detail, failure.reason)
                took = self._clock() - started
                raise TransientError(
                    f"{spec.id}: {method} {shown}: {failure.detail} ({give_up}, {took:.1f} s)",
                    reason=failure.reason,
                )
            metrics.labelled(metrics.HTTP_RETRIES, spec.id, failure.reason).inc()
            log.info(
                "retrying %s %s in %.2f s (attempt %d: %s)",
                method,
                shown,
                delay,
                attempt,
                failure.detail,
                extra={"fields": {**ids.fields(), "provider": spec.id}},
            )
            waited += delay
            await self._sleep(delay)

    @staticmethod
    def _observe(provider: str, status: str, t0: float) -> None:
        outcome = status if status in ("429", "error") else f"{status[0]}xx"
        metrics.labelled(metrics.HTTP_REQUESTS, provider, outcome).inc()
        metrics.labelled(metrics.HTTP_SECONDS, provider).observe(time.perf_counter() - t0)

    @staticmethod
    def _log_failure(
        ids: CallIds, provider: str, method: str, url: str, attempt: int, detail: str, reason: str
    ) -> None:
        log.warning(
            "%s %s failed: %s (%s, attempt %d)",
            method,
            url,
            detail,
            reason,
            attempt,
            extra={"fields": {**ids.fields(), "provider": provider}},
        )

    async def _fetch_token(self, token_url: str, form: dict[str, str], authorization: str | None) -> Any:
        """One OAuth2 token request (form-encoded; the client authenticated by `authorization`, if any)."""
        headers = {"Authorization": authorization} if authorization else {}
        try:
            async with self._client().post(
                token_url, data=form, headers=headers, allow_redirects=False, timeout=self._timeout
            ) as response:
                content = await self._read(response, redact_url(token_url))
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(
                f"token endpoint {redact_url(token_url)} unreachable ({type(exc).__name__})",
                reason="PROVIDER_UNAVAILABLE",
            ) from exc
        if status == 429 or status >= 500:
            raise TransientError(
                f"token endpoint {redact_url(token_url)}: HTTP {status}", reason="PROVIDER_UNAVAILABLE"
            )
        if status != 200:
            raise TerminalError(
                f"token endpoint {redact_url(token_url)}: HTTP {status}", reason="CREDENTIAL_REJECTED"
            )
        return parse_json(content, exact=False, what=redact_url(token_url))

    async def json_body(self, response: HttpResponse, exact: bool) -> Any:
        """Parse a response's JSON body, off the event loop when it is big."""
        if len(response.body) > _OFF_LOOP_BYTES:
            return await asyncio.to_thread(parse_json, response.body, exact=exact, what=response.url)
        return parse_json(response.body, exact=exact, what=response.url)


class BoundHttp:
    """`HttpClient` for one org, run and step (see `processors.base.HttpClient`)."""

    def __init__(self, outbound: OutboundHttp, ids: CallIds) -> None:
        self._out = outbound
        self.ids = ids

    async def request(
        self,
        provider: str,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        data: bytes | Mapping[str, str] | None = None,
        credential: Credential | None = None,
        expect: Sequence[int] = (),
        auth: Auth | None = None,
    ) -> HttpResponse:
        """One request with retries; the whole body (capped)."""
        response = await self._out.send(
            self.ids,
            provider,
            method.upper(),
            path_or_url,
            params=params,
            headers=headers,
            json=json,
            data=data,
            credential=credential,
            expect=expect,
            auth=auth,
        )
        assert isinstance(response, HttpResponse)
        return response

    async def get_json(
        self,
        provider: str,
        path_or_url: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        credential: Credential | None = None,
        exact: bool = True,
        auth: Auth | None = None,
    ) -> Any:
        """GET and parse the JSON body."""
        response = await self.request(
            provider, "GET", path_or_url, params=params, headers=headers, credential=credential, auth=auth
        )
        return await self._out.json_body(response, exact)

    async def post_json(
        self,
        provider: str,
        path_or_url: str,
        body: Any,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        credential: Credential | None = None,
        exact: bool = True,
    ) -> Any:
        """POST a JSON body and parse the JSON answer."""
        response = await self.request(
            provider, "POST", path_or_url, params=params, headers=headers, json=body, credential=credential
        )
        return await self._out.json_body(response, exact)

    async def paginate(
        self,
        provider: str,
        path_or_url: str,
        paging: Paging,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        credential: Credential | None = None,
        exact: bool = True,
        max_pages: int | None = None,
        auth: Auth | None = None,
    ) -> AsyncIterator[Any]:
        """Each page's parsed body, until the last; guards against loops and endless listings.

        A cursor, token or URL seen before, or a page whose body repeats an earlier page byte for byte (an
        API that ignores the offset or page parameter), raises `PAGINATION_LOOP`.
        """
        limit = max_pages or self._out.registry.get(provider).pages.max_pages
        url: str = path_or_url
        base: dict[str, Any] = dict(params or {})
        if paging.style in ("offset", "page_number"):
            base.update(
                {
                    paging.param: paging.start,
                    **({paging.size_param: paging.page_size} if paging.size_param else {}),
                }
            )
        query: dict[str, Any] = dict(base)
        seen: set[str] = {path_or_url}
        bodies: set[bytes] = set()
        position = paging.start
        for page in range(1, limit + 2):
            if page > limit:
                raise TerminalError(
                    f"{provider}: more than {limit} pages from {redact_url(path_or_url)}",
                    reason="PAGINATION_LIMIT",
                )
            response = await self.request(
                provider, "GET", url, params=query or None, headers=headers, credential=credential, auth=auth
            )
            digest = hashlib.sha256(response.body).digest()
            if digest in bodies:
                raise TerminalError(
                    f"{provider}: page {page} repeats an earlier page ({redact_url(path_or_url)})",
                    reason="PAGINATION_LOOP",
                )
            bodies.add(digest)
            body = await self._out.json_body(response, exact)
            yield body
            if paging.style == "next_url":
                if paging.next_field:
                    following = dig(body, paging.next_field)
                else:
                    match = _LINK_NEXT.search(response.headers.get("link", ""))
                    following = match.group(1) if match else None
                if not following:
                    return
                if not isinstance(following, str):
                    raise TerminalError(
                        f"{provider}: the next-page URL is not a string", reason="PROVIDER_BAD_RESPONSE"
                    )
                marker, url, query = following, following, {}
            elif paging.style in ("offset", "page_number"):
                records = body if not paging.records_field else dig(body, paging.records_field)
                count = len(records) if isinstance(records, list) else 0
                if count == 0 or (paging.page_size and count < paging.page_size):
                    return
                position += count if paging.style == "offset" else 1
                marker = f"#{position}"
                query = {**base, paging.param: position}
            else:
                if paging.has_more_field and not dig(body, paging.has_more_field):
                    return
                if paging.style == "header_cursor":
                    cursor: Any = response.headers.get(paging.next_field.lower())
                else:
                    cursor = dig(body, paging.next_field)
                if cursor is None or cursor == "":
                    if paging.has_more_field:
                        raise TerminalError(
                            f"{provider}: {paging.has_more_field} is true but {paging.next_field} is empty",
                            reason="PROVIDER_BAD_RESPONSE",
                        )
                    return
                marker = str(cursor)
                query = {**base, paging.param: marker}
            if marker in seen:
                raise TerminalError(
                    f"{provider}: page {page + 1} repeats a cursor already seen ({redact_url(path_or_url)})",
                    reason="PAGINATION_LOOP",
                )
            seen.add(marker)
            del body, response  # the next page is fetched and parsed without this one still held

    @contextlib.asynccontextmanager
    async def stream(
        self,
        provider: str,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        credential: Credential | None = None,
    ) -> AsyncIterator[_Streamed]:
        """An open response (retries until its headers); read `chunks()` inside the block."""
        async with contextlib.AsyncExitStack() as stack:
            response = await self._out.send(
                self.ids,
                provider,
                method.upper(),
                path_or_url,
                params=params,
                headers=headers,
                json=json,
                credential=credential,
                stream=True,
                stack=stack,
            )
            assert isinstance(response, _Streamed)
            yield response
