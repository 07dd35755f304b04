"""Fake Google endpoints on 127.0.0.1: the OAuth2 token endpoint, Cloud Billing Catalog and Resource Manager.

- `POST /token` takes an RFC 7523 JWT bearer grant, verifies the assertion's RS256 signature with the
  public key registered for its `iss` (`add_service_account`), and answers `{"access_token", "expires_in"}`;
  an unknown account or a bad signature gets `400 {"error": "invalid_grant"}` as Google answers.
- `GET /v1/services` and `GET /v1/services/{id}/skus` (Catalog) and `GET /v1/projects` (Resource Manager v1)
  page through `catalog_services`, `catalog_skus[id]` and `projects` with `pageSize`/`pageToken` and
  `nextPageToken`; `short_pages` makes every page one item shorter than asked while more remain (a short
  page is not the end). They require a bearer token minted here.
- `fail(path, *statuses)` answers the next requests to a path with those statuses first (429 with
  `Retry-After: 0`, 5xx) before the real answer.
"""

from __future__ import annotations

import time
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import crypt, jwt


@dataclass
class ServiceAccount:
    """A generated service-account key: `info` is the JSON key document a customer would upload."""

    email: str
    project: str
    private_pem: str
    public_pem: str
    key_id: str

    @classmethod
    def generate(cls, email: str, project: str) -> ServiceAccount:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        public = (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
        return cls(email, project, private, public, uuid.uuid4().hex)

    def info(self, **extra: str) -> dict[str, str]:
        return {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": self.key_id,
            "private_key": self.private_pem,
            "client_email": self.email,
            "client_id": "1234567890",
            "token_uri": "https://oauth2.googleapis.com/token",
            **extra,
        }


@dataclass
class FakeGoogle:
    accounts: dict[str, ServiceAccount] = field(default_factory=dict)
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> (email, expiry)
    token_calls: list[dict[str, Any]] = field(default_factory=list)
    expires_in: int = 3600
    catalog_services: list[dict[str, Any]] = field(default_factory=list)
    catalog_skus: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    projects: list[dict[str, Any]] = field(default_factory=list)
    short_pages: bool = True
    repeat_token: bool = False  # every page names the same next token (a looping API)
    failures: dict[str, list[int]] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, str], str]] = field(default_factory=list)  # path, query, authorization
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_service_account(self, account: ServiceAccount) -> None:
        self.accounts[account.email] = account

    def fail(self, path: str, *statuses: int) -> None:
        self.failures[path] = list(statuses)

    def requests(self, prefix: str) -> list[tuple[str, dict[str, str], str]]:
        return [s for s in self.seen if s[0].startswith(prefix)]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_get("/v1/services", self._services)
        app.router.add_get("/v1/services/{service}/skus", self._skus)
        app.router.add_get("/v1/projects", self._projects)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- token endpoint ------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        form = dict(urllib.parse.parse_qsl((await request.read()).decode()))
        self.token_calls.append(form)
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return _json(400, {"error": "unsupported_grant_type"})
        assertion = form.get("assertion", "")
        try:
            unverified = jwt.decode(assertion, verify=False)  # type: ignore[no-untyped-call]
            account = self.accounts[unverified["iss"]]
            verifier = crypt.RSAVerifier.from_string(account.public_pem)  # type: ignore[no-untyped-call]
            _header, payload, signed, signature = jwt._unverified_decode(assertion)  # type: ignore[attr-defined]
            if not verifier.verify(signed, signature):
                raise ValueError("bad signature")
            if not payload.get("scope"):
                raise ValueError("no scope")
        except (KeyError, ValueError):
            return _json(400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
        token = f"ya29.fake-{len(self.token_calls)}"
        self.tokens[token] = (account.email, time.time() + self.expires_in)
        return _json(200, {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"})

    # -- APIs ----------------------------------------------------------------------------------------

    def _gate(self, request: web.Request) -> web.Response | None:
        self.seen.append((request.path, dict(request.query), request.headers.get("Authorization", "")))
        queued = self.failures.get(request.path)
        if queued:
            status = queued.pop(0)
            headers = {"Retry-After": "0"} if status == 429 else {}
            body = {
                "error": {"code": status, "status": "RESOURCE_EXHAUSTED" if status == 429 else "UNAVAILABLE"}
            }
            return _json(status, body, headers)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        known = self.tokens.get(token)
        if not auth.startswith("Bearer ") or known is None or known[1] < time.time():
            return _json(401, {"error": {"code": 401, "status": "UNAUTHENTICATED"}})
        return None

    def _page(self, request: web.Request, items: Sequence[dict[str, Any]], key: str) -> web.Response:
        size = int(request.query.get("pageSize", "50") or 50)
        start = int(request.query.get("pageToken") or 0)
        take = max(1, size - 1) if self.short_pages else size
        chunk = list(items[start : start + take])
        following = start + len(chunk)
        body: dict[str, Any] = {key: chunk}
        body["nextPageToken"] = str(following) if following < len(items) else ""
        if self.repeat_token:
            body["nextPageToken"] = "1"
        return _json(200, body)

    async def _services(self, request: web.Request) -> web.Response:
        return self._gate(request) or self._page(request, self.catalog_services, "services")

    async def _skus(self, request: web.Request) -> web.Response:
        return self._gate(request) or self._page(
            request, self.catalog_skus.get(request.match_info["service"], []), "skus"
        )

    async def _projects(self, request: web.Request) -> web.Response:
        return self._gate(request) or self._page(request, self.projects, "projects")


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
