"""Migrations applied over stored data: an upgrade keeps every row and its guarantees."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from analytics_engine.database import migrate as migrations
from analytics_engine.database.migrate import load_migrations, migrate
from analytics_engine.database.partitions import PartitionManager

DAY = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)

INSERT = """
INSERT INTO entity_events (event_id, event_kind, entity_type, entity_id, version, occurred_at,
                           published_at, attributes, source)
SELECT gen_random_uuid(), 'created', (ARRAY['order', 'sensor'])[1 + i % 2], 'e' || i, 1,
       $1::timestamptz - i * interval '1 minute', $1::timestamptz, '{}', 's'
FROM generate_series(1, $2::int) i
"""


async def test_the_type_key_migration_keeps_rows_and_still_rejects_a_stored_event(
    pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    everything = load_migrations()
    monkeypatch.setattr(
        migrations, "load_migrations", lambda: [m for m in everything if m.version < 3]
    )
    await migrate(pg, timescale="off")
    await PartitionManager(enabled=True).ensure(
        pg, {(DAY - timedelta(days=d)).date() for d in range(3)}
    )
    await pg.execute(INSERT, DAY, 3000)  # two days of rows, in their day partitions
    before = await pg.fetch("SELECT * FROM entity_events ORDER BY event_id")
    monkeypatch.setattr(migrations, "load_migrations", lambda: everything)

    await migrate(pg, timescale="off")

    assert await pg.fetch("SELECT * FROM entity_events ORDER BY event_id") == before
    key = await pg.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'entity_events'::regclass AND contype = 'p'"
    )
    assert key == "PRIMARY KEY (entity_type, occurred_at, event_id)"
    stored = before[0]
    with pytest.raises(asyncpg.UniqueViolationError):
        await pg.execute(
            "INSERT INTO entity_events SELECT * FROM entity_events WHERE event_id = $1",
            stored["event_id"],
        )
    # a day's partition created after the migration gets the key too
    later = DAY + timedelta(days=5)
    await PartitionManager(enabled=True).ensure(pg, {later.date()})
    await pg.execute(INSERT, later, 1)
    with pytest.raises(asyncpg.UniqueViolationError):
        await pg.execute(
            "INSERT INTO entity_events SELECT * FROM entity_events WHERE occurred_at >= $1",
            later - timedelta(hours=1),
        )
