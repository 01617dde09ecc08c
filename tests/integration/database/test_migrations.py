"""Migrations applied over stored data: an upgrade keeps every row and its guarantees."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import CollectorRegistry

from analytics_engine.core.storable import EntityEventRow
from analytics_engine.database import migrate as migrations
from analytics_engine.database.db import create_pool
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.migrate import load_migrations, migrate
from analytics_engine.database.partitions import PartitionManager
from analytics_engine.database.writer import STAGING_SETUP, EntityEventWriter

DAY = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)

INSERT = """
INSERT INTO entity_events (event_id, event_kind, entity_type, entity_id, version, occurred_at,
                           published_at, attributes, source)
SELECT gen_random_uuid(), 'created', (ARRAY['order', 'sensor'])[1 + i % 2], 'e' || i, 1,
       $1::timestamptz - i * interval '1 minute', $1::timestamptz, '{}', 's'
FROM generate_series(1, $2::int) i
"""


async def _migrate_before(
    pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    """The schema as it was before migration `version` (`monkeypatch.undo()` brings the rest
    back for the upgrade under test)."""
    everything = load_migrations()
    monkeypatch.setattr(
        migrations, "load_migrations", lambda: [m for m in everything if m.version < version]
    )
    await migrate(pg, timescale="off")


async def test_the_type_key_migration_keeps_rows_and_still_rejects_a_stored_event(
    pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _migrate_before(pg, monkeypatch, 3)
    await PartitionManager(enabled=True).ensure(
        pg, {(DAY - timedelta(days=d)).date() for d in range(3)}
    )
    await pg.execute(INSERT, DAY, 3000)  # two days of rows, in their day partitions
    before = await pg.fetch("SELECT * FROM entity_events ORDER BY event_id")
    monkeypatch.undo()

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


async def test_attributes_version_is_backfilled_from_each_rows_version(
    pg: asyncpg.Connection, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An active row holds its version's attributes; a deactivated row's version is the
    newest its attributes can be, so an older update arriving after the upgrade leaves them
    (as before), while a newer one sets them."""
    await _migrate_before(pg, monkeypatch, 4)
    await pg.execute(
        "INSERT INTO entities (entity_type, entity_id, version, attributes, active, created_at,"
        " updated_at, last_event_id) VALUES"
        " ('order', 'live', 4, '{\"v\": 4}', true, $1, $1, gen_random_uuid()),"
        " ('order', 'gone', 6, '{\"v\": 2}', false, $1, $1, gen_random_uuid())",
        DAY,
    )
    monkeypatch.undo()

    await migrate(pg, timescale="off")

    rows = await pg.fetch("SELECT entity_id, attributes_version FROM entities ORDER BY 1")
    assert [tuple(r) for r in rows] == [("gone", 6), ("live", 4)]
    pool = await create_pool(database_url, max_size=1, setup_sql=STAGING_SETUP)
    try:
        writer = EntityEventWriter(
            pool, PartitionManager(enabled=True), DatabaseMetrics(CollectorRegistry())
        )
        await writer.write([_update("gone", 5, {"v": 5}), _update("live", 3, {"v": 3})])
        assert await _attributes(pg) == {"gone": (6, {"v": 2}), "live": (4, {"v": 4})}
        await writer.write([_update("gone", 7, {"v": 7}), _update("live", 5, {"v": 5})])
        assert await _attributes(pg) == {"gone": (7, {"v": 7}), "live": (5, {"v": 5})}
    finally:
        await pool.close()


async def test_kpi_result_versions_begin_at_each_versions_earliest_stored_window(
    pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _migrate_before(pg, monkeypatch, 7)
    await pg.execute(
        "INSERT INTO kpi_results (kpi_code, window_start, window_end, dimensions, dims_key,"
        " value, sample_count, definition_version, computed_at)"
        " SELECT 'k', $1::timestamptz + m * interval '1 minute',"
        " $1::timestamptz + (m + 1) * interval '1 minute', '{}', '{}', m, 1, 1 + (m >= 30)::int,"
        " now() FROM generate_series(0, 59) m",
        DAY,
    )
    monkeypatch.undo()

    await migrate(pg, timescale="off")

    rows = await pg.fetch("SELECT * FROM kpi_result_versions ORDER BY definition_version")
    assert [tuple(r) for r in rows] == [("k", 1, DAY), ("k", 2, DAY + timedelta(minutes=30))]


def _update(entity_id: str, version: int, attributes: dict[str, Any]) -> EntityEventRow:
    return EntityEventRow(
        str(uuid.uuid4()),
        "updated",
        "order",
        entity_id,
        version,
        DAY,
        DAY,
        orjson.dumps(attributes).decode(),
        None,
        "s",
    )


async def _attributes(pg: asyncpg.Connection) -> dict[str, tuple[int, Any]]:
    rows = await pg.fetch("SELECT entity_id, attributes_version, attributes FROM entities")
    return {r["entity_id"]: (r["attributes_version"], orjson.loads(r["attributes"])) for r in rows}
