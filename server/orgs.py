"""Orgs and their API keys, kept in the central dataset's meta tables.

A key is `ca_` plus 43 URL-safe random characters; only its SHA-256 hash is stored. Keys carry scopes;
`DEFAULT_SCOPES` is what a new key gets.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from server.errors import AlreadyExistsError, FieldViolation, InvalidInputError, NotFoundError
from server.settings import Settings
from server.warehouse.bigquery import BigQueryWarehouse, Typed
from server.warehouse.schema import load_schemas

ORG_SLUG = re.compile(r"^[a-z][a-z0-9_]{2,49}$")
DEFAULT_SCOPES = ("pipelines:read", "pipelines:run")
KNOWN_SCOPES = frozenset({"pipelines:read", "pipelines:run", "pipelines:admin"})


def hash_key(api_key: str) -> str:
    """Hex SHA-256 of an API key (keys have 256 bits of entropy, so no salt is needed)."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def check_org_slug(org_slug: str) -> str:
    """Return `org_slug` if well-formed, else raise InvalidInputError naming the field."""
    if not ORG_SLUG.fullmatch(org_slug):
        raise InvalidInputError(
            f"invalid org slug {org_slug!r}",
            [
                FieldViolation(
                    "org_slug", "3-50 lowercase letters, digits or underscores, starting with a letter"
                )
            ],
            reason="INVALID_ORG_SLUG",
        )
    return org_slug


@dataclass(frozen=True, slots=True)
class OrgContext:
    """Who an org API key belongs to and what it may do."""

    org_slug: str
    org_api_key_id: str
    dataset: str
    scopes: frozenset[str]
    daily_limit: int
    monthly_limit: int
    concurrent_limit: int
    requests_per_minute: int


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A freshly created key; `api_key` is shown once and never stored."""

    org_slug: str
    org_api_key_id: str
    api_key: str
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """Subscription limits given to a new org."""

    name: str = "STARTER"
    daily_limit: int = 100
    monthly_limit: int = 3000
    concurrent_limit: int = 5
    requests_per_minute: int = 60


class OrgRepository:
    """Reads and writes orgs and keys in the meta tables."""

    def __init__(
        self, warehouse: BigQueryWarehouse, meta_dataset: str, dataset_suffix: str, schemas_dir: Path
    ) -> None:
        self._wh = warehouse
        self._meta = meta_dataset
        self._suffix = dataset_suffix
        self._org_schemas = load_schemas(schemas_dir / "org")

    @classmethod
    def for_settings(cls, warehouse: BigQueryWarehouse, settings: Settings) -> OrgRepository:
        """The repository of these settings' meta dataset and environment."""
        return cls(warehouse, settings.meta_dataset, settings.pipeline_env.value, settings.schemas_dir)

    async def ensure_org_tables(self, org_slug: str) -> str:
        """Create the org's dataset and its standard tables (`configs/schemas/org/`) if missing."""
        dataset = self.dataset_of(check_org_slug(org_slug))
        await self._wh.ensure_tables(dataset, self._org_schemas)
        return dataset

    @property
    def warehouse(self) -> BigQueryWarehouse:
        """The warehouse the repository writes to."""
        return self._wh

    def _t(self, table: str) -> str:
        return self._wh.table_ref(self._meta, table)

    def dataset_of(self, org_slug: str) -> str:
        """The org's dataset name."""
        return f"{org_slug}_{self._suffix}"

    async def active_datasets(self) -> list[str]:
        """The datasets of every ACTIVE org."""
        rows = await self._wh.query(
            f"SELECT DISTINCT org_dataset_id FROM {self._t('org_profiles')} WHERE status = 'ACTIVE'"
        )
        return [r["org_dataset_id"] for r in rows]

    async def active_contexts(self, now: datetime) -> list[OrgContext]:
        """Every ACTIVE org with a live subscription, as the scheduler runs for it (no key, no scopes)."""
        rows = await self._wh.query(
            "SELECT p.org_slug, p.org_dataset_id, s.daily_limit, s.monthly_limit, s.concurrent_limit, "
            f"s.requests_per_minute FROM {self._t('org_profiles')} AS p "
            f"JOIN {self._t('org_subscriptions')} AS s ON s.org_slug = p.org_slug "
            "WHERE p.status = 'ACTIVE' AND s.status IN ('ACTIVE', 'TRIAL') "
            "AND (s.ends_at IS NULL OR s.ends_at > @now) "
            "QUALIFY ROW_NUMBER() OVER (PARTITION BY p.org_slug ORDER BY s.created_at DESC) = 1",
            {"now": now},
        )
        return [
            OrgContext(
                org_slug=r["org_slug"],
                org_api_key_id="",
                dataset=r["org_dataset_id"],
                scopes=frozenset(),
                daily_limit=int(r["daily_limit"]),
                monthly_limit=int(r["monthly_limit"]),
                concurrent_limit=int(r["concurrent_limit"]),
                requests_per_minute=int(r["requests_per_minute"] or 60),
            )
            for r in rows
        ]

    async def exists(self, org_slug: str) -> bool:
        """Whether an org profile with this slug exists."""
        rows = await self._wh.query(
            f"SELECT COUNT(*) AS n FROM {self._t('org_profiles')} WHERE org_slug = @org", {"org": org_slug}
        )
        return bool(rows[0]["n"])

    async def create_org(
        self,
        org_slug: str,
        *,
        company_name: str = "",
        admin_email: str = "",
        currency: str = "USD",
        fiscal_year_start_month: int = 1,
        plan: Plan | None = None,
    ) -> tuple[str, IssuedKey]:
        """Create profile, subscription, dataset with its tables and a first key; return (dataset, key)."""
        check_org_slug(org_slug)
        if not 1 <= fiscal_year_start_month <= 12:
            raise InvalidInputError(
                "fiscal year start month must be 1-12",
                [FieldViolation("fiscal_year_start_month", "must be 1-12")],
            )
        if await self.exists(org_slug):
            raise AlreadyExistsError(
                f"org {org_slug!r} exists", reason="ORG_EXISTS", metadata={"org_slug": org_slug}
            )
        plan = plan or Plan()
        now = datetime.now(UTC)
        dataset = await self.ensure_org_tables(org_slug)
        await self._wh.query(
            f"INSERT INTO {self._t('org_profiles')} (org_slug, company_name, admin_email, org_dataset_id, "
            "status, default_currency, fiscal_year_start_month, created_at, updated_at) "
            "VALUES (@org, @company, @email, @dataset, 'ACTIVE', @currency, @fy, @now, @now)",
            {
                "org": org_slug,
                "company": company_name or org_slug,
                "email": admin_email,
                "dataset": dataset,
                "currency": currency,
                "fy": fiscal_year_start_month,
                "now": now,
            },
        )
        await self._wh.query(
            f"INSERT INTO {self._t('org_subscriptions')} (subscription_id, org_slug, plan_name, status, "
            "daily_limit, monthly_limit, concurrent_limit, requests_per_minute, created_at, ends_at) "
            "VALUES (@id, @org, @plan, 'ACTIVE', @daily, @monthly, @concurrent, @rpm, @now, NULL)",
            {
                "id": f"sub_{uuid.uuid4().hex[:16]}",
                "org": org_slug,
                "plan": plan.name,
                "daily": plan.daily_limit,
                "monthly": plan.monthly_limit,
                "concurrent": plan.concurrent_limit,
                "rpm": plan.requests_per_minute,
                "now": now,
            },
        )
        return dataset, await self._insert_key(org_slug, DEFAULT_SCOPES, None)

    async def create_key(
        self, org_slug: str, scopes: tuple[str, ...] = DEFAULT_SCOPES, expires_at: datetime | None = None
    ) -> IssuedKey:
        """Issue a new key for an existing org."""
        unknown = sorted(set(scopes) - KNOWN_SCOPES)
        if unknown:
            raise InvalidInputError(
                f"unknown scopes {unknown}", [FieldViolation("scopes", ", ".join(unknown))]
            )
        if not await self.exists(org_slug):
            raise NotFoundError(f"org {org_slug!r} not found", reason="ORG_NOT_FOUND")
        return await self._insert_key(org_slug, scopes, expires_at)

    async def _insert_key(
        self, org_slug: str, scopes: tuple[str, ...], expires_at: datetime | None
    ) -> IssuedKey:
        api_key = "ca_" + secrets.token_urlsafe(32)
        key_id = f"key_{uuid.uuid4().hex[:16]}"
        await self._wh.query(
            f"INSERT INTO {self._t('org_api_keys')} (org_api_key_id, org_slug, org_api_key_hash, key_prefix, "
            "scopes, is_active, created_at, expires_at, revoked_at) "
            "VALUES (@id, @org, @hash, @prefix, @scopes, TRUE, @now, @expires, NULL)",
            {
                "id": key_id,
                "org": org_slug,
                "hash": hash_key(api_key),
                "prefix": api_key[:7],
                "scopes": Typed("ARRAY<STRING>", list(scopes)),
                "now": datetime.now(UTC),
                "expires": Typed("TIMESTAMP", expires_at),
            },
        )
        return IssuedKey(org_slug, key_id, api_key, tuple(scopes))

    async def revoke_key(self, org_api_key_id: str) -> None:
        """Deactivate a key; NotFoundError if no active key has this id."""
        result = await self._wh.query_job(
            f"UPDATE {self._t('org_api_keys')} SET is_active = FALSE, revoked_at = @now "
            "WHERE org_api_key_id = @id AND is_active",
            {"id": org_api_key_id, "now": datetime.now(UTC)},
        )
        if not result.num_dml_affected_rows:
            raise NotFoundError(f"no active key {org_api_key_id!r}", reason="API_KEY_NOT_FOUND")

    async def find_by_key_hash(self, key_hash: str, now: datetime) -> OrgContext | None:
        """The org context of an active, unexpired key of an active org with a live subscription."""
        rows = await self._wh.query(
            "SELECT k.org_slug, k.org_api_key_id, k.scopes, p.org_dataset_id, s.daily_limit, "
            "s.monthly_limit, s.concurrent_limit, s.requests_per_minute "
            f"FROM {self._t('org_api_keys')} AS k "
            f"JOIN {self._t('org_profiles')} AS p ON p.org_slug = k.org_slug "
            f"JOIN {self._t('org_subscriptions')} AS s ON s.org_slug = k.org_slug "
            "WHERE k.org_api_key_hash = @hash AND k.is_active AND k.revoked_at IS NULL "
            "AND (k.expires_at IS NULL OR k.expires_at > @now) AND p.status = 'ACTIVE' "
            "AND s.status IN ('ACTIVE', 'TRIAL') AND (s.ends_at IS NULL OR s.ends_at > @now) "
            "ORDER BY s.created_at DESC LIMIT 1",
            {"hash": key_hash, "now": now},
        )
        if not rows:
            return None
        r = rows[0]
        return OrgContext(
            org_slug=r["org_slug"],
            org_api_key_id=r["org_api_key_id"],
            dataset=r["org_dataset_id"],
            scopes=frozenset(r["scopes"] or ()),
            daily_limit=int(r["daily_limit"]),
            monthly_limit=int(r["monthly_limit"]),
            concurrent_limit=int(r["concurrent_limit"]),
            requests_per_minute=int(r["requests_per_minute"] or 60),
        )
