"""`metadata.changed` events: one per committed change, published through the outbox, also
after a crash between the commit and the publish."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from metadata_helpers import MetadataHarness, changed_events, revenue_kpi
from redis.asyncio import Redis

from analytics_engine.core.channels import METADATA_CHANGED, stream_key
from analytics_engine.core.envelopes import Event
from analytics_engine.metadata.seeding import BUILTIN_ENTITY_TYPES
from analytics_engine.metadata.service import Settings
from analytics_engine.metadata.store import MetadataStore
from analytics_engine.metadata.validation import parse_kpi

pytestmark = pytest.mark.asyncio

KPIS = "/api/v1/kpi-definitions"


def payloads(events: list[Event]) -> list[dict[str, Any]]:
    return [e.payload for e in events]


async def test_create_update_delete_publish_events(metadata: MetadataHarness, redis: Redis) -> None:
    seeded = await changed_events(redis, 2)
    assert payloads(seeded) == [
        {"kind": "entity_type", "code": "order", "action": "upserted", "version": 1},
        {"kind": "entity_type", "code": "sensor", "action": "upserted", "version": 1},
    ]
    await metadata.call("PUT", f"{KPIS}/orders_revenue", revenue_kpi())
    await metadata.call("PUT", f"{KPIS}/orders_revenue", revenue_kpi())  # identical: no event
    await metadata.call("PUT", f"{KPIS}/orders_revenue", revenue_kpi(unit="USD"))
    await metadata.call("DELETE", f"{KPIS}/orders_revenue")
    status, _, _ = await metadata.call(
        "PUT", f"{KPIS}/orders_revenue", revenue_kpi(field="region")
    )  # invalid: no event
    assert status == 422

    events = await changed_events(redis, 5)
    assert payloads(events[2:]) == [
        {"kind": "kpi_definition", "code": "orders_revenue", "action": "upserted", "version": 1},
        {"kind": "kpi_definition", "code": "orders_revenue", "action": "upserted", "version": 2},
        {"kind": "kpi_definition", "code": "orders_revenue", "action": "deleted", "version": 3},
    ]
    assert all(e.event_type == METADATA_CHANGED for e in events)
    assert all(e.source == "metadata_service" for e in events)
    assert len({e.event_id for e in events}) == len(events)
    # Nothing left behind in the outbox.
    assert await metadata.service.relay.drain() == 0


async def test_outbox_publishes_after_a_crash_between_commit_and_publish(
    metadata_settings: Callable[..., Settings],
    start_metadata: Callable[[Settings], Awaitable[MetadataHarness]],
    database_url: str,
    redis: Redis,
) -> None:
    # A process that commits and then dies before its relay ran: the store alone, no relay.
    crashed = MetadataStore(database_url)
    await crashed.open()
    await crashed.migrate()
    await crashed.ensure_entity_type(BUILTIN_ENTITY_TYPES[0])
    await crashed.put_kpi(parse_kpi(revenue_kpi()))
    await crashed.close()
    assert await redis.xlen(stream_key(METADATA_CHANGED)) == 0

    # The next process (or another replica) publishes what is in the outbox.
    await start_metadata(metadata_settings())
    events = await changed_events(redis, 3)
    assert payloads(events)[:2] == [
        {"kind": "entity_type", "code": "order", "action": "upserted", "version": 1},
        {"kind": "kpi_definition", "code": "orders_revenue", "action": "upserted", "version": 1},
    ]
    # ...then its own seeding of the missing built-in `sensor`.
    assert payloads(events)[2]["code"] == "sensor"
