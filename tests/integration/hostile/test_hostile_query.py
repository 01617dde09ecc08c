"""`database.query` / `execute_query` under attack, beyond tests/integration/database/test_query.py
(which covers plain writes, a DELETE in a CTE, SELECT INTO, nextval, a writing function,
set_config of statement_timeout, pg_sleep, the row cap and a quote in a parameter).

Every attempt must be rejected or bounded, never executed as a write: the data is checked
afterwards with the admin role, and the queries are shown to run as the read-only role
(`DATABASE_READONLY_URL` from `ensure_reader_role`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from analytics_engine.core import channels
from analytics_engine.core.errors import RemoteError
from analytics_engine.core.request_reply import RequestReplyClient
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.database.roles import READER_ROLE, ensure_reader_role
from analytics_engine.database.service import Settings, create

TIMEOUT_S = 1.0
MAX_ROWS = 1000
REJECTED = {"read_only_violation", "invalid_query", "query_timeout"}


@pytest.fixture
async def reader_url(database_url: str) -> str:
    return await ensure_reader_role(database_url, password="hostile-reader-pw")


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def service(
    redis_url: str,
    database_url: str,
    reader_url: str,
    running: Callable[[ServiceRuntime], Awaitable[ServiceRuntime]],
    admin: asyncpg.Connection,
) -> ServiceRuntime:
    runtime = await running(
        create(
            Settings(
                redis_url=redis_url,
                database_url=database_url,
                database_readonly_url=reader_url,
                port=0,
                instance_id="db-hostile",
                heartbeat_interval_s=60.0,
                archival_interval=timedelta(seconds=0),
                query_timeout=timedelta(seconds=TIMEOUT_S),
                query_max_rows=MAX_ROWS,
            )
        )
    )
    await admin.execute(
        "INSERT INTO kpi_results (kpi_code, window_start, window_end, dimensions, dims_key, value,"
        " sample_count, definition_version, computed_at) VALUES"
        " ('rev', '2024-01-01T00:00Z', '2024-01-01T00:01Z', '{}', '{}', 1.5, 2, 1, now()),"
        " ('rev', '2024-01-01T00:01Z', '2024-01-01T00:02Z', '{}', '{}', 2.5, 3, 1, now())"
    )
    return runtime


@pytest.fixture
async def client(redis: Redis) -> AsyncIterator[RequestReplyClient]:
    c = RequestReplyClient(redis, service="cli", instance="q1", default_timeout=15)
    yield c
    await c.close()


async def query(
    client: RequestReplyClient, sql: str, params: list[Any] | None = None, **extra: Any
) -> dict[str, Any]:
    return await client.request(
        channels.DATABASE_QUERY, "execute_query", {"sql": sql, "params": params or [], **extra}
    )


async def rejected(client: RequestReplyClient, sql: str, params: list[Any] | None = None) -> str:
    with pytest.raises(RemoteError) as info:
        await query(client, sql, params)
    return str(info.value.code)


async def snapshot(admin: asyncpg.Connection) -> tuple[Any, ...]:
    """What a successful write would change."""
    return (
        await admin.fetchval("SELECT count(*) FROM kpi_results"),
        await admin.fetchval("SELECT sum(value) FROM kpi_results"),
        await admin.fetchval("SELECT count(*) FROM pg_largeobject_metadata"),
        await admin.fetchval(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        ),
    )


pytestmark = pytest.mark.usefixtures("service")


async def test_queries_run_as_the_read_only_role(client: RequestReplyClient) -> None:
    out = await query(
        client,
        "SELECT current_user, session_user, current_setting('transaction_read_only'),"
        " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
    )
    assert out["rows"] == [[READER_ROLE, READER_ROLE, "on", False]]


async def test_injection_through_params_stays_literal(
    client: RequestReplyClient, admin: asyncpg.Connection
) -> None:
    before = await snapshot(admin)
    evil = [
        "rev' OR '1'='1",
        "rev'); DELETE FROM kpi_results; --",
        "rev\\'; DROP TABLE kpi_results; --",
        "$$; DELETE FROM kpi_results; $$",
        "\u202erev",
        "rev\U0001f600",
    ]
    for value in evil:
        out = await query(client, "SELECT count(*) FROM kpi_results WHERE kpi_code = $1", [value])
        assert out["rows"] == [[0]], value
        out = await query(client, "SELECT $1::text, length($1::text)", [value])
        assert out["rows"] == [[value, len(value)]], value
    # in LIKE and jsonb the parameter is still one value
    out = await query(client, "SELECT count(*) FROM kpi_results WHERE kpi_code LIKE $1", ["%"])
    assert out["rows"] == [[2]]
    out = await query(client, "SELECT $1::jsonb ->> 'k'", [{"k": "'; DELETE FROM x; --"}])
    assert out["rows"] == [["'; DELETE FROM x; --"]]
    # a parameter naming a relation is resolved as a name, never parsed as SQL
    code = await rejected(client, "SELECT $1::regclass", ["kpi_results; DELETE FROM kpi_results"])
    assert code == "invalid_query"
    # NUL cannot be stored in PostgreSQL text: a clean error, not an internal one
    assert await rejected(client, "SELECT $1::text", ["a\x00b"]) == "invalid_query"
    assert await snapshot(admin) == before


async def test_stacked_statements_never_run(
    client: RequestReplyClient, admin: asyncpg.Connection
) -> None:
    before = await snapshot(admin)
    for sql in (
        "SELECT 1;DELETE FROM kpi_results",
        "SELECT 1; COMMIT; DELETE FROM kpi_results",
        "SELECT 1; ROLLBACK; BEGIN READ WRITE; DELETE FROM kpi_results; COMMIT",
        "SELECT 1; SET ROLE postgres; DELETE FROM kpi_results",
        "SELECT 1 /* ; */; DELETE FROM kpi_results -- ;",
        "SELECT 1; SELECT lo_import('/etc/passwd')",
        "VALUES (1); DROP TABLE kpi_results",
        "(SELECT 1); TRUNCATE kpi_results",
    ):
        assert await rejected(client, sql) in REJECTED, sql
    for sql in (
        "COMMIT",
        "BEGIN READ WRITE",
        "SET TRANSACTION READ WRITE",
        "SET ROLE postgres",
        "RESET ROLE",
        "DO $$ BEGIN DELETE FROM kpi_results; END $$",
        "CALL some_procedure()",
        "CREATE TEMP TABLE t AS SELECT 1",
        "EXPLAIN ANALYZE DELETE FROM kpi_results",
        "PREPARE p AS DELETE FROM kpi_results",
        "LISTEN x",
        "LOCK TABLE kpi_results",
        "VACUUM kpi_results",
    ):
        assert await rejected(client, sql) == "read_only_violation", sql
    assert await snapshot(admin) == before


async def test_writes_hidden_in_ctes_and_subqueries(
    client: RequestReplyClient, admin: asyncpg.Connection
) -> None:
    before = await snapshot(admin)
    for sql in (
        "WITH d AS (DELETE FROM kpi_results RETURNING *) SELECT count(*) FROM d",
        "WITH u AS (UPDATE kpi_results SET value = 0 RETURNING 1) SELECT * FROM u",
        "WITH i AS (INSERT INTO kpi_results (kpi_code) VALUES ('x') RETURNING 1) SELECT * FROM i",
        "WITH a AS (SELECT 1), d AS (DELETE FROM kpi_results RETURNING 1) SELECT * FROM a, d",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3),"
        " d AS (DELETE FROM kpi_results RETURNING 1) SELECT * FROM r",
        "SELECT * FROM (WITH d AS (DELETE FROM kpi_results RETURNING 1) SELECT * FROM d) s",
        "/* comment */ (( WITH d AS (DELETE FROM kpi_results RETURNING 1) SELECT * FROM d ))",
        "SELECT 1 FROM kpi_results FOR UPDATE",
        "TABLE kpi_results FOR UPDATE",
    ):
        assert await rejected(client, sql) in REJECTED, sql
    assert await snapshot(admin) == before


async def test_writes_through_functions(
    client: RequestReplyClient, admin: asyncpg.Connection
) -> None:
    await admin.execute("CREATE SEQUENCE hostile_seq")
    # a SECURITY DEFINER function owned by the admin: the role check is bypassed on purpose,
    # so only the READ ONLY transaction stands in the way
    await admin.execute(
        "CREATE FUNCTION hostile_definer() RETURNS int LANGUAGE plpgsql SECURITY DEFINER AS"
        " $$ BEGIN DELETE FROM kpi_results; RETURN 1; END $$"
    )
    before = await snapshot(admin)
    for sql in (
        "SELECT setval('hostile_seq', 1000)",
        "SELECT hostile_definer()",
        "SELECT lo_create(0)",
        "SELECT lo_from_bytea(0, 'x'::bytea)",
        "SELECT lo_import('/etc/passwd')",
        "SELECT lo_export(0, '/tmp/hostile')",
        "SELECT set_config('transaction_read_only', 'off', true)",
        "SELECT set_config('role', 'postgres', false)",
        "SELECT set_config('session_authorization', 'postgres', false)",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
        "SELECT pg_reload_conf()",
        "SELECT pg_switch_wal()",
    ):
        assert await rejected(client, sql) in REJECTED, sql
    # allowed in a READ ONLY transaction and harmless: an xid, a notification nobody hears
    for sql in (
        "SELECT txid_current() > 0",
        "SELECT true FROM (SELECT pg_notify('hostile', 'x')) s",
    ):
        assert (await query(client, sql))["rows"] == [[True]]
    assert await admin.fetchval("SELECT last_value FROM hostile_seq") == 1
    assert await snapshot(admin) == before


async def test_session_state_does_not_leak_into_the_pool(
    client: RequestReplyClient, admin: asyncpg.Connection, reader_url: str
) -> None:
    """Session-level settings and locks taken by one query are gone for the next one."""
    await query(client, "SELECT set_config('default_transaction_read_only', 'off', false)")
    await query(client, "SELECT set_config('search_path', 'pg_temp', false)")
    out = await query(client, "SELECT pg_advisory_lock(4242), pg_try_advisory_lock(4243)")
    assert out["rows"] == [[None, True]]
    held = await admin.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid IN (4242, 4243)"
    )
    assert held == 0, "advisory locks outlived the query on a pooled connection"
    for _ in range(10):  # every pooled connection
        out = await query(
            client,
            "SELECT current_setting('default_transaction_read_only'),"
            " current_setting('transaction_read_only'), current_setting('search_path')",
        )
        assert out["rows"][0][:2] == ["on", "on"], out
        assert "pg_temp" not in out["rows"][0][2].split(",")[0], out
    # the role itself has no way around it either
    conn = await asyncpg.connect(reader_url)
    try:
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await conn.execute("SET ROLE postgres")
    finally:
        await conn.close()


async def test_server_files_and_secrets_are_out_of_reach(client: RequestReplyClient) -> None:
    for sql in (
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT pg_read_file('postgresql.conf')",
        "SELECT pg_read_binary_file('/etc/passwd')",
        "SELECT pg_ls_dir('.')",
        "SELECT pg_stat_file('postgresql.conf')",
        "SELECT * FROM pg_ls_logdir()",
        "SELECT rolpassword FROM pg_authid",
        "SELECT passwd FROM pg_shadow",
        "SELECT * FROM pg_file_settings",
        "SELECT current_setting('data_directory')",
    ):
        assert await rejected(client, sql) == "read_only_violation", sql  # 42501


async def test_dblink_cannot_open_a_writable_session(
    client: RequestReplyClient, admin: asyncpg.Connection, database_url: str
) -> None:
    """If an operator installed dblink, the reader still cannot reach a writable session: the
    server asks for a password the reader does not know, and its own sessions are read-only
    without write privileges."""
    available = await admin.fetchval(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'dblink'"
    )
    if not available:
        pytest.skip("dblink is not installed on this server")
    await admin.execute("CREATE EXTENSION dblink")
    before = await snapshot(admin)
    admin_user = await admin.fetchval("SELECT current_user")
    db = await admin.fetchval("SELECT current_database()")
    for connstr in (
        f"dbname={db} user={admin_user}",
        f"dbname={db} user={admin_user} password=wrong",
        f"dbname={db} user={READER_ROLE}",
    ):
        for sql in (
            f"SELECT * FROM dblink('{connstr}', 'DELETE FROM kpi_results RETURNING 1') AS t(x int)",
            f"SELECT dblink_exec('{connstr}', 'DELETE FROM kpi_results')",
            f"SELECT dblink_connect('{connstr}')",
        ):
            # a refused dblink connection (SQLSTATE 08001) is reported as `unavailable`
            assert await rejected(client, sql) in {*REJECTED, "unavailable"}, sql
    # even with the reader's own password, a dblink session cannot write
    own = f"dbname={db} user={READER_ROLE} password=hostile-reader-pw host=127.0.0.1"
    port = await admin.fetchval("SELECT current_setting('port')")
    own += f" port={port}"
    for sql in (
        f"SELECT dblink_exec('{own}', 'BEGIN READ WRITE; DELETE FROM kpi_results; COMMIT')",
        f"SELECT dblink_exec('{own}', 'BEGIN READ WRITE; SELECT lo_create(0); COMMIT')",
    ):
        with pytest.raises(RemoteError):
            await query(client, sql)
    assert await snapshot(admin) == before


async def test_slow_queries_are_cut_at_the_timeout(client: RequestReplyClient) -> None:
    for sql in (
        "SELECT pg_sleep(30)",
        "SELECT pg_sleep(5) FROM kpi_results",
        "WITH x AS (SELECT pg_sleep(30)) SELECT * FROM x",
        "SELECT pg_sleep_for('30 seconds')",
        "SELECT count(*) FROM generate_series(1, 10000000000)",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
        "SELECT count(*) FROM generate_series(1, 100000) a, generate_series(1, 100000) b",
    ):
        started = time.monotonic()
        assert await rejected(client, sql) == "query_timeout", sql
        assert time.monotonic() - started < TIMEOUT_S + 3, sql
    # the service still answers at once
    assert (await query(client, "SELECT 1"))["rows"] == [[1]]


async def test_huge_result_sets_are_capped(client: RequestReplyClient) -> None:
    # 5M rows that stream (a join of two small series): a single generate_series(1, 5000000)
    # is materialised whole before its first row, which on a slow machine meets the 1 s timeout
    huge = (
        "SELECT a.g * 1000 + b.g, md5((a.g * 1000 + b.g)::text)"
        " FROM generate_series(0, 4999) a(g), generate_series(1, 1000) b(g)"
    )
    out = await query(client, huge)
    assert (out["row_count"], out["truncated"]) == (MAX_ROWS, True)
    out = await query(client, "SELECT g FROM generate_series(1, 10) g", max_rows=10**12)
    assert out["row_count"] == 10  # a caller cannot raise the cap
    for bad in (0, -1, "10", True, 1.5, None):
        if bad is None:
            continue
        with pytest.raises(RemoteError) as info:
            await query(client, "SELECT 1", max_rows=bad)
        assert info.value.code in ("invalid_query", "invalid_request"), bad


async def test_wide_rows_are_bounded_in_bytes(client: RequestReplyClient) -> None:
    """40 rows of 1 MB would make a 40 MB reply that Redis could not deliver: the result is
    cut at the byte cap (4 MB by default) and marked truncated."""
    out = await client.request(
        channels.DATABASE_QUERY,
        "execute_query",
        {"sql": "SELECT repeat('x', 1000000) FROM generate_series(1, 40)"},
        timeout=8,
    )
    assert out["truncated"] is True
    assert 1 <= out["row_count"] <= 5
    assert len(str(out)) < 6_000_000
