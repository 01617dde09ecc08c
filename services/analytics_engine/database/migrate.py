"""Versioned schema migrations: plain `.sql` files in `migrations/`, applied at start.

Files are named `NNNN_name.sql`, or `NNNN_name.postgres.sql` / `NNNN_name.timescale.sql` when
the two flavours differ. The flavour is chosen once, when the first flavoured migration is
applied (TimescaleDB if the extension can be created, unless `DATABASE_TIMESCALE=off`), and is
recorded in `schema_migrations` so later migrations follow it. Every migration runs in its own
transaction, and the whole run holds an advisory lock so replicas starting together do not race.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, Literal

log = logging.getLogger(__name__)

Flavour = Literal["postgres", "timescale"]
TimescaleMode = Literal["auto", "on", "off"]

MIGRATION_LOCK: Final = 0x4145_4D49  # "AEMI": advisory lock key of the migration run
_NAME: Final = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(postgres|timescale))?\.sql$")

_BOOKKEEPING: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    flavour     text,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    flavour: Flavour | None
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]


def load_migrations() -> list[Migration]:
    """Every migration file shipped in the package, sorted by version."""
    found: list[Migration] = []
    for entry in resources.files("analytics_engine.database.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match is None:
            continue
        flavour = match.group(3)
        found.append(
            Migration(
                version=int(match.group(1)),
                name=match.group(2),
                flavour=flavour,  # type: ignore[arg-type]
                sql=entry.read_text(encoding="utf-8"),
            )
        )
    return sorted(found, key=lambda m: (m.version, m.flavour or ""))


def plan(migrations: list[Migration], applied: set[int], flavour: Flavour) -> list[Migration]:
    """The migrations still to apply for `flavour`, in order (pure)."""
    todo: list[Migration] = []
    for m in migrations:
        if m.version in applied or (m.flavour is not None and m.flavour != flavour):
            continue
        todo.append(m)
    versions = [m.version for m in todo]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"two migrations share a version: {versions}")
    return todo


async def _timescale_available(conn: Any) -> bool:
    row = await conn.fetchval("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
    if row is None:
        return False
    # Available is not enough: the library must be preloaded. Try it and roll back.
    try:
        async with conn.transaction():
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            raise _Rollback
    except _Rollback:
        return True
    except Exception as exc:
        log.info("timescaledb not usable, using plain PostgreSQL", extra={"error": str(exc)})
        return False


class _Rollback(Exception):
    pass


async def current_flavour(conn: Any) -> Flavour | None:
    """The flavour recorded by an earlier run, if any."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return None
    value = await conn.fetchval(
        "SELECT flavour FROM schema_migrations WHERE flavour IS NOT NULL LIMIT 1"
    )
    return value  # type: ignore[no-any-return]


async def migrate(conn: Any, *, timescale: TimescaleMode = "auto") -> Flavour:
    """Apply pending migrations on an asyncpg connection; returns the schema's flavour."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(_BOOKKEEPING)
        flavour = await current_flavour(conn)
        if flavour is None:
            if timescale == "off":
                flavour = "postgres"
            elif await _timescale_available(conn):
                flavour = "timescale"
            elif timescale == "on":
                raise RuntimeError("DATABASE_TIMESCALE=on but timescaledb cannot be created")
            else:
                flavour = "postgres"
        applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for m in plan(load_migrations(), applied, flavour):
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, flavour, checksum)"
                    " VALUES ($1, $2, $3, $4)",
                    m.version,
                    m.name,
                    m.flavour,
                    m.checksum,
                )
            log.info("applied migration", extra={"version": m.version, "migration": m.name})
        return flavour
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
