"""EntityEventWriter on a real PostgreSQL: the bulk COPY path and its deduplicating fallback."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import CollectorRegistry

from analytics_engine.database.db import connect, create_pool
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.migrate import migrate
from analytics_engine.database.model import EntityEventRow
from analytics_engine.database.partitions import PartitionManager
from analytics_engine.database.writer import STAGING_SETUP, EntityEventWriter

from .conftest import count

T0 = datetime(2024, 6, 1, 12, tzinfo=UTC)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Any]:
    conn = await connect(database_url)
    try:
        await migrate(conn, timescale="off")
    finally:
        await conn.close()
    pool = await create_pool(database_url, max_size=2, setup_sql=STAGING_SETUP)
    yield pool
    await pool.close()


@pytest.fixture
def writer(pool: Any) -> EntityEventWriter:
    return EntityEventWriter(
        pool, PartitionManager(enabled=True), DatabaseMetrics(CollectorRegistry())
    )


def row(entity_id: str, version: int, kind: str = "updated", offset: int = 0) -> EntityEventRow:
    return EntityEventRow(
        event_id=str(uuid.uuid4()),
        event_kind=kind,  # type: ignore[arg-type]
        entity_type="order",
        entity_id=entity_id,
        version=version,
        occurred_at=T0 + timedelta(seconds=offset),
        published_at=T0 + timedelta(seconds=offset, milliseconds=5),
        attributes=None if kind == "deactivated" else orjson.dumps({"v": version}).decode(),
        reason="gone" if kind == "deactivated" else None,
        source="data_simulator",
    )


async def test_new_events_take_the_bulk_path_and_are_stored_as_given(
    writer: EntityEventWriter, pg: asyncpg.Connection
) -> None:
    rows = [row(f"o-{i}", 1, "created", offset=i) for i in range(100)]
    assert await writer.write(rows) == 100
    stored = await pg.fetchrow(
        "SELECT * FROM entity_events WHERE event_id = $1", uuid.UUID(rows[7].event_id)
    )
    assert stored["entity_id"] == "o-7"
    assert stored["occurred_at"] == rows[7].occurred_at
    assert stored["published_at"] == rows[7].published_at
    assert orjson.loads(stored["attributes"]) == {"v": 1}
    assert await count(pg, "SELECT count(*) FROM entities") == 100


async def test_a_batch_holding_stored_events_is_deduplicated_not_rejected(
    writer: EntityEventWriter, pg: asyncpg.Connection
) -> None:
    rows = [row(f"o-{i}", 1, "created", offset=i) for i in range(60)]
    assert await writer.write(rows[:20]) == 20
    # a fresh delivery (not flagged redelivered) overlapping what is stored: the bulk COPY
    # fails on the primary key and the batch is written again, deduplicated
    assert await writer.write(rows[10:40]) == 20
    assert await writer.write(rows, redelivered=True) == 20
    assert await writer.write(rows, redelivered=True) == 0
    assert await count(pg, "SELECT count(*) FROM entity_events") == 60
    assert await count(pg, "SELECT count(DISTINCT event_id) FROM entity_events") == 60
    assert await count(pg, "SELECT count(*) FROM entities") == 60


async def test_the_same_event_twice_in_one_batch_is_stored_once(
    writer: EntityEventWriter, pg: asyncpg.Connection
) -> None:
    r = row("dup", 1, "created")
    assert await writer.write([r, row("other", 1, "created"), r]) == 2
    assert await count(pg, "SELECT count(*) FROM entity_events") == 2


async def test_the_fallback_keeps_entity_state_ordered_by_version(
    writer: EntityEventWriter, pg: asyncpg.Connection
) -> None:
    v1, v3 = row("e", 1, "created"), row("e", 3, offset=3)
    await writer.write([v1, v3])
    deact = row("e", 4, "deactivated", offset=4)
    late_v2 = row("e", 2, offset=2)
    assert await writer.write([v3, late_v2, deact]) == 2  # v3 again: the fallback path
    entity = await pg.fetchrow("SELECT * FROM entities WHERE entity_id = 'e'")
    assert entity["version"] == 4
    assert entity["active"] is False
    assert entity["deactivation_reason"] == "gone"
    assert orjson.loads(entity["attributes"]) == {"v": 3}
    assert entity["created_at"] == T0
    assert entity["last_event_id"] == uuid.UUID(deact.event_id)


async def test_jsonb_goes_both_ways_through_the_pools_codec(pool: Any) -> None:
    async with pool.acquire() as conn:
        value = {"a": [1, 2.5, None], "b": "é"}
        assert await conn.fetchval("SELECT $1::jsonb", value) == value
        assert await conn.fetchval("SELECT $1::jsonb", '{"x": 1}') == {"x": 1}
        assert await conn.fetchval("SELECT '[1, {\"k\": true}]'::jsonb") == [1, {"k": True}]
        assert await conn.fetchval("SELECT $1::json", value) == value
