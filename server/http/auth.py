"""Auth schemes of the provider registry, applied to an outgoing request from the step's credential.

`bearer`, `api_key_header`, `basic` and `none` only add a header. The token schemes fetch an access token
and cache it per credential version until a minute before it expires: `oauth2_client_credentials`
(RFC 6749 section 4.4, the client authenticated with HTTP Basic) and `google_service_account` (RFC 7523
JWT bearer: an assertion signed with the service account's private key, `google.auth.crypt`).
"""

from __future__ import annotations

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
        self._tokens: dict[tuple[str, int], tuple[SecretStr, float]] = {}

    async def headers(self, spec: ProviderSpec, credential: Credential | None) -> dict[str, str]:
        """The auth headers for one request (none without a credential)."""
        if credential is None:
            return {}
        if credential.provider != spec.id:
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
        cached = self._cached(credential)
        if cached is not None:
            return cached
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
        assertion = jwt.encode(signer, claims).decode("ascii")  # type: ignore[no-untyped-call]
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
        return await self._token(spec, auth.token_url, credential, form, None)

    def _cached(self, credential: Credential) -> str | None:
        cached = self._tokens.get((credential.id, credential.version))
        return cached[0].get_secret_value() if cached is not None and cached[1] > self._clock() else None

    async def _token(
        self,
        spec: ProviderSpec,
        token_url: str,
        credential: Credential,
        form: dict[str, str],
        basic: str | None,
    ) -> str:
        cached = self._cached(credential)
        if cached is not None:
            return cached
        body = await self._fetch(_absolute(spec, token_url), form, basic)
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise TerminalError(
                f"{spec.id}: the token endpoint returned no access_token", reason="CREDENTIAL_REJECTED"
            )
        expires = body.get("expires_in", 3600)
        lifetime = (
            float(expires) if isinstance(expires, int | float | str) and str(expires).isdigit() else 3600.0
        )
        self._tokens[(credential.id, credential.version)] = (
            SecretStr(token),
            self._clock() + max(0.0, lifetime - 60.0),
        )
        return token

    def forget(self, credential_id: str) -> None:
        """Drop cached tokens of a credential (a 401 with a cached token)."""
        for key in [k for k in self._tokens if k[0] == credential_id]:
            del self._tokens[key]
