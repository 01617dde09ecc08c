"""Versioned schema migrations: the `NNNN_name.sql` files of `metadata/migrations/`.

The metadata service shares its PostgreSQL database with the database service, so it keeps its
own bookkeeping table (`metadata_schema_migrations`) and its own advisory lock key. Replicas
starting together serialize on the lock; all pending migrations run in one transaction, so a
crash half-way leaves the schema as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    import asyncpg

MIGRATIONS_TABLE: Final = "metadata_schema_migrations"
ADVISORY_LOCK_KEY: Final = 0x6D65_7461_6461_7461  # "metadata" as bytes, fits a signed bigint
_FILE_RE: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True, order=True)
class Migration:
    version: int
    name: str
    sql: str


def parse_migrations(files: Iterable[tuple[str, str]]) -> list[Migration]:
    """Order `(filename, sql)` pairs by version; other file names are ignored.

    Raises `ValueError` on two files with one version (a merge mistake that must not ship).
    """
    found: dict[int, Migration] = {}
    for filename, sql in files:
        match = _FILE_RE.match(filename)
        if match is None:
            continue
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"two migrations with version {version}: {filename}")
        found[version] = Migration(version, match.group(2), sql)
    return sorted(found.values())


def packaged_migrations() -> list[Migration]:
    """The migrations shipped in this package."""
    root = resources.files("analytics_engine.metadata.migrations")
    return parse_migrations(
        (item.name, item.read_text(encoding="utf-8"))
        for item in root.iterdir()
        if item.name.endswith(".sql")
    )


async def migrate(conn: asyncpg.Connection, migrations: Sequence[Migration]) -> list[int]:
    """Apply the pending migrations; returns the versions applied now."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ADVISORY_LOCK_KEY)
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
                    version    integer PRIMARY KEY,
                    name       text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )"""
        )
        rows = await conn.fetch(f"SELECT version FROM {MIGRATIONS_TABLE}")
        applied = {int(row["version"]) for row in rows}
        done: list[int] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            done.append(migration.version)
        return done
