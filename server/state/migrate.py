"""Schema migrations of the state store: numbered SQL files (`migrations/NNNN_name.sql`), each applied
once in its own transaction and recorded in `schema_migrations` with its checksum. `upgrade` holds a
session advisory lock, so replicas starting together apply each migration once; a recorded migration
whose file changed stops the upgrade (migrations are append-only).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
import asyncpg.pool

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

MIGRATIONS = Path(__file__).parent / "migrations"
LOCK_KEY = 0x5049_5045_4D49_47  # "PIPEMIG": the advisory lock of schema upgrades

_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp()
)"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file and, when applied, when."""

    version: int
    name: str
    checksum: str
    sql: str
    applied_at: datetime | None = None


def available(folder: Path = MIGRATIONS) -> list[Migration]:
    """The migration files, in version order."""
    found = []
    for path in sorted(folder.glob("*.sql")):
        number, _, name = path.stem.partition("_")
        sql = path.read_text()
        found.append(Migration(int(number), name, hashlib.sha256(sql.encode()).hexdigest(), sql))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version in {folder}")
    return found


async def status(conn: Connection, folder: Path = MIGRATIONS) -> list[Migration]:
    """Every migration, with `applied_at` set for the applied ones."""
    await conn.execute(_TABLE)
    applied = {r["version"]: r for r in await conn.fetch("SELECT * FROM schema_migrations")}
    result = []
    for m in available(folder):
        row = applied.get(m.version)
        if row is not None and row["checksum"] != m.checksum:
            raise RuntimeError(f"migration {m.version:04d}_{m.name} changed after it was applied")
        result.append(Migration(m.version, m.name, m.checksum, m.sql, row["applied_at"] if row else None))
    return result


async def upgrade(conn: Connection, folder: Path = MIGRATIONS) -> list[Migration]:
    """Apply the missing migrations (under the advisory lock); return those applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        done = []
        for m in await status(conn, folder):
            if m.applied_at is not None:
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            done.append(m)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
