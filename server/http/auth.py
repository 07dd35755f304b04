"""Auth schemes of the provider registry, applied to an outgoing request from the step's credential.

`bearer`, `api_key_header`, `basic` and `none` only add a header. `oauth2_client_credentials` fetches a
token (RFC 6749 section 4.4, client authenticated with HTTP Basic) through the same client, caches it per
credential version until a minute before it expires. `google_service_account` is a hook: the JWT-bearer
exchange comes with the GCP issue (10); until then it fails with `AUTH_SCHEME_NOT_SUPPORTED`.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urljoin

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

# (token URL, form, basic auth header) -> parsed JSON body of the token endpoint's answer
FetchToken = Callable[[str, dict[str, str], str], Awaitable[Any]]


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
                raise TerminalError(
                    f"{spec.id}: the google_service_account auth scheme is not implemented yet",
                    reason="AUTH_SCHEME_NOT_SUPPORTED",
                )
            case NoAuth():
                return {}
        raise AssertionError(auth)  # pragma: no cover

    async def _oauth2(
        self, spec: ProviderSpec, auth: OAuth2ClientCredentialsAuth, credential: Credential
    ) -> str:
        key = (credential.id, credential.version)
        cached = self._tokens.get(key)
        if cached is not None and cached[1] > self._clock():
            return cached[0].get_secret_value()
        clear = credential.reveal()
        form = {"grant_type": "client_credentials"}
        if auth.scopes:
            form["scope"] = " ".join(auth.scopes)
        token_url = auth.token_url
        if "://" not in token_url:
            token_url = urljoin(spec.base_url.rstrip("/") + "/", token_url.lstrip("/"))
        body = await self._fetch(
            token_url, form, _basic(clear[auth.client_id_field], clear[auth.client_secret_field])
        )
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise TerminalError(
                f"{spec.id}: the token endpoint returned no access_token", reason="CREDENTIAL_REJECTED"
            )
        expires = body.get("expires_in", 3600)
        lifetime = (
            float(expires) if isinstance(expires, int | float | str) and str(expires).isdigit() else 3600.0
        )
        self._tokens[key] = (SecretStr(token), self._clock() + max(0.0, lifetime - 60.0))
        return token

    def forget(self, credential_id: str) -> None:
        """Drop cached tokens of a credential (a 401 with a cached token)."""
        for key in [k for k in self._tokens if k[0] == credential_id]:
            del self._tokens[key]
