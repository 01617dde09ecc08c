"""A query KPI with `bind_window` runs through the real database service with its slot bound
as `$len(params)+1`, `$len(params)+2`: each slot's result counts exactly that slot's events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
from redis.asyncio import Redis

from analytics_engine.calculation.queries import QueryRunner
from analytics_engine.core.bus import EventPublisher
from analytics_engine.core.request_reply import RequestReplyClient
from analytics_engine.database.roles import ensure_reader_role
from analytics_engine.kpi import KPIResult, VersionedKPIDefinition
from analytics_engine.kpi.windows import from_micros, to_micros

from .conftest import Start, count, entity_event, wait_for

SLOT = timedelta(seconds=60)
US = timedelta(microseconds=1)

ORDERS_PER_SLOT = VersionedKPIDefinition.model_validate(
    {
        "code": "orders_per_slot",
        "display_name": "Orders per slot",
        "entity_type": "order",
        "query": {
            "sql": "SELECT count(*) FROM entity_events"
            " WHERE entity_type = $1 AND occurred_at >= $2 AND occurred_at < $3",
            "params": ["order"],
            "schedule": "60s",
            "bind_window": True,
        },
        "version": 1,
    }
)


async def test_each_slot_counts_exactly_its_own_events(
    start_service: Start,
    database_url: str,
    publisher: EventPublisher,
    pg: asyncpg.Connection,
    redis: Redis,
) -> None:
    reader_url = await ensure_reader_role(database_url, password="reader-test-pw")
    await start_service(database_readonly_url=reader_url)
    now = datetime.now(UTC)
    # three consecutive slots ending well before now: [s0, s1), [s1, s2), [s2, s3)
    s3 = from_micros(to_micros(now) - to_micros(now) % to_micros(SLOT)) - 5 * SLOT
    s0, s1, s2 = s3 - 3 * SLOT, s3 - 2 * SLOT, s3 - SLOT
    stamps = [
        s0 - US,  # before every slot
        s0,  # first instant of slot 0
        s0 + timedelta(seconds=10),
        s1 - US,  # last instant of slot 0
        s1,  # slot 1 starts where slot 0 ends: counted once, in slot 1
        *(s1 + timedelta(seconds=i) for i in range(1, 8)),
        s3 - US,  # last instant of slot 2 (slot 2 otherwise empty of orders)
        s3,  # after every slot
        s3 + timedelta(seconds=30),
    ]
    events = [
        entity_event(publisher, "created", f"o-{i}", 1, occurred_at=at)
        for i, at in enumerate(stamps)
    ]
    # another entity type inside the slots: not an order, excluded by $1
    events += [
        entity_event(publisher, "created", f"s-{i}", 1, entity_type="sensor", occurred_at=at)
        for i, at in enumerate((s0 + US, s1 + US, s2 + US))
    ]
    await publisher.publish_events(events)

    async def stored() -> bool:
        return await count(pg, "SELECT count(*) FROM entity_events") == len(events)

    await wait_for(stored)

    results: list[KPIResult] = []

    async def collect(batch: list[KPIResult]) -> None:
        results.extend(batch)

    client = RequestReplyClient(redis, service="calculation_engine", instance="c1")
    try:
        runner = QueryRunner(
            lambda: client,
            on_results=collect,
            redis=redis,
            key="ae:calc:test.query_slots",
            timeout_s=15,
        )
        for start in (s0, s1, s2):
            await runner.run_slot(ORDERS_PER_SLOT, to_micros(start), to_micros(start + SLOT))
    finally:
        await client.close()

    assert [(r.window_start, r.window_end) for r in results] == [(s0, s1), (s1, s2), (s2, s3)]
    assert [r.value for r in results] == [3.0, 8.0, 1.0]
    for r in results:  # the same count, straight from the table
        assert r.value == await count(
            pg,
            "SELECT count(*) FROM entity_events"
            " WHERE entity_type = 'order' AND occurred_at >= $1 AND occurred_at < $2",
            r.window_start,
            r.window_end,
        )
        assert r.kpi_code == "orders_per_slot" and r.definition_version == 1
        assert r.sample_count == 1
