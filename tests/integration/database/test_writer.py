"""EntityEventWriter on a real PostgreSQL: the bulk COPY path and its deduplicating fallback."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import CollectorRegistry

from analytics_engine.core.storable import EntityEventRow
from analytics_engine.database.db import connect, create_pool
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.migrate import migrate
from analytics_engine.database.partitions import PartitionManager
from analytics_engine.database.writer import (
    STAGING_SETUP,
    EntityEventWriter,
)

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


def random_batch(rng: random.Random, prefix: str, size: int) -> list[EntityEventRow]:
    """Events of a few entities with clashing versions, kinds and times (and repeats)."""
    rows: list[EntityEventRow] = []
    for _ in range(size):
        if rows and rng.random() < 0.1:
            rows.append(rng.choice(rows))  # the same event twice in the batch
            continue
        kind = rng.choice(["created", "updated", "updated", "deactivated"])
        version = rng.randint(0, 6)
        r = row(f"{prefix}-{rng.randint(0, 4)}", version, kind, offset=rng.randint(-50, 50))
        if kind != "deactivated":
            r = r._replace(attributes=orjson.dumps({"r": rng.randint(0, 99)}).decode())
        rows.append(r)
    return rows


def _in_version_order(rows: list[EntityEventRow]) -> list[EntityEventRow]:
    """Version order; at equal versions attribute-carrying events before deactivations, then
    batch order: the order `fold_entity_events` documents its result to be equivalent to."""
    order = sorted(
        enumerate(rows), key=lambda p: (p[1].version, p[1].event_kind == "deactivated", p[0])
    )
    return [r for _, r in order]


def _as(rows: list[EntityEventRow], entity_type: str) -> list[EntityEventRow]:
    """The same events under another entity type (and event ids: they are stored too)."""
    ns = uuid.UUID(int=len(entity_type))
    return [
        r._replace(entity_type=entity_type, event_id=str(uuid.uuid5(ns, r.event_id))) for r in rows
    ]


async def test_a_batch_leaves_the_state_of_its_events_applied_one_by_one(
    writer: EntityEventWriter, pg: asyncpg.Connection
) -> None:
    """Whatever is stored already, writing a batch gives the state of writing its events one
    at a time in version order."""
    rng = random.Random(11)
    for n in range(15):
        stored = random_batch(rng, f"s{n}", rng.randint(0, 8))
        batch = random_batch(rng, f"s{n}", rng.randint(1, 25))
        for r in _in_version_order(_as(stored, "batch")) + _in_version_order(_as(stored, "single")):
            await writer.write([r])
        await writer.write(_as(batch, "batch"))
        for r in _in_version_order(_as(batch, "single")):
            await writer.write([r])
    query = (
        "SELECT entity_id, version, attributes, active, created_at, updated_at,"
        " deactivated_at, deactivation_reason FROM entities WHERE entity_type = $1"
        " ORDER BY entity_id"
    )
    batched = [tuple(r) for r in await pg.fetch(query, "batch")]
    assert batched == [tuple(r) for r in await pg.fetch(query, "single")]
    assert len(batched) > 30


def replay(events: list[EntityEventRow]) -> dict[str, Any]:
    """An entity's state from applying its events one at a time in version order (at equal
    versions attribute-carrying events first): what `entities` holds whatever order the events
    were committed in. A deactivation keeps the attributes it finds."""
    state: dict[str, Any] = {"attributes": {}}
    for e in _in_version_order(events):
        state.update(version=e.version, updated_at=e.occurred_at, last_event_id=e.event_id)
        if e.event_kind == "deactivated":
            state.update(active=False, deactivated_at=e.occurred_at, deactivation_reason=e.reason)
        else:
            assert e.attributes is not None
            state.update(
                active=True,
                attributes=orjson.loads(e.attributes),
                deactivated_at=None,
                deactivation_reason=None,
            )
    state["created_at"] = min(e.occurred_at for e in events)
    return state


async def stored_states(pg: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    rows = await pg.fetch(
        "SELECT entity_id, version, attributes, active, created_at, updated_at, deactivated_at,"
        " deactivation_reason, last_event_id::text FROM entities"
    )
    states = {}
    for r in rows:
        state = dict(r)
        state["attributes"] = orjson.loads(state["attributes"])
        states[state.pop("entity_id")] = state
    return states


async def test_a_deactivation_committed_first_keeps_the_attributes_of_older_updates(
    writer: EntityEventWriter, pg: asyncpg.Connection
) -> None:
    """Deactivations travel on their own stream and writers commit in any order: an update or
    a creation committed after a newer deactivation still sets the attributes."""
    a = [row("a", 1, "created", 1), row("a", 3, "deactivated", 3), row("a", 2, "updated", 2)]
    b = [row("b", 2, "deactivated", 2), row("b", 1, "created", 1)]
    c = [row("c", 3, "deactivated", 3), row("c", 3, "updated", 3), row("c", 2, "updated", 2)]
    for r in a + b + c:
        await writer.write([r])
    states = await stored_states(pg)
    assert states == {e[0].entity_id: replay(e) for e in (a, b, c)}
    assert (states["a"]["version"], states["a"]["active"], states["a"]["attributes"]) == (
        3,
        False,
        {"v": 2},
    )
    assert (states["b"]["version"], states["b"]["active"], states["b"]["attributes"]) == (
        2,
        False,
        {"v": 1},
    )
    assert states["c"]["attributes"] == {"v": 3}
    # ... and what is older than the attributes held still changes nothing
    assert await writer.write([row("a", 1, "updated", 9), row("b", 0, "created", 0)]) == 2
    assert (await stored_states(pg))["a"] == states["a"]
    assert (await stored_states(pg))["b"]["attributes"] == {"v": 1}


def entity_history(rng: random.Random, entity_id: str) -> list[EntityEventRow]:
    """A creation, then updates and deactivations (one sometimes sharing an update's version),
    versions with gaps, each with its own attributes and reason."""
    versions = sorted(rng.sample(range(1, 12), rng.randint(1, 5)))
    events = [row(entity_id, versions[0], "created", versions[0])]
    for v in versions[1:]:
        kind = "deactivated" if rng.random() < 0.35 else "updated"
        events.append(row(entity_id, v, kind, v))
        if kind == "updated" and rng.random() < 0.15:
            events.append(row(entity_id, v, "deactivated", v))
    return [
        e._replace(
            attributes=None if e.attributes is None else orjson.dumps({"v": e.version}).decode(),
            reason=None if e.attributes is not None else f"r{e.version}",
        )
        for e in events
    ]


async def test_entities_are_the_events_in_version_order_whatever_the_commit_order(
    writer: EntityEventWriter, pg: asyncpg.Connection
) -> None:
    """Events shuffled into batches of every size, two writers committing at once: each entity
    ends as applying its events in version order."""
    rng = random.Random(5)
    histories = {f"e{i}": entity_history(rng, f"e{i}") for i in range(400)}
    events = [e for history in histories.values() for e in history]
    rng.shuffle(events)
    batches: list[list[EntityEventRow]] = []
    while events:
        size = rng.choice([1, 1, 2, 5, 20, 80])
        batches.append(events[:size])
        events = events[size:]
    for i in range(0, len(batches), 2):
        await asyncio.gather(*(writer.write(b) for b in batches[i : i + 2]))
    states = await stored_states(pg)
    wrong = {
        k: (states.get(k), replay(h)) for k, h in histories.items() if states.get(k) != replay(h)
    }
    assert not wrong, (
        f"{len(wrong)} of {len(histories)} entities differ, e.g. {next(iter(wrong.items()))}"
    )
