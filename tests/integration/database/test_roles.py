"""The writer role: owns the database and its tables, runs the migrations, nothing more."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from redis.asyncio import Redis

from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.database.roles import ensure_writer_role
from analytics_engine.database.service import create

from .conftest import make_settings


async def test_the_writer_owns_what_a_superuser_created_and_cannot_do_more(
    database_url: str,
) -> None:
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute("CREATE TABLE legacy (id int PRIMARY KEY)")
        await admin.execute("CREATE FUNCTION legacy_one() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    finally:
        await admin.close()
    role = f"writer_{uuid.uuid4().hex[:12]}"
    dsn = await ensure_writer_role(database_url, role=role, password="writer-test-pw")
    assert await ensure_writer_role(database_url, role=role, password="writer-test-pw") == dsn

    conn = await asyncpg.connect(dsn)
    try:
        me = await conn.fetchrow(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls FROM pg_roles"
            " WHERE rolname = current_user"
        )
        assert dict(me) == {
            "rolsuper": False,
            "rolcreaterole": False,
            "rolcreatedb": False,
            "rolbypassrls": False,
        }
        await conn.execute("ALTER TABLE legacy ADD COLUMN note text")  # only an owner may
        await conn.execute("INSERT INTO legacy VALUES (1, 'x')")
        await conn.execute("CREATE TABLE fresh (id int)")
        assert await conn.fetchval("SELECT legacy_one()") == 1
        await conn.execute("ALTER FUNCTION legacy_one() RENAME TO legacy_uno")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE ROLE sneaky LOGIN")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE DATABASE sneaky")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("ALTER SYSTEM SET work_mem = '1GB'")
    finally:
        await conn.close()


async def test_the_database_service_migrates_and_writes_as_the_writer(
    redis: Redis,
    redis_url: str,
    database_url: str,
    running: Callable[[ServiceRuntime], Awaitable[ServiceRuntime]],
) -> None:
    role = f"writer_{uuid.uuid4().hex[:12]}"
    dsn = await ensure_writer_role(database_url, role=role, password="writer-test-pw")
    runtime = await running(create(make_settings(redis_url, dsn)))
    assert runtime.ready.is_set()
    conn = await asyncpg.connect(database_url)
    try:
        owners = await conn.fetch(
            "SELECT DISTINCT pg_get_userbyid(relowner) AS owner FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')"
        )
    finally:
        await conn.close()
    assert [r["owner"] for r in owners] == [role]
