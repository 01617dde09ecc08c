"""QueryRequestHandler: read-only execute_query and the small request types, over real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from analytics_engine.core import channels
from analytics_engine.core.errors import RemoteError
from analytics_engine.core.request_reply import RequestReplyClient
from analytics_engine.database.query_handler import LIST_ENTITIES
from analytics_engine.database.roles import ensure_reader_role

from .conftest import Start, count


@pytest.fixture
async def reader_url(database_url: str) -> str:
    return await ensure_reader_role(database_url, password="reader-test-pw")


@pytest.fixture
async def client(redis: Redis) -> AsyncIterator[RequestReplyClient]:
    c = RequestReplyClient(redis, service="cli", instance="t1", default_timeout=15)
    yield c
    await c.close()


@pytest.fixture
async def service(start_service: Start, reader_url: str, pg: asyncpg.Connection) -> None:
    await start_service(
        database_readonly_url=reader_url, query_timeout=timedelta(seconds=1), query_max_rows=1000
    )
    await pg.execute(
        "INSERT INTO kpi_results (kpi_code, window_start, window_end, dimensions, dims_key, value,"
        " sample_count, definition_version, computed_at) VALUES"
        " ('rev', '2024-01-01T00:00Z', '2024-01-01T00:01Z', '{\"r\": \"eu\"}', '{\"r\":\"eu\"}',"
        "  1.5, 2, 1, '2024-01-01T00:01:10Z'),"
        " ('rev', '2024-01-01T00:01Z', '2024-01-01T00:02Z', '{\"r\": \"eu\"}', '{\"r\":\"eu\"}',"
        "  2.5, 3, 1, '2024-01-01T00:02:10Z'),"
        " ('rev', '2024-01-01T00:00Z', '2024-01-01T00:01Z', '{\"r\": \"us\"}', '{\"r\":\"us\"}',"
        "  7, 1, 1, '2024-01-01T00:01:10Z')"
    )


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


@pytest.mark.usefixtures("service")
async def test_execute_query_returns_json_safe_rows(client: RequestReplyClient) -> None:
    out = await query(
        client,
        "SELECT kpi_code, window_start, value, dimensions, 1.25::numeric AS n,"
        " gen_random_uuid() IS NOT NULL AS ok FROM kpi_results WHERE kpi_code = $1"
        " AND window_start >= $2 ORDER BY window_start, dims_key",
        ["rev", "2024-01-01T00:00:00Z"],
    )
    assert out["columns"] == ["kpi_code", "window_start", "value", "dimensions", "n", "ok"]
    assert out["row_count"] == 3 and out["truncated"] is False
    assert out["rows"][0] == ["rev", "2024-01-01T00:00:00+00:00", 1.5, {"r": "eu"}, 1.25, True]


@pytest.mark.usefixtures("service")
async def test_execute_query_answers_only_the_services_allowed_sql(redis: Redis) -> None:
    """`DATABASE_EXECUTE_QUERY_CALLERS` (default: the engine and the cli): the API gateway's
    credential may ask for KPI history and entities, not run SQL."""
    gateway = RequestReplyClient(redis, service="api_gateway", instance="g1", default_timeout=15)
    engine = RequestReplyClient(redis, service="calculation_engine", instance="c1")
    try:
        with pytest.raises(RemoteError) as info:
            await query(gateway, "SELECT 1 AS x")
        assert info.value.code == "forbidden"
        assert "DATABASE_EXECUTE_QUERY_CALLERS" in str(info.value)
        history = await gateway.request(
            channels.DATABASE_QUERY,
            "kpi_history",
            {"kpi_code": "rev", "start": "2024-01-01T00:00Z", "end": "2024-01-02T00:00Z"},
        )
        assert len(history["rows"]) == 3
        assert (await query(engine, "SELECT 1 AS x"))["rows"] == [[1]]
    finally:
        await gateway.close()
        await engine.close()


@pytest.mark.usefixtures("service")
async def test_writes_are_rejected(client: RequestReplyClient, pg: asyncpg.Connection) -> None:
    for sql in (
        "INSERT INTO kpi_results (kpi_code) VALUES ('x')",
        "UPDATE kpi_results SET value = 0",
        "DELETE FROM kpi_results",
        "  /* sneaky */ -- comment\n DROP TABLE kpi_results",
        "TRUNCATE kpi_results",
        "COPY kpi_results TO STDOUT",
    ):
        assert await rejected(client, sql) == "read_only_violation", sql
    # data-modifying CTE: passes the keyword check, refused by the READ ONLY transaction
    assert (
        await rejected(client, "WITH x AS (DELETE FROM kpi_results RETURNING 1) SELECT * FROM x")
        == "read_only_violation"
    )
    assert await rejected(client, "SELECT * INTO copy_of FROM kpi_results") == "read_only_violation"
    # a volatile function that writes
    await pg.execute("CREATE SEQUENCE s")
    assert await rejected(client, "SELECT nextval('s')") == "read_only_violation"
    await pg.execute(
        "CREATE FUNCTION wipe() RETURNS int LANGUAGE sql AS 'DELETE FROM kpi_results RETURNING 1'"
    )
    assert await rejected(client, "SELECT wipe()") == "read_only_violation"
    # session settings cannot outlive the query (the pool resets connections)
    await query(client, "SELECT set_config('statement_timeout', '0', false)")
    assert await rejected(client, "SELECT pg_sleep(3)") == "query_timeout"
    assert await count(pg, "SELECT count(*) FROM kpi_results") == 3


@pytest.mark.usefixtures("service")
async def test_multiple_statements_and_bad_sql_are_invalid(client: RequestReplyClient) -> None:
    assert await rejected(client, "SELECT 1; SELECT 2") == "invalid_query"
    assert await rejected(client, "SELECT 1; DELETE FROM kpi_results") == "invalid_query"
    assert await rejected(client, "SELECT * FROM no_such_table") == "invalid_query"
    assert await rejected(client, "SELECT $1::int", []) == "invalid_query"
    assert await rejected(client, "SELECT $1::int", ["abc"]) == "invalid_query"
    # stored jsonb that JSON with doubles cannot carry: a clear error, not `internal`
    with pytest.raises(RemoteError) as info:
        await query(client, "SELECT '1e400'::jsonb AS big")
    assert (info.value.code, "JSON" in str(info.value)) == ("invalid_query", True)
    assert await rejected(client, "") == "invalid_request"  # the payload breaks the protocol


@pytest.mark.usefixtures("service")
async def test_timeout_and_row_cap(client: RequestReplyClient) -> None:
    assert await rejected(client, "SELECT pg_sleep(10)") == "query_timeout"
    out = await query(client, "SELECT g FROM generate_series(1, 1000000) g")
    assert out["row_count"] == 1000 and out["truncated"] is True
    assert out["rows"][-1] == [1000]
    out = await query(client, "SELECT g FROM generate_series(1, 50) g", max_rows=10)
    assert (out["row_count"], out["truncated"]) == (10, True)
    out = await query(client, "SELECT g FROM generate_series(1, 5) g")
    assert (out["row_count"], out["truncated"]) == (5, False)


@pytest.mark.usefixtures("service")
async def test_the_timeout_bounds_the_whole_read_not_each_page(
    client: RequestReplyClient, pg: asyncpg.Connection
) -> None:
    """Rows come through a cursor page by page and PostgreSQL restarts statement_timeout for
    every page; nor may the query switch the timeout off for the pages after the first."""
    slow_pages = (
        "SELECT g, CASE WHEN g % 500 = 250 THEN pg_sleep(0.6) END FROM generate_series(1, 3000) g"
    )
    started = asyncio.get_running_loop().time()
    assert await rejected(client, slow_pages) == "query_timeout"
    assert asyncio.get_running_loop().time() - started < 2.5
    timeout_off_then_sleep = (
        "SELECT g, CASE WHEN g = 1 THEN set_config('statement_timeout', '0', false)"
        " WHEN g = 600 THEN pg_sleep(8)::text END FROM generate_series(1, 1000) g"
    )
    started = asyncio.get_running_loop().time()
    assert await rejected(client, timeout_off_then_sleep) == "query_timeout"
    assert asyncio.get_running_loop().time() - started < 2.5
    # the connection cancelled mid-read is usable again, and nothing lingers on the server
    out = await query(client, "SELECT 1")
    assert out["rows"] == [[1]]
    assert (
        await count(
            pg,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(8)%'"
            " AND pid <> pg_backend_pid() AND state = 'active'",
        )
        == 0
    )


@pytest.mark.usefixtures("service")
async def test_parameters_stay_literals(client: RequestReplyClient, pg: asyncpg.Connection) -> None:
    evil = "rev'; DELETE FROM kpi_results; --"
    out = await query(client, "SELECT count(*) FROM kpi_results WHERE kpi_code = $1", [evil])
    assert out["rows"] == [[0]]
    out = await query(client, "SELECT $1::text AS t", [evil])
    assert out["rows"] == [[evil]]
    assert await count(pg, "SELECT count(*) FROM kpi_results") == 3


async def test_the_reader_role_cannot_write_even_outside_the_service(
    reader_url: str, start_service: Start
) -> None:
    await start_service()  # migrations
    conn = await asyncpg.connect(reader_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM kpi_results") == 0
        with pytest.raises(asyncpg.exceptions.PostgresError) as info:
            await conn.execute("BEGIN READ WRITE; DELETE FROM kpi_results; COMMIT")
        assert info.value.sqlstate == "42501"  # insufficient privilege
    finally:
        await conn.close()


async def test_latest_values_of_very_many_groups_still_reply(
    start_service: Start, reader_url: str, client: RequestReplyClient, pg: asyncpg.Connection
) -> None:
    """40,000 groups of ~300 B each: more than a Redis message may hold (8 MB in the chart).
    The reply stops at the byte cap and says so, instead of never arriving. (The query timeout
    is the default's, not the other tests' 1 s: reading 40,000 groups takes longer than that on
    a slow machine, and this test is about the size of the reply.)"""
    await start_service(database_readonly_url=reader_url)
    await _store_wide_results(pg)
    latest = await client.request(
        channels.DATABASE_QUERY, "latest_kpi_values", {"kpi_code": "wide"}
    )
    assert latest["truncated"] is True
    assert 5000 < len(latest["rows"]) < 40000
    assert len(orjson.dumps(latest)) < 5 * 1024 * 1024


async def test_a_read_slower_than_the_query_timeout_is_a_timeout_not_an_outage(
    start_service: Start, reader_url: str, client: RequestReplyClient, pg: asyncpg.Connection
) -> None:
    """The latest values of 40,000 groups take longer than 50 ms to read: the reply is a
    `query_timeout` error (the gateway's 504), not "database unavailable" (a 503 telling the
    client to retry what will time out again)."""
    await start_service(database_readonly_url=reader_url, query_timeout=timedelta(milliseconds=50))
    await _store_wide_results(pg)
    with pytest.raises(RemoteError) as info:
        await client.request(channels.DATABASE_QUERY, "latest_kpi_values", {"kpi_code": "wide"})
    assert info.value.code == "query_timeout"
    assert "longer than 0.05s" in str(info.value)


async def _store_wide_results(pg: asyncpg.Connection) -> None:
    """40,000 groups of ~300 B each of the KPI `wide`, one window."""
    await pg.execute(
        "INSERT INTO kpi_results (kpi_code, window_start, window_end, dimensions, dims_key, value,"
        " sample_count, definition_version, computed_at)"
        " SELECT 'wide', '2024-01-01T00:00Z', '2024-01-01T00:01Z', d, d::text, g, 1, 1, now()"
        " FROM generate_series(1, 40000) g,"
        " LATERAL (SELECT jsonb_build_object('customer', g, 'note', repeat('x', 200))) AS x(d)"
    )


@pytest.mark.usefixtures("service")
async def test_kpi_history_latest_values_and_get_entity(
    client: RequestReplyClient, pg: asyncpg.Connection
) -> None:
    hist = await client.request(
        channels.DATABASE_QUERY,
        "kpi_history",
        {
            "kpi_code": "rev",
            "start": "2024-01-01T00:00:00Z",
            "end": "2024-01-01T01:00:00Z",
            "dimensions": {"r": "eu"},
        },
    )
    assert [r["value"] for r in hist["rows"]] == [1.5, 2.5]
    assert hist["rows"][0]["dimensions"] == {"r": "eu"}
    assert hist["rows"][0]["window_end"] == "2024-01-01T00:01:00+00:00"
    latest = await client.request(channels.DATABASE_QUERY, "latest_kpi_values", {"kpi_code": "rev"})
    assert sorted((r["dimensions"]["r"], r["value"]) for r in latest["rows"]) == [
        ("eu", 2.5),
        ("us", 7.0),
    ]
    assert (hist["truncated"], latest["truncated"]) == (False, False)
    await pg.execute(
        "INSERT INTO entities VALUES ('order', 'o-1', 3, '{\"a\": 1}', true, now(), now(),"
        " NULL, NULL, gen_random_uuid())"
    )
    found = await client.request(
        channels.DATABASE_QUERY, "get_entity", {"entity_type": "order", "entity_id": "o-1"}
    )
    assert found["entity"]["version"] == 3 and found["entity"]["attributes"] == {"a": 1}
    missing = await client.request(
        channels.DATABASE_QUERY, "get_entity", {"entity_type": "order", "entity_id": "nope"}
    )
    assert missing == {"entity": None}
    with pytest.raises(RemoteError) as info:
        await client.request(channels.DATABASE_QUERY, "kpi_history", {"kpi_code": "rev"})
    assert info.value.code == "invalid_request"


@pytest.mark.usefixtures("service")
async def test_purge_kpi_results_command(
    client: RequestReplyClient, pg: asyncpg.Connection
) -> None:
    out = await client.request(channels.DATABASE_COMMAND, "purge_kpi_results", {"kpi_code": "rev"})
    assert out == {"kpi_code": "rev", "deleted": 3}
    assert await count(pg, "SELECT count(*) FROM kpi_results") == 0
    with pytest.raises(RemoteError) as info:
        await client.request(channels.DATABASE_COMMAND, "drop_everything", {})
    assert info.value.code == "unknown_request_type"


async def list_entities(client: RequestReplyClient, **payload: Any) -> dict[str, Any]:
    return await client.request(
        channels.DATABASE_QUERY, "list_entities", {"entity_type": "order", **payload}
    )


async def insert_entities(pg: asyncpg.Connection, entity_type: str, count: int) -> None:
    """`count` entities `{entity_type}-0001`...; every third one deactivated."""
    await pg.execute(
        "INSERT INTO entities SELECT $1, $1 || '-' || lpad(g::text, 4, '0'), g,"
        " jsonb_build_object('n', g), g % 3 <> 0, now(), now(),"
        " CASE WHEN g % 3 = 0 THEN now() END, CASE WHEN g % 3 = 0 THEN 'gone' END,"
        " gen_random_uuid() FROM generate_series(1, $2) g",
        entity_type,
        count,
    )


@pytest.mark.usefixtures("service")
async def test_list_entities_pages_by_id(
    client: RequestReplyClient, pg: asyncpg.Connection
) -> None:
    await insert_entities(pg, "order", 25)
    await insert_entities(pg, "customer", 3)  # another type: never listed with orders
    first = await list_entities(client, limit=10)
    assert [r["entity_id"] for r in first["rows"]] == [f"order-{n:04d}" for n in range(1, 11)]
    assert first["next_after"] == "order-0010"
    single = await client.request(
        channels.DATABASE_QUERY, "get_entity", {"entity_type": "order", "entity_id": "order-0001"}
    )
    assert first["rows"][0] == single["entity"]  # the same shape as get_entity's
    seen = [r["entity_id"] for r in first["rows"]]
    after = first["next_after"]
    while after is not None:
        page = await list_entities(client, limit=10, after=after)
        seen += [r["entity_id"] for r in page["rows"]]
        after = page["next_after"]
    assert seen == [f"order-{n:04d}" for n in range(1, 26)]  # all, once, in order; last page 5
    exact = await list_entities(client, limit=5, after="order-0020")
    assert exact["next_after"] == "order-0025"  # a full page: there may be more
    assert await list_entities(client, after="order-0025") == {"rows": [], "next_after": None}
    everything = await list_entities(client)  # default limit 100
    assert len(everything["rows"]) == 25 and everything["next_after"] is None


@pytest.mark.usefixtures("service")
async def test_list_entities_active_filter_and_limit_cap(
    client: RequestReplyClient, pg: asyncpg.Connection
) -> None:
    await insert_entities(pg, "order", 1500)
    active = await list_entities(client, active=True, limit=4)
    assert [r["entity_id"] for r in active["rows"]] == [
        "order-0001",
        "order-0002",
        "order-0004",
        "order-0005",
    ]
    assert all(r["active"] and r["deactivated_at"] is None for r in active["rows"])
    inactive = await list_entities(client, active=False, after="order-0003", limit=2)
    assert [r["entity_id"] for r in inactive["rows"]] == ["order-0006", "order-0009"]
    assert inactive["rows"][0]["deactivation_reason"] == "gone"
    capped = await list_entities(client, limit=1_000_000)
    assert len(capped["rows"]) == 1000 and capped["next_after"] == "order-1000"


@pytest.mark.usefixtures("service")
async def test_list_entities_reads_the_primary_key(pg: asyncpg.Connection) -> None:
    """Keyset pagination: the type and the `after` bound are the primary key's index
    condition and the order is the index's, on any page, in a custom plan and in the generic
    plan a prepared statement switches to."""
    await insert_entities(pg, "order", 5000)
    await pg.execute("ANALYZE entities")
    await pg.execute(f"PREPARE page(text, text, boolean, integer) AS {LIST_ENTITIES}")
    for mode in ("force_custom_plan", "force_generic_plan"):
        await pg.execute(f"SET plan_cache_mode = {mode}")
        for args in ("'order', '', NULL, 100", "'order', 'order-4000', true, 100"):
            plan = "\n".join(r[0] for r in await pg.fetch(f"EXPLAIN EXECUTE page({args})"))
            assert "Index Scan using entities_pkey" in plan, (mode, plan)
            condition = plan.split("Index Cond:")[1].split("\n")[0]
            assert "entity_id >" in condition, (mode, plan)
            assert "Sort" not in plan, (mode, plan)


@pytest.mark.usefixtures("service")
async def test_list_entities_refuses_bad_payloads(client: RequestReplyClient) -> None:
    for payload, field in [
        ({"active": "yes"}, "active"),
        ({"limit": 0}, "limit"),
        ({"limit": "10"}, "limit"),
        ({"limit": True}, "limit"),
        ({"after": ""}, "after"),
        ({"entity_type": ""}, "entity_type"),
        ({"entity_type": None}, "entity_type"),
        ({"after": "o\x00"}, "after"),
    ]:
        with pytest.raises(RemoteError) as info:
            await list_entities(client, **payload)
        assert info.value.code == "invalid_request", payload
        assert field in str(info.value), (payload, str(info.value))


async def test_list_entities_stops_at_the_byte_cap_and_goes_on_from_there(
    start_service: Start, reader_url: str, pg: asyncpg.Connection, client: RequestReplyClient
) -> None:
    """A page of large entities stops before its reply outgrows a message, and says where the
    next one begins; an entity larger than the cap on its own still comes, alone."""
    await start_service(database_readonly_url=reader_url, query_max_bytes=2048)
    await insert_entities(pg, "order", 6)
    await pg.execute(
        "UPDATE entities SET attributes = jsonb_build_object('note', repeat('x', 600))"
        " WHERE entity_id <> 'order-0003'"
    )
    await pg.execute(
        "UPDATE entities SET attributes = jsonb_build_object('note', repeat('y', 5000))"
        " WHERE entity_id = 'order-0003'"
    )
    pages: list[list[str]] = []
    after = None
    while True:
        page = await list_entities(client, **({} if after is None else {"after": after}))
        pages.append([r["entity_id"] for r in page["rows"]])
        if (after := page["next_after"]) is None:
            break
        assert after == pages[-1][-1]
    assert pages == [
        ["order-0001", "order-0002"],
        ["order-0003"],
        ["order-0004", "order-0005"],
        ["order-0006"],
    ]
