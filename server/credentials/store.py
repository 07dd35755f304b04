"""The `org_integration_credentials` meta table: set, list, delete, load and re-wrap credentials.

`set` validates the document against the provider registry first (nothing is stored on error), then
encrypts (a fresh data key, `envelope.seal`), wraps the data key with the KEK and writes the row with one
MERGE keyed on (org, provider, name): a second `set` replaces the secret in place (same id, version + 1).
Nothing here logs or returns a secret; listings carry the fingerprint only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from server.credentials import envelope
from server.credentials.model import Credential
from server.errors import FieldViolation, InvalidInputError, NotFoundError, ServiceError, TerminalError
from server.kms import KeyEncryptionKey
from server.providers import ProviderRegistry
from server.warehouse.bigquery import BigQueryWarehouse, Typed

log = logging.getLogger(__name__)

TABLE = "org_integration_credentials"
NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_LISTED = (
    "credential_id, org_slug, provider, credential_name, version, kek_version, fingerprint, status, "
    "status_reason, created_at, rotated_at, rewrapped_at, last_used_at, validated_at"
)


@dataclass(frozen=True, slots=True)
class StoredCredential:
    """A row as listed (no ciphertext, no key)."""

    credential_id: str
    org_slug: str
    provider: str
    credential_name: str
    version: int
    kek_version: str
    fingerprint: str
    status: str
    status_reason: str | None
    created_at: datetime
    rotated_at: datetime | None
    rewrapped_at: datetime | None
    last_used_at: datetime | None
    validated_at: datetime | None

    def public(self) -> dict[str, Any]:
        """JSON-safe fields for listings."""
        return {
            k: v.isoformat() if isinstance(v, datetime) else v
            for k, v in (
                ("credential_id", self.credential_id),
                ("provider", self.provider),
                ("name", self.credential_name),
                ("version", self.version),
                ("fingerprint", self.fingerprint),
                ("status", self.status),
                ("status_reason", self.status_reason),
                ("kek_version", self.kek_version),
                ("created_at", self.created_at),
                ("rotated_at", self.rotated_at),
                ("rewrapped_at", self.rewrapped_at),
                ("last_used_at", self.last_used_at),
                ("validated_at", self.validated_at),
            )
        }


def b64(data: bytes) -> str:
    """BYTES travel as base64 STRING parameters through `FROM_BASE64` (bqemulator 1.4.0 stores a BYTES
    parameter's base64 text instead of its bytes; BigQuery accepts both ways)."""
    return base64.b64encode(data).decode("ascii")


def fingerprint(value: str) -> str:
    """What identifies a secret in listings: its last 4 characters."""
    return "..." + value[-4:]


def check_name(name: str) -> str:
    """A credential name: lowercase snake_case, 1-63 characters."""
    if not NAME.fullmatch(name):
        raise InvalidInputError(
            f"invalid credential name {name[:64]!r}",
            [FieldViolation("name", "lowercase letters, digits and _, starting with a letter")],
            reason="INVALID_CREDENTIAL",
        )
    return name


class CredentialStore:
    """Reads and writes the credentials table; encrypts and decrypts through the KEK."""

    def __init__(
        self,
        warehouse: BigQueryWarehouse,
        meta_dataset: str,
        registry: ProviderRegistry,
        kek: KeyEncryptionKey,
        *,
        touch_delay: float = 5.0,
    ) -> None:
        self.warehouse = warehouse
        self._table = warehouse.table_ref(meta_dataset, TABLE)
        self.registry = registry
        self.kek = kek
        self._touch_delay = touch_delay
        self._used: set[str] = set()
        self._touching: asyncio.Task[None] | None = None

    async def set(
        self, org_slug: str, provider: str, document: Any, name: str = "default"
    ) -> StoredCredential:
        """Validate, encrypt and store (create or replace) the org's credential."""
        fields = self.registry.validate_credential(provider, document)
        check_name(name)
        spec = self.registry.get(provider).credential_spec
        existing = await self._find(org_slug, provider, name)
        credential_id = existing.credential_id if existing else "cred_" + uuid.uuid4().hex
        version = existing.version + 1 if existing else 1
        associated = envelope.aad(org_slug, provider, credential_id)
        data_key = envelope.new_data_key()
        ciphertext = envelope.seal(fields, data_key, associated)
        wrapped, kek_version = await self.kek.wrap(data_key, associated)
        now = datetime.now(UTC)
        await self.warehouse.query(
            f"MERGE {self._table} AS t "
            "USING (SELECT @org AS org_slug, @provider AS provider, @name AS name) AS s "
            "ON t.org_slug = s.org_slug AND t.provider = s.provider AND t.credential_name = s.name "
            "WHEN MATCHED THEN UPDATE SET version = @version, envelope_format = @format, "
            "ciphertext = FROM_BASE64(@ciphertext), wrapped_data_key = FROM_BASE64(@wrapped), "
            "kek_version = @kek, fingerprint = @fingerprint, status = 'ACTIVE', status_reason = NULL, "
            "rotated_at = @now, validated_at = NULL "
            "WHEN NOT MATCHED THEN INSERT (credential_id, org_slug, provider, credential_name, version, "
            "envelope_format, ciphertext, wrapped_data_key, kek_version, fingerprint, status, status_reason, "
            "created_at, rotated_at, rewrapped_at, last_used_at, validated_at) "
            "VALUES (@id, @org, @provider, @name, @version, @format, FROM_BASE64(@ciphertext), "
            "FROM_BASE64(@wrapped), @kek, "
            "@fingerprint, 'ACTIVE', NULL, @now, NULL, NULL, NULL, NULL)",
            {
                "id": credential_id,
                "org": org_slug,
                "provider": provider,
                "name": name,
                "version": version,
                "format": envelope.FORMAT,
                "ciphertext": b64(ciphertext),
                "wrapped": b64(wrapped),
                "kek": kek_version,
                # the fingerprint field, else the first secret field present (optional fingerprints)
                "fingerprint": fingerprint(
                    fields.get(spec.fingerprint)
                    or next((fields[n] for n in sorted(spec.secret_fields) if n in fields), "")
                ),
                "now": now,
            },
        )
        stored = await self._find(org_slug, provider, name)
        assert stored is not None
        return stored

    async def _find(self, org_slug: str, provider: str, name: str) -> StoredCredential | None:
        rows = await self.warehouse.query(
            f"SELECT {_LISTED} FROM {self._table} WHERE org_slug = @org AND provider = @provider "
            "AND credential_name = @name",
            {"org": org_slug, "provider": provider, "name": name},
        )
        return StoredCredential(**rows[0]) if rows else None

    async def list(self, org_slug: str) -> list[StoredCredential]:
        """The org's credentials, masked, by provider and name."""
        rows = await self.warehouse.query(
            f"SELECT {_LISTED} FROM {self._table} WHERE org_slug = @org ORDER BY provider, credential_name",
            {"org": org_slug},
        )
        return [StoredCredential(**r) for r in rows]

    async def delete(self, org_slug: str, credential_id: str) -> None:
        """Delete one of the org's credentials; NotFoundError `CREDENTIAL_NOT_FOUND` if there is none."""
        result = await self.warehouse.query_job(
            f"DELETE FROM {self._table} WHERE org_slug = @org AND credential_id = @id",
            {"org": org_slug, "id": credential_id},
        )
        if not result.num_dml_affected_rows:
            raise NotFoundError(
                f"no credential {credential_id[:64]!r} for this org", reason="CREDENTIAL_NOT_FOUND"
            )

    async def holders(self, provider: str) -> frozenset[str]:
        """The orgs holding an ACTIVE credential of `provider` (what the scheduler's default schedules of
        pipelines that need one look at)."""
        self.registry.get(provider)
        rows = await self.warehouse.query(
            f"SELECT DISTINCT org_slug FROM {self._table} WHERE provider = @provider AND status = 'ACTIVE'",
            {"provider": provider},
        )
        return frozenset(r["org_slug"] for r in rows)

    async def load(self, org_slug: str, provider: str, name: str = "default") -> Credential:
        """Fetch and decrypt the org's credential (the vault caches the result)."""
        self.registry.get(provider)
        rows = await self.warehouse.query(
            "SELECT credential_id, org_slug, provider, credential_name, version, envelope_format, "
            f"ciphertext, wrapped_data_key, last_used_at FROM {self._table} "
            "WHERE org_slug = @org AND provider = @provider AND credential_name = @name",
            {"org": org_slug, "provider": provider, "name": name},
        )
        if not rows:
            raise TerminalError(
                f"this org has no {provider} credential named {name!r} "
                f"(add one: pipeline-service credentials set ORG {provider} --from-file FILE)",
                reason="CREDENTIAL_NOT_FOUND",
            )
        row = rows[0]
        what = f"{provider} credential {row['credential_id']}"
        if row["envelope_format"] != envelope.FORMAT:
            raise envelope.unreadable(what)
        # The AAD comes from what the caller asked for (the run's org), never from the row: a row copied
        # from another org keeps that org's AAD inside its ciphertext and fails here.
        associated = envelope.aad(org_slug, provider, row["credential_id"])
        data_key = await self.kek.unwrap(row["wrapped_data_key"], associated)
        fields = envelope.open_sealed(row["ciphertext"], data_key, associated, what)
        self._touch(row)
        return Credential(
            id=row["credential_id"],
            org_slug=org_slug,
            provider=provider,
            name=name,
            version=int(row["version"]),
            fields=fields,
            secret_fields=self.registry.get(provider).credential_spec.secret_fields,
        )

    def _touch(self, row: dict[str, Any]) -> None:
        """Record the use, at most about once an hour per credential and never on the step's path: ids are
        collected for `touch_delay` seconds and written by one UPDATE in the background; a failed write
        (BigQuery limits concurrent DML on a table) is logged and dropped, never fails a step."""
        last = row.get("last_used_at")
        if last is not None and (datetime.now(UTC) - last).total_seconds() < 3600:
            return
        self._used.add(row["credential_id"])
        if self._touching is None or self._touching.done():
            self._touching = asyncio.create_task(self._write_used())

    async def _write_used(self) -> None:
        await asyncio.sleep(self._touch_delay)
        ids, self._used = sorted(self._used), set()
        try:
            await self.warehouse.query(
                f"UPDATE {self._table} SET last_used_at = @now WHERE credential_id IN UNNEST(@ids)",
                {"now": datetime.now(UTC), "ids": Typed("ARRAY<STRING>", ids)},
            )
        except ServiceError as exc:
            log.warning("last_used_at of %d credentials not recorded (%s)", len(ids), exc.reason)

    async def close(self) -> None:
        """Drop pending use times (best effort), then release the KEK's connections."""
        if self._touching is not None and not self._touching.done():
            self._touching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._touching
        await self.kek.close()

    async def record_test(self, org_slug: str, credential_id: str, reason: str | None) -> None:
        """Remember the outcome of `credentials test` (VALID, or REJECTED with the reason)."""
        await self.warehouse.query(
            f"UPDATE {self._table} SET status = @status, status_reason = @reason, validated_at = @now "
            "WHERE org_slug = @org AND credential_id = @id",
            {
                "status": "VALID" if reason is None else "REJECTED",
                "reason": Typed("STRING", reason),
                "now": datetime.now(UTC),
                "org": org_slug,
                "id": credential_id,
            },
        )

    async def rewrap(self) -> dict[str, Any]:
        """Re-wrap every data key with the KEK's primary version; ciphertexts are not touched.

        Rows already wrapped by the primary version are left as they are; rows whose data key does not
        unwrap (`CREDENTIAL_UNREADABLE`) are reported by id and skipped. KMS outages abort (re-run it).
        """
        rows = await self.warehouse.query(
            f"SELECT credential_id, org_slug, provider, wrapped_data_key, kek_version FROM {self._table} "
            "ORDER BY org_slug, credential_id"
        )
        rewrapped = unchanged = 0
        unreadable: list[str] = []
        for row in rows:
            associated = envelope.aad(row["org_slug"], row["provider"], row["credential_id"])
            try:
                data_key = await self.kek.unwrap(row["wrapped_data_key"], associated)
            except TerminalError as exc:
                if exc.reason != "CREDENTIAL_UNREADABLE":
                    raise
                unreadable.append(row["credential_id"])
                continue
            wrapped, kek_version = await self.kek.wrap(data_key, associated)
            if kek_version == row["kek_version"]:
                unchanged += 1
                continue
            await self.warehouse.query(
                f"UPDATE {self._table} SET wrapped_data_key = FROM_BASE64(@wrapped), "
                "kek_version = @kek, rewrapped_at = @now WHERE credential_id = @id AND kek_version = @old",
                {
                    "wrapped": b64(wrapped),
                    "kek": kek_version,
                    "now": datetime.now(UTC),
                    "id": row["credential_id"],
                    "old": row["kek_version"],
                },
            )
            rewrapped += 1
        return {"rewrapped": rewrapped, "unchanged": unchanged, "unreadable": unreadable}
