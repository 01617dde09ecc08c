"""The store and its migrations directly against PostgreSQL: concurrent migrations, concurrent
writers, and the outbox rows every change leaves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import asyncpg  # type: ignore[import-untyped]
import pytest
from metadata_helpers import revenue_kpi

from analytics_engine.metadata.errors import BadInput, PreconditionFailed
from analytics_engine.metadata.migrate import MIGRATIONS_TABLE, packaged_migrations
from analytics_engine.metadata.preconditions import Precondition
from analytics_engine.metadata.seeding import BUILTIN_ENTITY_TYPES
from analytics_engine.metadata.store import KPI, MetadataStore, OutboxEntry
from analytics_engine.metadata.validation import parse_kpi

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[MetadataStore]:
    s = MetadataStore(database_url)
    await s.open()
    yield s
    await s.close()


async def test_concurrent_migrations_apply_once(database_url: str) -> None:
    stores = [MetadataStore(database_url) for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        applied = await asyncio.gather(*(s.migrate() for s in stores))
        assert sorted(len(a) for a in applied) == [0, 0, 0, len(packaged_migrations())]
        assert await stores[0].migrate() == []
    finally:
        for s in stores:
            await s.close()
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(f"SELECT version, name FROM {MIGRATIONS_TABLE} ORDER BY version")
        assert [(r["version"], r["name"]) for r in rows] == [(1, "initial"), (2, "seeded_kpis")]
    finally:
        await conn.close()


async def test_concurrent_writers_get_distinct_versions(store: MetadataStore) -> None:
    await store.migrate()
    await store.ensure_entity_type(BUILTIN_ENTITY_TYPES[0])
    kpis = [parse_kpi(revenue_kpi(unit=f"U{i}")) for i in range(10)]
    results = await asyncio.gather(*(store.put_kpi(k) for k in kpis))
    assert sorted(r.stored.version for r in results) == list(range(1, 11))
    assert sum(r.created for r in results) == 1
    history = await store.history(KPI, "orders_revenue")
    assert [h.version for h in history] == list(range(1, 11))

    # Two writers with the same If-Match: exactly one wins.
    current = await store.get(KPI, "orders_revenue")
    assert current is not None
    condition = Precondition(match=frozenset({current.version}))
    outcomes = await asyncio.gather(
        store.put_kpi(parse_kpi(revenue_kpi(unit="A")), condition),
        store.put_kpi(parse_kpi(revenue_kpi(unit="B")), condition),
        return_exceptions=True,
    )
    assert sum(isinstance(o, PreconditionFailed) for o in outcomes) == 1


async def test_every_change_leaves_one_outbox_row(store: MetadataStore, database_url: str) -> None:
    await store.migrate()
    await store.ensure_entity_type(BUILTIN_ENTITY_TYPES[0])
    await store.ensure_entity_type(BUILTIN_ENTITY_TYPES[0])  # exists: no change
    await store.put_kpi(parse_kpi(revenue_kpi()))
    await store.put_kpi(parse_kpi(revenue_kpi()))  # identical: no change
    await store.delete(KPI, "orders_revenue")
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT payload::text AS p FROM metadata_outbox ORDER BY id")
    finally:
        await conn.close()
    assert len(rows) == 3
    assert all('"action"' in r["p"] for r in rows)


async def test_nul_reaching_the_store_is_bad_input_not_a_crash(store: MetadataStore) -> None:
    """Callers other than the HTTP API (request/reply lookups) meet the store's own mapping:
    a client error (`bad_request` on the bus), never an unexpected exception."""
    await store.migrate()
    with pytest.raises(BadInput) as caught:
        await store.get(KPI, "orders\x00revenue")
    assert caught.value.code == "bad_request"
    with pytest.raises(BadInput):
        await store.list_all(KPI, entity_type="order\x00")


async def test_replicas_draining_at_once_publish_a_codes_changes_in_commit_order(
    store: MetadataStore, database_url: str
) -> None:
    """Two replicas' relays draining at the same time. With SKIP LOCKED each took the rows the
    other had not locked, so a later change could be published before an earlier one of the
    same code: `deleted` after the re-creation's `upserted` made the calculation engine drop a
    live KPI (it drops on `deleted` without looking at versions) until its next resync."""
    await store.migrate()
    await store.ensure_entity_type(BUILTIN_ENTITY_TYPES[0])
    await store.put_kpi(parse_kpi(revenue_kpi()))
    await store.delete(KPI, "orders_revenue")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DELETE FROM metadata_outbox")  # start from the deletion's successor
    finally:
        await conn.close()
    other = MetadataStore(database_url)
    await other.open()
    await other.migrate()
    published: list[tuple[str, int]] = []
    in_publish = asyncio.Event()
    release = asyncio.Event()

    async def slow(entries: Sequence[OutboxEntry]) -> None:
        in_publish.set()
        await release.wait()
        published.extend((e.payload["action"], e.payload["version"]) for e in entries)

    async def fast(entries: Sequence[OutboxEntry]) -> None:
        published.extend((e.payload["action"], e.payload["version"]) for e in entries)

    try:
        await store.put_kpi(parse_kpi(revenue_kpi()))  # version 3, re-created
        first = asyncio.create_task(store.drain_outbox(slow))
        await asyncio.wait_for(in_publish.wait(), 5)
        await store.delete(KPI, "orders_revenue")  # version 4, committed while 3 is in flight
        assert await other.drain_outbox(fast) == 0  # waited for the lock, then left it
        assert published == []
        second = asyncio.create_task(other.drain_outbox(fast))
        await asyncio.sleep(0.3)
        release.set()
        await first
        await second
        while await other.drain_outbox(fast) or await store.drain_outbox(fast):
            pass
    finally:
        release.set()
        await other.close()
    assert published == [("upserted", 3), ("deleted", 4)]
