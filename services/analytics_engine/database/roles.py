"""The database roles: `analytics_app`, which the services write with, and the read-only
`analytics_reader`, which `execute_query` runs as.

Not a migration: roles are cluster-wide and creating them needs CREATEROLE, which the service's
own role should not have. Run once per database by whoever provisions it (the local stack, the
tests, a Helm hook), as a role that may create roles:

    python -m analytics_engine.database.roles ADMIN_DSN [--database NAME] [--password PW]

prints the reader's DSN, to pass to the service as `DATABASE_READONLY_URL`.

The reader gets CONNECT, USAGE on `public`, SELECT on every table there (and on tables created
later by `--owner`, default the admin role, e.g. new partitions), and
`default_transaction_read_only`. It has no write privilege anywhere: even a statement slipping
past the READ ONLY transaction could not change data.

The writer (`ensure_writer_role`, used by the local stack; the Helm chart's init script does the
same) owns the database and what is in `public`, because migrations create tables and daily
partitions; it is not a superuser and cannot create roles or databases.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import Sequence
from typing import Final
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

READER_ROLE: Final = "analytics_reader"
WRITER_ROLE: Final = "analytics_app"
_OWNED_RELATION_KINDS: Final = ("r", "p", "v", "m", "S", "f")
LARGE_OBJECT_CREATORS: Final = (
    "pg_catalog.lo_create(oid)",
    "pg_catalog.lo_creat(integer)",
    "pg_catalog.lo_from_bytea(oid, bytea)",
)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def reader_dsn(admin_dsn: str, *, role: str, password: str, database: str | None = None) -> str:
    """`admin_dsn` with the reader's credentials (and `database`, if given)."""
    parts = urlsplit(admin_dsn)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{quote(role, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    path = f"/{quote(database, safe='')}" if database else parts.path
    return urlunsplit(parts._replace(netloc=netloc, path=path))


async def ensure_reader_role(
    admin_dsn: str,
    *,
    database: str | None = None,
    password: str | None = None,
    role: str = READER_ROLE,
    owner: str | None = None,
) -> str:
    """Create or update the read-only role for `database` (default: the DSN's); returns its
    DSN. Idempotent; the password is reset to `password` (random if None)."""
    password = password or secrets.token_hex(16)
    conn = await asyncpg.connect(admin_dsn)
    try:
        if database is None:
            database = await conn.fetchval("SELECT current_database()")
        else:
            await conn.close()
            conn = await asyncpg.connect(
                urlunsplit(urlsplit(admin_dsn)._replace(path=f"/{quote(database, safe='')}"))
            )
        owner = owner or await conn.fetchval("SELECT current_user")
        r = await _login_role(conn, role, password)
        db = _quote_ident(str(database))
        for statement in (
            f"ALTER ROLE {r} SET default_transaction_read_only = on",
            f"GRANT CONNECT ON DATABASE {db} TO {r}",
            f"GRANT USAGE ON SCHEMA public TO {r}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {r}",
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {_quote_ident(str(owner))} IN SCHEMA public"
            f" GRANT SELECT ON TABLES TO {r}",
            # PostgreSQL 15 lets a READ ONLY transaction create large objects (a persistent
            # write, found by tests/integration/hostile); the platform uses none, so nobody
            # may create them. Granted to PUBLIC by default, hence revoked from PUBLIC; a
            # non-owner admin gets a warning here instead of an error.
            *(f"REVOKE EXECUTE ON FUNCTION {f} FROM PUBLIC" for f in LARGE_OBJECT_CREATORS),
        ):
            await conn.execute(statement)
    finally:
        await conn.close()
    return reader_dsn(admin_dsn, role=role, password=password, database=str(database))


async def _login_role(conn: asyncpg.Connection, role: str, password: str) -> str:
    """Create or update a plain login role (no superuser, role or database creation, no
    inherited privileges); returns its quoted name."""
    r = _quote_ident(role)
    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
    verb = "ALTER" if exists else "CREATE"
    await conn.execute(
        f"{verb} ROLE {r} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION"
        f" NOBYPASSRLS PASSWORD {_quote_literal(password)}"
    )
    return r


async def ensure_writer_role(
    admin_dsn: str, *, password: str | None = None, role: str = WRITER_ROLE
) -> str:
    """Make `role` the owner of the DSN's database and of everything in its `public` schema
    (objects an earlier superuser-run created included); returns its DSN. Idempotent; the
    password is reset to `password` (random if None)."""
    password = password or secrets.token_hex(16)
    conn = await asyncpg.connect(admin_dsn)
    try:
        database = str(await conn.fetchval("SELECT current_database()"))
        r = await _login_role(conn, role, password)
        await conn.execute(f"ALTER DATABASE {_quote_ident(database)} OWNER TO {r}")
        await conn.execute(f"GRANT USAGE, CREATE ON SCHEMA public TO {r}")
        relations = await conn.fetch(
            "SELECT c.oid::regclass::text AS name FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind = ANY($1::char[])"
            " AND pg_get_userbyid(c.relowner) <> $2",
            list(_OWNED_RELATION_KINDS),
            role,
        )
        for rel in relations:  # ALTER TABLE also takes sequences, views and foreign tables
            await conn.execute(f"ALTER TABLE {rel['name']} OWNER TO {r}")
        routines = await conn.fetch(
            "SELECT p.oid::regprocedure::text AS name FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) <> $1",
            role,
        )
        for routine in routines:
            await conn.execute(f"ALTER ROUTINE {routine['name']} OWNER TO {r}")
    finally:
        await conn.close()
    return reader_dsn(admin_dsn, role=role, password=password, database=database)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("admin_dsn")
    parser.add_argument("--database", default=None)
    parser.add_argument("--password", default=None)
    parser.add_argument("--role", default=READER_ROLE)
    parser.add_argument("--owner", default=None)
    args = parser.parse_args(argv)
    dsn = asyncio.run(
        ensure_reader_role(
            args.admin_dsn,
            database=args.database,
            password=args.password,
            role=args.role,
            owner=args.owner,
        )
    )
    print(dsn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
