"""PartitionManager on a real PostgreSQL: writers racing to create the same day's partition."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

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
