"""The provider registry: `configs/system/providers.yml`, validated at start (unknown keys rejected).

Per provider: display name, base URL (overridden by the environment variable `PROVIDER_BASE_URL_<ID>`;
the token URL of a token scheme by `PROVIDER_TOKEN_URL_<ID>`),
static headers, the auth scheme and which credential fields it uses, the credential's fields
(required/optional, secret or not), rate limits per org and per process, page limits, and the one cheap
authenticated call that `pipeline-service credentials test` makes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.errors import FieldViolation, InvalidInputError, NotFoundError

PROVIDER_ID = r"^[a-z][a-z0-9_]*$"
FIELD_NAME = r"^[a-z][a-z0-9_]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BearerAuth(_Strict):
    """`Authorization: Bearer <field>`."""

    scheme: Literal["bearer"]
    field: str


class ApiKeyHeaderAuth(_Strict):
    """The secret in a header of its own (`x-api-key: <field>`)."""

    scheme: Literal["api_key_header"]
    field: str
    header: str = "x-api-key"


class ApiKeyQueryAuth(_Strict):
    """The secret as a query parameter (`?api_key=<field>`); redacted wherever the URL is shown."""

    scheme: Literal["api_key_query"]
    field: str
    param: str = Field("api_key", pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


class BasicAuth(_Strict):
    """HTTP Basic with two credential fields."""

    scheme: Literal["basic"]
    username_field: str
    password_field: str


class OAuth2ClientCredentialsAuth(_Strict):
    """OAuth2 client-credentials grant: a token fetched from `token_url` (relative to the base URL or
    absolute), cached until shortly before it expires, sent as a bearer token."""

    scheme: Literal["oauth2_client_credentials"]
    token_url: str
    client_id_field: str
    client_secret_field: str
    scopes: list[str] = Field(default_factory=list)


class GoogleServiceAccountAuth(_Strict):
    """A Google service-account JSON key: a JWT signed with its private key is exchanged for an access
    token at `token_url` (RFC 7523; relative to the base URL or absolute). The registry's token URL is
    used, never the `token_uri` of the uploaded document, so a signed assertion goes nowhere else."""

    scheme: Literal["google_service_account"]
    scopes: list[str] = Field(min_length=1)
    token_url: str = "https://oauth2.googleapis.com/token"


class NoAuth(_Strict):
    """No authentication."""

    scheme: Literal["none"]


Auth = Annotated[
    BearerAuth
    | ApiKeyHeaderAuth
    | ApiKeyQueryAuth
    | BasicAuth
    | OAuth2ClientCredentialsAuth
    | GoogleServiceAccountAuth
    | NoAuth,
    Field(discriminator="scheme"),
]


class CredentialField(_Strict):
    """One field of a provider's credential JSON."""

    required: bool = True
    secret: bool = False
    pattern: str | None = None
    description: str = ""


class CredentialSpec(_Strict):
    """The credential document of a provider: a JSON object of string fields."""

    fields: dict[Annotated[str, Field(pattern=FIELD_NAME)], CredentialField]
    fingerprint: str = Field(description="The field whose last 4 characters identify the credential.")

    @model_validator(mode="after")
    def _check(self) -> CredentialSpec:
        if self.fingerprint not in self.fields:
            raise ValueError(f"fingerprint field {self.fingerprint!r} is not a credential field")
        for name, spec in self.fields.items():
            if spec.pattern is not None:
                try:
                    re.compile(spec.pattern)
                except re.error as exc:
                    raise ValueError(f"field {name}: bad pattern ({exc})") from exc
        return self

    @property
    def secret_fields(self) -> frozenset[str]:
        """Names of the fields that are secret."""
        return frozenset(n for n, f in self.fields.items() if f.secret)


class Limit(_Strict):
    """Requests per minute (token bucket, bursts up to a tenth of a minute) and concurrent requests."""

    requests_per_minute: Annotated[int, Field(gt=0)]
    concurrent: Annotated[int, Field(gt=0)]


class RateLimits(_Strict):
    """Client-side limits: per org (a token bucket and a cap per provider x org) and per process."""

    per_org: Limit
    per_process: Limit


class Pages(_Strict):
    """Paging guards."""

    max_pages: Annotated[int, Field(gt=0)] = 1000


class TestCall(_Strict):
    """The cheap authenticated call `credentials test` makes (a 2xx means the credential works).

    `path` may use `{field}` placeholders filled from non-secret credential fields.
    """

    method: Literal["GET", "POST"] = "GET"
    path: str
    params: dict[str, str] = Field(default_factory=dict)


class ProviderSpec(_Strict):
    """One provider of the registry."""

    id: str = Field(pattern=PROVIDER_ID)
    display_name: str
    base_url: str = Field(description="Scheme and host (and a base path); empty: set by the environment.")
    headers: dict[str, str] = Field(default_factory=dict)
    auth: Auth
    credential: CredentialSpec | None = Field(
        None, description="The credential document; omitted with credential_from (the other's is used)."
    )
    credential_from: str | None = Field(
        None,
        pattern=PROVIDER_ID,
        description="Another provider whose credential this one uses (Google APIs share the org's gcp key).",
    )
    rate_limits: RateLimits
    pages: Pages = Pages()
    test: TestCall | None = None

    @model_validator(mode="after")
    def _check(self) -> ProviderSpec:
        if self.base_url:
            parts = urlsplit(self.base_url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                raise ValueError(f"base_url {self.base_url!r} must be http(s)://host[/path]")
        if (self.credential is None) == (self.credential_from is None):
            raise ValueError("give either credential or credential_from")
        if self.credential is None:
            return self  # checked against the other provider's credential by the registry
        self.check_fields(self.credential)
        return self

    def check_fields(self, credential: CredentialSpec) -> None:
        """Every credential field the auth scheme uses is declared."""
        used: list[str] = []
        match self.auth:
            case BearerAuth() | ApiKeyHeaderAuth() | ApiKeyQueryAuth():
                used = [self.auth.field]
            case BasicAuth():
                used = [self.auth.username_field, self.auth.password_field]
            case OAuth2ClientCredentialsAuth():
                used = [self.auth.client_id_field, self.auth.client_secret_field]
            case GoogleServiceAccountAuth():
                used = ["client_email", "private_key", "private_key_id"]
        for name in used:
            if name not in credential.fields:
                raise ValueError(f"auth uses field {name!r}, which the credential does not declare")

    @property
    def credential_provider(self) -> str:
        """The provider whose credentials authenticate calls to this one (itself, or credential_from)."""
        return self.credential_from or self.id

    @property
    def credential_spec(self) -> CredentialSpec:
        """The credential document (resolved from credential_from by the registry)."""
        assert self.credential is not None, f"{self.id}: credential_from not resolved"
        return self.credential


class ProviderRegistry:
    """The validated providers, with base URLs after environment overrides."""

    def __init__(self, providers: Mapping[str, ProviderSpec]) -> None:
        self._providers = dict(providers)

    @classmethod
    def load(cls, path: Path, environ: Mapping[str, str] | None = None) -> ProviderRegistry:
        """Read and validate the registry file; InvalidInputError names the file and the field."""
        environ = os.environ if environ is None else environ
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidInputError(f"{path.name}: cannot read ({type(exc).__name__})") from exc
        if not isinstance(raw, dict) or set(raw) != {"providers"} or not isinstance(raw["providers"], dict):
            raise InvalidInputError(
                f"{path.name}: must be a mapping with the single key 'providers'",
                [FieldViolation("providers", "required, a mapping of provider id to provider")],
                reason="INVALID_PROVIDER_REGISTRY",
            )
        providers: dict[str, ProviderSpec] = {}
        for pid, body in raw["providers"].items():
            try:
                document: dict[str, Any] = {"id": pid, **(body if isinstance(body, dict) else {})}
                override = environ.get(f"PROVIDER_BASE_URL_{str(pid).upper()}")
                if override:
                    document["base_url"] = override
                token_override = environ.get(f"PROVIDER_TOKEN_URL_{str(pid).upper()}")
                if token_override and isinstance(document.get("auth"), dict):
                    document["auth"] = {**document["auth"], "token_url": token_override}
                providers[pid] = ProviderSpec.model_validate(document)
            except ValidationError as exc:
                violations = [
                    FieldViolation(f"providers.{pid}." + ".".join(map(str, e["loc"])), e["msg"])
                    for e in exc.errors()
                ]
                raise InvalidInputError(
                    f"{path.name}: provider {pid}: "
                    + "; ".join(f"{v.field}: {v.description}" for v in violations[:5]),
                    violations,
                    reason="INVALID_PROVIDER_REGISTRY",
                ) from exc
        for pid, spec in list(providers.items()):
            if spec.credential_from is None:
                continue
            other = providers.get(spec.credential_from)
            if other is None or other.credential is None:
                raise InvalidInputError(
                    f"{path.name}: provider {pid}: credential_from names no provider with a credential",
                    [FieldViolation(f"providers.{pid}.credential_from", "unknown provider")],
                    reason="INVALID_PROVIDER_REGISTRY",
                )
            try:
                spec.check_fields(other.credential)
            except ValueError as exc:
                raise InvalidInputError(
                    f"{path.name}: provider {pid}: {exc}",
                    [FieldViolation(f"providers.{pid}.auth", str(exc))],
                    reason="INVALID_PROVIDER_REGISTRY",
                ) from exc
            providers[pid] = spec.model_copy(update={"credential": other.credential})
        return cls(providers)

    def get(self, provider: str) -> ProviderSpec:
        """The provider; NotFoundError `UNKNOWN_PROVIDER` naming it (bounded) otherwise."""
        spec = self._providers.get(provider)
        if spec is None:
            raise NotFoundError(
                f"unknown provider {provider[:64]!r}; known: {', '.join(sorted(self._providers))}",
                reason="UNKNOWN_PROVIDER",
            )
        return spec

    def google_token_url(self, provider: str = "gcp") -> str | None:
        """The token URL of a `google_service_account` provider (None when it has another scheme)."""
        spec = self._providers.get(provider)
        return (
            spec.auth.token_url
            if spec is not None and isinstance(spec.auth, GoogleServiceAccountAuth)
            else None
        )

    def __iter__(self) -> Any:
        return iter(sorted(self._providers.values(), key=lambda p: p.id))

    def __contains__(self, provider: object) -> bool:
        return provider in self._providers

    def validate_credential(self, provider: str, document: Any) -> dict[str, str]:
        """Check a credential document against the provider's schema; return its fields.

        InvalidInputError `INVALID_CREDENTIAL` names each missing, unknown or malformed field (never a
        value).
        """
        spec = self.get(provider).credential_spec
        if not isinstance(document, dict):
            raise InvalidInputError(
                "the credential must be a JSON object",
                [FieldViolation("credential", "must be a JSON object")],
                reason="INVALID_CREDENTIAL",
            )
        violations: list[FieldViolation] = []
        for name in document:
            if name not in spec.fields:
                violations.append(FieldViolation(str(name)[:64], "unknown field"))
        fields: dict[str, str] = {}
        for name, field in spec.fields.items():
            value = document.get(name)
            if value is None or value == "":
                if field.required:
                    violations.append(FieldViolation(name, "required"))
                continue
            if not isinstance(value, str):
                violations.append(FieldViolation(name, "must be a string"))
                continue
            if field.pattern is not None and re.fullmatch(field.pattern, value) is None:
                violations.append(FieldViolation(name, "does not have the expected format"))
                continue
            fields[name] = value
        if violations:
            raise InvalidInputError(
                f"invalid {provider} credential: "
                + "; ".join(f"{v.field}: {v.description}" for v in violations[:10]),
                violations,
                reason="INVALID_CREDENTIAL",
            )
        return fields
