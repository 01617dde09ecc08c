"""Day partitions on a real PostgreSQL: writers racing to create the same day's partition, and
the retention's drop of emptied ones racing writers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from analytics_engine.database.migrate import migrate
from analytics_engine.database.partitions import PartitionManager

from .conftest import count


@pytest.fixture
async def migrated(database_url: str) -> AsyncIterator[str]:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, timescale="off")
    finally:
        await conn.close()
    yield database_url


async def test_a_writer_losing_the_race_for_a_new_days_partition_still_succeeds(
    migrated: str,
) -> None:
    """The service's writers (`DATABASE_WRITERS`) create a missing day's partition on demand,
    each on its own connection. The one that waited for the other's creation must find the
    partition there, not fail its batch (which would then be retried event by event)."""
    day = (datetime.now(UTC) + timedelta(days=40)).date()  # not created ahead
    first, second = await asyncpg.connect(migrated), await asyncpg.connect(migrated)
    try:
        async with first.transaction():  # holds the creation open while `second` asks
            assert await first.fetchval("SELECT ae_ensure_entity_events_partition($1)", day)
            racing = asyncio.create_task(PartitionManager(enabled=True).ensure(second, [day]))
            await asyncio.sleep(0.3)  # `second` waits on the creation lock meanwhile
            assert not racing.done()
        await asyncio.wait_for(racing, timeout=10)
        # ... and remembers it: no further call to PostgreSQL for that day
        manager = PartitionManager(enabled=True)
        await manager.ensure(second, [day])
        await second.close()
        await manager.ensure(second, [day])  # a closed connection: would raise if used
        name = f"entity_events_p{day:%Y%m%d}"
        assert await count(first, f"SELECT count(*) FROM pg_class WHERE relname = '{name}'") == 1
    finally:
        await first.close()
        await second.close()


LATE_EVENT = """
INSERT INTO entity_events (event_id, event_kind, entity_type, entity_id, version, occurred_at,
                           published_at, attributes, source)
VALUES (gen_random_uuid(), 'created', 'order', 'late', 1, '2024-01-10T05:00Z', now(), '{}', 's')
"""
DROP_EMPTY = "SELECT ae_drop_empty_entity_events_partitions(now())"
OLD_DAY = date(2024, 1, 10)


async def test_a_partition_a_writer_is_inserting_into_is_not_dropped(migrated: str) -> None:
    """A writer's batch transaction has inserted a late event into an old, otherwise empty day
    and not committed yet. The retention's drop used to find the partition empty (its snapshot
    does not see the row), wait for the writer's lock, then drop the row the writer committed
    and acknowledged. Now it gives up after its short lock wait and the row stays."""
    writer, retention = await asyncpg.connect(migrated), await asyncpg.connect(migrated)
    try:
        await retention.execute("SELECT ae_ensure_entity_events_partition($1)", OLD_DAY)
        async with writer.transaction():
            await writer.execute(LATE_EVENT)
            dropping = asyncio.create_task(retention.fetchval(DROP_EMPTY))
            await asyncio.sleep(1)
            gave_up = dropping.done()  # without waiting for the writer's commit
        assert (
            await count(writer, "SELECT count(*) FROM entity_events WHERE entity_id = 'late'") == 1
        )
        assert await asyncio.wait_for(dropping, timeout=10) == 0
        assert gave_up
    finally:
        await writer.close()
        await retention.close()


async def test_a_writer_waits_for_a_drop_under_way_and_its_event_is_kept(migrated: str) -> None:
    """The other order: the drop holds its locks (until its transaction ends) when a writer
    inserts into that day. The writer waits, then finds the partition gone and the row goes to
    the default partition."""
    writer, retention = await asyncpg.connect(migrated), await asyncpg.connect(migrated)
    try:
        await retention.execute("SELECT ae_ensure_entity_events_partition($1)", OLD_DAY)
        async with retention.transaction():
            assert await retention.fetchval(DROP_EMPTY) == 1
            inserting = asyncio.create_task(writer.execute(LATE_EVENT))
            await asyncio.sleep(0.3)
            assert not inserting.done()
        await asyncio.wait_for(inserting, timeout=10)
        assert await count(writer, "SELECT count(*) FROM entity_events_default") == 1
        assert await retention.fetchval("SELECT to_regclass('entity_events_p20240110')") is None
    finally:
        await writer.close()
        await retention.close()


async def test_a_drop_skips_a_partition_in_use_and_needs_read_committed(migrated: str) -> None:
    reader, retention = await asyncpg.connect(migrated), await asyncpg.connect(migrated)
    try:
        await retention.execute("SELECT ae_ensure_entity_events_partition($1)", OLD_DAY)
        async with reader.transaction():  # reads the partition itself, not through the parent
            await reader.fetch("SELECT * FROM entity_events_p20240110")
            dropping = asyncio.create_task(retention.fetchval(DROP_EMPTY))
            await asyncio.sleep(1)
            gave_up = dropping.done()
        assert await asyncio.wait_for(dropping, timeout=10) == 0
        assert gave_up
        async with retention.transaction(isolation="repeatable_read"):
            with pytest.raises(asyncpg.RaiseError, match="READ COMMITTED"):
                await retention.fetchval(DROP_EMPTY)
        assert await retention.fetchval(DROP_EMPTY) == 1
    finally:
        await reader.close()
        await retention.close()
