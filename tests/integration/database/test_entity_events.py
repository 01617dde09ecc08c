"""SimulationDataConsumer: every entity event stored once, entity state ordered by version."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
from redis.asyncio import Redis

from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher
from analytics_engine.core.envelopes import Event

from .conftest import Start, count, entity_event, wait_for


async def test_every_event_is_stored_exactly_once_even_when_redelivered(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection
) -> None:
    await start_service()
    events = [
        entity_event(publisher, "created", f"o-{i}", 1, attributes={"amount": i, "n": "x"})
        for i in range(3000)
    ]
    await publisher.publish_events(events)
    await publisher.publish_events(events[:500])  # the same events again: redelivery
    await wait_for(lambda: _events_stored(pg, 3000))
    # give the redelivered copies time to be processed too
    await wait_for(lambda: _stream_drained(publisher, pg))
    assert await count(pg, "SELECT count(*) FROM entity_events") == 3000
    assert await count(pg, "SELECT count(DISTINCT event_id) FROM entity_events") == 3000
    assert await count(pg, "SELECT count(*) FROM entities") == 3000
    row = await pg.fetchrow("SELECT * FROM entity_events WHERE event_id = $1", _uuid(events[7]))
    assert row["event_kind"] == "created"
    assert row["entity_type"] == "order"
    assert row["entity_id"] == "o-7"
    assert row["version"] == 1
    assert orjson.loads(row["attributes"]) == {"amount": 7, "n": "x"}
    assert row["source"] == "data_simulator"
    assert row["published_at"] == events[7].timestamp
    assert row["occurred_at"].isoformat() == events[7].payload["occurred_at"]


async def _events_stored(pg: asyncpg.Connection, n: int) -> bool:
    return await count(pg, "SELECT count(*) FROM entity_events") >= n


async def _stream_drained(publisher: EventPublisher, pg: asyncpg.Connection) -> bool:
    redis: Redis = publisher._redis
    for channel in channels.ENTITY_CHANNELS:
        try:
            groups = await redis.xinfo_groups(channels.stream_key(channel))
        except Exception:
            continue
        for g in groups:
            if g["lag"] or g["pending"]:
                return False
    return True


def _uuid(event: Event) -> object:
    import uuid

    return uuid.UUID(event.event_id)


async def test_late_older_update_never_overwrites_newer_state_and_deactivation_is_kept(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection
) -> None:
    await start_service()
    t0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    created = entity_event(publisher, "created", "c-1", 1, occurred_at=t0, attributes={"s": 1})
    v3 = entity_event(
        publisher, "updated", "c-1", 3, occurred_at=t0 + timedelta(seconds=3), attributes={"s": 3}
    )
    await publisher.publish_events([created, v3])
    await wait_for(lambda: _version_is(pg, "c-1", 3))
    late_v2 = entity_event(
        publisher, "updated", "c-1", 2, occurred_at=t0 + timedelta(seconds=2), attributes={"s": 2}
    )
    await publisher.publish_events([late_v2])
    await wait_for(lambda: _events_stored(pg, 3))
    entity = await pg.fetchrow("SELECT * FROM entities WHERE entity_id = 'c-1'")
    assert entity["version"] == 3
    assert orjson.loads(entity["attributes"]) == {"s": 3}
    assert entity["created_at"] == t0
    assert entity["active"] is True

    deact = entity_event(
        publisher, "deactivated", "c-1", 4, occurred_at=t0 + timedelta(seconds=4), reason="churned"
    )
    late_v3b = entity_event(
        publisher, "updated", "c-1", 3, occurred_at=t0 + timedelta(seconds=3), attributes={"s": 99}
    )
    await publisher.publish_events([deact])
    await wait_for(lambda: _version_is(pg, "c-1", 4))
    await publisher.publish_events([late_v3b])
    await wait_for(lambda: _events_stored(pg, 5))
    entity = await pg.fetchrow("SELECT * FROM entities WHERE entity_id = 'c-1'")
    assert entity["version"] == 4
    assert entity["active"] is False
    assert entity["deactivation_reason"] == "churned"
    assert entity["deactivated_at"] == t0 + timedelta(seconds=4)
    assert orjson.loads(entity["attributes"]) == {"s": 3}  # a deactivation keeps attributes
    assert entity["last_event_id"] == _uuid(deact)
    kinds = await pg.fetch(
        "SELECT event_kind, version FROM entity_events WHERE entity_id = 'c-1' ORDER BY version"
    )
    assert [(r["event_kind"], r["version"]) for r in kinds] == [
        ("created", 1),
        ("updated", 2),
        ("updated", 3),
        ("updated", 3),
        ("deactivated", 4),
    ]


async def test_versions_are_folded_within_one_batch(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection
) -> None:
    t0 = datetime(2024, 5, 2, tzinfo=UTC)
    batch = [
        entity_event(publisher, "updated", "b-1", 5, occurred_at=t0, attributes={"s": 5}),
        entity_event(publisher, "created", "b-1", 1, occurred_at=t0, attributes={"s": 1}),
        entity_event(publisher, "deactivated", "b-1", 6, occurred_at=t0, reason="x"),
        entity_event(publisher, "updated", "b-1", 4, occurred_at=t0, attributes={"s": 4}),
        entity_event(publisher, "deactivated", "b-2", 2, occurred_at=t0),
    ]
    await publisher.publish_events(batch)  # published before start: one batch
    await start_service()
    await wait_for(lambda: _events_stored(pg, 5))
    b1 = await pg.fetchrow("SELECT * FROM entities WHERE entity_id = 'b-1'")
    assert (b1["version"], b1["active"], orjson.loads(b1["attributes"])) == (6, False, {"s": 5})
    b2 = await pg.fetchrow("SELECT * FROM entities WHERE entity_id = 'b-2'")
    assert (b2["version"], b2["active"], b2["deactivation_reason"]) == (2, False, None)


async def _version_is(pg: asyncpg.Connection, entity_id: str, version: int) -> bool:
    v = await pg.fetchval("SELECT version FROM entities WHERE entity_id = $1", entity_id)
    return bool(v == version)


async def test_malformed_events_are_dead_lettered_with_a_reason_and_the_rest_stored(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    await start_service()
    good = [entity_event(publisher, "created", f"g-{i}", 1) for i in range(10)]
    bad = [
        publisher.make_event(
            channels.ENTITY_CREATED,
            {
                "entity_type": "order",
                "version": 1,
                "occurred_at": "2024-01-01T00:00:00Z",
                "attributes": {},
            },  # no entity_id
        ),
        publisher.make_event(
            channels.ENTITY_UPDATED,
            {
                "entity_type": "order",
                "entity_id": "x",
                "version": "7",
                "occurred_at": "2024-01-01T00:00:00Z",
                "attributes": {},
            },
        ),
        publisher.make_event(
            channels.ENTITY_CREATED,
            {
                "entity_type": "order",
                "entity_id": "x",
                "version": 1,
                "occurred_at": "yesterday",
                "attributes": {},
            },
        ),
        publisher.make_event(
            channels.ENTITY_CREATED,
            {
                "entity_type": "order",
                "entity_id": "nul",
                "version": 1,
                "occurred_at": "2024-01-01T00:00:00Z",
                "attributes": {"a": "x\u0000y"},
            },
        ),
        Event(
            event_id="not-a-uuid",
            event_type=channels.ENTITY_CREATED,
            source="sim",
            payload={
                "entity_type": "order",
                "entity_id": "x",
                "version": 1,
                "occurred_at": "2024-01-01T00:00:00Z",
                "attributes": {},
            },
        ),
    ]
    mixed = good[:5] + bad + good[5:]
    await publisher.publish_events(mixed)
    await wait_for(lambda: _events_stored(pg, 10))

    async def dead_lettered() -> bool:
        n = 0
        for ch in (channels.ENTITY_CREATED, channels.ENTITY_UPDATED):
            n += await redis.xlen(channels.dead_letter_key(ch))
        return n == 5

    await wait_for(dead_lettered)
    entries = await redis.xrange(channels.dead_letter_key(channels.ENTITY_CREATED))
    reasons = sorted(fields[b"reason"].decode() for _, fields in entries)
    assert any("entity_id" in r for r in reasons)
    assert any("occurred_at" in r for r in reasons)
    assert any("NUL" in r for r in reasons)
    assert any("UUID" in r for r in reasons)
    upd = await redis.xrange(channels.dead_letter_key(channels.ENTITY_UPDATED))
    assert "version" in upd[0][1][b"reason"].decode()
    assert await count(pg, "SELECT count(*) FROM entity_events") == 10


async def test_old_and_future_days_get_their_own_partitions(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection
) -> None:
    await start_service()
    now = datetime.now(UTC)
    days = [now - timedelta(days=30), now - timedelta(days=1), now + timedelta(days=10)]
    await publisher.publish_events(
        [entity_event(publisher, "created", f"p-{i}", 1, occurred_at=d) for i, d in enumerate(days)]
    )
    await wait_for(lambda: _events_stored(pg, 3))
    parts = {
        r["relname"]
        for r in await pg.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'entity_events'::regclass"
        )
    }
    for d in days:
        assert f"entity_events_p{d:%Y%m%d}" in parts
    assert await count(pg, "SELECT count(*) FROM entity_events_default") == 0


async def test_rows_in_the_default_partition_move_when_their_day_gets_a_partition(
    start_service: Start, pg: asyncpg.Connection
) -> None:
    await start_service()
    day = datetime(2031, 3, 4, 5, tzinfo=UTC)  # beyond the on-demand horizon: default partition
    await pg.execute(
        "INSERT INTO entity_events (event_id, event_kind, entity_type, entity_id, version,"
        " occurred_at, published_at, attributes, source)"
        " VALUES (gen_random_uuid(), 'created', 'order', 'd-1', 1, $1, now(), '{}', 't')",
        day,
    )
    assert await count(pg, "SELECT count(*) FROM entity_events_default") == 1
    assert await pg.fetchval("SELECT ae_ensure_entity_events_partition($1)", day.date())
    assert await count(pg, "SELECT count(*) FROM entity_events_default") == 0
    assert await count(pg, "SELECT count(*) FROM entity_events_p20310304") == 1
    assert not await pg.fetchval("SELECT ae_ensure_entity_events_partition($1)", day.date())
