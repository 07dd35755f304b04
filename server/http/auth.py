"""Auth schemes of the provider registry, applied to an outgoing request from the step's credential.

`bearer`, `api_key_header`, `basic` and `none` only add a header; `api_key_query` a query parameter.
The token schemes fetch an access token and cache it per credential version, provider and scheme until a
minute before it expires (one fetch in flight: concurrent calls wait for it; the client drops the token
and mints once more after a 401): `oauth2_client_credentials` (RFC 6749 section 4.4, the client
authenticated with HTTP Basic) and `google_service_account` (RFC 7523 JWT bearer: an assertion signed
with the service account's private key, `google.auth.crypt`).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urljoin

from google.auth import crypt, jwt
from pydantic import SecretStr

from server.credentials.model import Credential
from server.errors import TerminalError
from server.providers import (
    ApiKeyHeaderAuth,
    ApiKeyQueryAuth,
    BasicAuth,
    BearerAuth,
    GoogleServiceAccountAuth,
    NoAuth,
    OAuth2ClientCredentialsAuth,
    ProviderSpec,
)

# (token URL, form, HTTP Basic header or None) -> parsed JSON body of the token endpoint's answer
FetchToken = Callable[[str, dict[str, str], str | None], Awaitable[Any]]


def _absolute(spec: ProviderSpec, url: str) -> str:
    return url if "://" in url else urljoin(spec.base_url.rstrip("/") + "/", url.lstrip("/"))


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


class AuthApplier:
    """Turns (provider, credential) into request headers; holds the OAuth2 token cache."""

    def __init__(self, fetch_token: FetchToken, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch_token
        self._clock = clock
        # (credential id, version, provider): a token is minted for one provider's scopes
        self._tokens: dict[tuple[str, int, str], tuple[SecretStr, float]] = {}
        self._minting: dict[tuple[str, int, str], asyncio.Lock] = {}

    async def headers(self, spec: ProviderSpec, credential: Credential | None) -> dict[str, str]:
        """The auth headers for one request (none without a credential)."""
        if credential is None:
            return {}
        if credential.provider != spec.credential_provider:
            raise TerminalError(
                f"a {credential.provider} credential cannot authenticate calls to {spec.id}",
                reason="CREDENTIAL_PROVIDER_MISMATCH",
            )
        auth = spec.auth
        match auth:
            case BearerAuth():
                return {"Authorization": "Bearer " + credential.secret(auth.field).get_secret_value()}
            case ApiKeyHeaderAuth():
                return {auth.header: credential.secret(auth.field).get_secret_value()}
            case ApiKeyQueryAuth():
                return {}  # see query_params
            case BasicAuth():
                user = credential.reveal()[auth.username_field]
                return {
                    "Authorization": _basic(user, credential.secret(auth.password_field).get_secret_value())
                }
            case OAuth2ClientCredentialsAuth():
                return {"Authorization": "Bearer " + (await self._oauth2(spec, auth, credential))}
            case GoogleServiceAccountAuth():
                return {"Authorization": "Bearer " + (await self._google(spec, auth, credential))}
            case NoAuth():
                return {}
        raise AssertionError(auth)  # pragma: no cover

    async def _oauth2(
        self, spec: ProviderSpec, auth: OAuth2ClientCredentialsAuth, credential: Credential
    ) -> str:
        clear = credential.reveal()
        form = {"grant_type": "client_credentials"}
        if auth.scopes:
            form["scope"] = " ".join(auth.scopes)
        basic = _basic(clear[auth.client_id_field], clear[auth.client_secret_field])
        return await self._token(spec, auth.token_url, credential, form, basic)

    async def _google(
        self, spec: ProviderSpec, auth: GoogleServiceAccountAuth, credential: Credential
    ) -> str:
        async def form() -> dict[str, str]:
            token_url = _absolute(spec, auth.token_url)
            info = credential.reveal()
            try:
                signer = crypt.RSASigner.from_service_account_info(info)  # type: ignore[no-untyped-call]
            except (ValueError, KeyError, TypeError):
                raise TerminalError(
                    f"{spec.id}: the service account's private key is unusable", reason="CREDENTIAL_REJECTED"
                ) from None
            now = int(time.time())
            claims = {
                "iss": info["client_email"],
                "scope": " ".join(auth.scopes),
                "aud": token_url,
                "iat": now,
                "exp": now + 3600,
            }
            # RSA signing takes a millisecond or two: off the event loop.
            assertion = await asyncio.to_thread(jwt.encode, signer, claims)
            return {
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": assertion.decode(),
            }

        return await self._token(spec, auth.token_url, credential, form, None)

    def _key(self, spec: ProviderSpec, credential: Credential) -> tuple[str, int, str]:
        # one token per credential version, provider and auth (a step may give its own auth: scopes differ)
        return (credential.id, credential.version, f"{spec.id}|{spec.auth.model_dump_json()}")

    def _cached(self, spec: ProviderSpec, credential: Credential) -> str | None:
        cached = self._tokens.get(self._key(spec, credential))
        return cached[0].get_secret_value() if cached is not None and cached[1] > self._clock() else None

    async def _token(
        self,
        spec: ProviderSpec,
        token_url: str,
        credential: Credential,
        form: dict[str, str] | Callable[[], Awaitable[dict[str, str]]],
        basic: str | None,
    ) -> str:
        """The cached token, else one minted (one request at a time per credential and provider: many
        concurrent calls wait for the same token)."""
        cached = self._cached(spec, credential)
        if cached is not None:
            return cached
        key = self._key(spec, credential)
        async with self._minting.setdefault(key, asyncio.Lock()):
            cached = self._cached(spec, credential)
            if cached is not None:
                return cached
            body = await self._fetch(
                _absolute(spec, token_url), form if isinstance(form, dict) else await form(), basic
            )
            token = body.get("access_token") if isinstance(body, dict) else None
            if not isinstance(token, str) or not token:
                raise TerminalError(
                    f"{spec.id}: the token endpoint returned no access_token", reason="CREDENTIAL_REJECTED"
                )
            expires = body.get("expires_in", 3600)
            lifetime = (
                float(expires)
                if isinstance(expires, int | float | str) and str(expires).isdigit()
                else 3600.0
            )
            # refreshed a minute before it expires (and at once after a 401: forget)
            self._tokens[key] = (SecretStr(token), self._clock() + max(0.0, lifetime - 60.0))
            return token

    @staticmethod
    def query_params(spec: ProviderSpec, credential: Credential | None) -> dict[str, str]:
        """The auth query parameters of one request (`api_key_query` only)."""
        if credential is None or not isinstance(spec.auth, ApiKeyQueryAuth):
            return {}
        return {spec.auth.param: credential.secret(spec.auth.field).get_secret_value()}

    def uses_tokens(self, spec: ProviderSpec) -> bool:
        """Whether the scheme sends a minted token (which a 401 may mean has expired or been revoked)."""
        return isinstance(spec.auth, OAuth2ClientCredentialsAuth | GoogleServiceAccountAuth)

    def forget(self, credential_id: str) -> None:
        """Drop cached tokens of a credential (a 401 with a cached token)."""
        for key in [k for k in self._tokens if k[0] == credential_id]:
            del self._tokens[key]
