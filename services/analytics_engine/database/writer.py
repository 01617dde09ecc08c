"""Batched writes of entity events and entity state (one transaction per batch).

Events are COPied (binary) straight into `entity_events`: PostgreSQL's bulk insert path, the
cheapest way in. A batch holding an event that is already stored (a redelivery, a publisher's
retry) makes that COPY fail on the primary key `(occurred_at, event_id)`; the batch is then
written again the deduplicating way: COPY into a per-connection temporary staging table, then
`INSERT ... SELECT ... ON CONFLICT DO NOTHING`. Batches known to be redeliveries go that way
directly. Entity state is COPied to a staging table and applied by a version-guarded upsert: a
row changes only for a newer version, so late events never roll state back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Final

import asyncpg

from analytics_engine.database.db import transient_errors
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.model import EntityEventRow, EntityUpsert, plan_entity_upserts
from analytics_engine.database.partitions import PartitionManager

log = logging.getLogger(__name__)

EVENTS_TABLE: Final = "entity_events"
EVENT_STAGE: Final = "ae_stage_events"
ENTITY_STAGE: Final = "ae_stage_entities"

# Run on every writer connection (temporary tables live as long as the connection).
STAGING_SETUP: Final = f"""
CREATE TEMP TABLE IF NOT EXISTS {EVENT_STAGE} (
    event_id uuid, event_kind text, entity_type text, entity_id text, version bigint,
    occurred_at timestamptz, published_at timestamptz, attributes text, reason text, source text
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS {ENTITY_STAGE} (
    step smallint, entity_type text, entity_id text, version bigint, attributes text,
    active boolean, created_at timestamptz, updated_at timestamptz, deactivated_at timestamptz,
    reason text, last_event_id uuid
) ON COMMIT DELETE ROWS;
"""

_EVENT_COLUMNS: Final = (
    "event_id",
    "event_kind",
    "entity_type",
    "entity_id",
    "version",
    "occurred_at",
    "published_at",
    "attributes",
    "reason",
    "source",
)
_ENTITY_COLUMNS: Final = (
    "step",
    "entity_type",
    "entity_id",
    "version",
    "attributes",
    "active",
    "created_at",
    "updated_at",
    "deactivated_at",
    "reason",
    "last_event_id",
)

INSERT_EVENTS: Final = f"""
INSERT INTO entity_events (event_id, event_kind, entity_type, entity_id, version, occurred_at,
                           published_at, attributes, reason, source)
SELECT event_id, event_kind, entity_type, entity_id, version, occurred_at, published_at,
       attributes::jsonb, reason, source
FROM {EVENT_STAGE}
ON CONFLICT DO NOTHING
"""

# "newer": a higher version, or the same version turning a live entity into a deactivated one
# (a deactivation wins a tie).
_NEWER: Final = (
    "(cur.version < EXCLUDED.version OR (cur.version = EXCLUDED.version"
    " AND cur.active AND NOT EXCLUDED.active))"
)

# Rows go in key order so concurrent writers lock them in the same order (no deadlocks).
UPSERT_ENTITIES: Final = f"""
INSERT INTO entities AS cur (entity_type, entity_id, version, attributes, active, created_at,
                             updated_at, deactivated_at, deactivation_reason, last_event_id)
SELECT u.entity_type, u.entity_id, u.version, COALESCE(u.attributes::jsonb, '{{}}'::jsonb),
       u.active, u.created_at, u.updated_at, u.deactivated_at, u.reason, u.last_event_id
FROM {ENTITY_STAGE} u
WHERE u.step = $1
ORDER BY u.entity_type, u.entity_id
ON CONFLICT (entity_type, entity_id) DO UPDATE SET
    version = CASE WHEN {_NEWER} THEN EXCLUDED.version ELSE cur.version END,
    attributes = CASE WHEN {_NEWER} AND EXCLUDED.active THEN EXCLUDED.attributes
                      ELSE cur.attributes END,
    active = CASE WHEN {_NEWER} THEN EXCLUDED.active ELSE cur.active END,
    created_at = LEAST(cur.created_at, EXCLUDED.created_at),
    updated_at = CASE WHEN {_NEWER} THEN EXCLUDED.updated_at ELSE cur.updated_at END,
    deactivated_at = CASE WHEN {_NEWER} THEN EXCLUDED.deactivated_at ELSE cur.deactivated_at END,
    deactivation_reason = CASE WHEN {_NEWER} THEN EXCLUDED.deactivation_reason
                               ELSE cur.deactivation_reason END,
    last_event_id = CASE WHEN {_NEWER} THEN EXCLUDED.last_event_id ELSE cur.last_event_id END
WHERE {_NEWER} OR EXCLUDED.created_at < cur.created_at
"""


_STEP_1: Final = (1,)
_STEP_2: Final = (2,)


def _affected(status: str) -> int:
    """Row count from a command tag like `INSERT 0 42`."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


async def _upsert_entities(conn: Any, first: list[EntityUpsert], second: list[EntityUpsert]) -> int:
    # both steps staged at once, applied in order: step 1 then step 2
    await conn.copy_records_to_table(
        ENTITY_STAGE,
        records=[*(_STEP_1 + u for u in first), *(_STEP_2 + u for u in second)],
        columns=_ENTITY_COLUMNS,
    )
    changed = _affected(await conn.execute(UPSERT_ENTITIES, 1))
    if second:
        changed += _affected(await conn.execute(UPSERT_ENTITIES, 2))
    return changed


class EntityEventWriter:
    """Writes batches through a pool whose connections ran `STAGING_SETUP`."""

    def __init__(self, pool: Any, partitions: PartitionManager, metrics: DatabaseMetrics) -> None:
        self._pool = pool
        self._partitions = partitions
        self._metrics = metrics

    async def write(self, rows: Sequence[EntityEventRow], *, redelivered: bool = False) -> int:
        """Store a batch; returns how many events were new (the rest were duplicates).

        `redelivered`: the batch was delivered before, so some of it may be stored already
        (skip the bulk attempt that would fail on them).
        """
        if not rows:
            return 0
        started = time.perf_counter()
        first, second = plan_entity_upserts(rows)
        with transient_errors("writing entity events"):
            async with self._pool.acquire() as conn:
                await self._partitions.ensure(conn, {r.occurred_at.date() for r in rows})
                written = None if redelivered else await self._write_new(conn, rows, first, second)
                if written is None:
                    written = await self._write_deduplicated(conn, rows, first, second)
        inserted, changed = written
        m = self._metrics
        m.write_seconds.labels("entity_events").observe(time.perf_counter() - started)
        m.batch_size.labels("entity_events").observe(len(rows))
        m.rows_written.labels("entity_events").inc(inserted)
        m.rows_written.labels("entities").inc(changed)
        m.duplicates.labels("entity_events").inc(len(rows) - inserted)
        return inserted

    @staticmethod
    async def _write_new(
        conn: Any,
        rows: Sequence[EntityEventRow],
        first: list[EntityUpsert],
        second: list[EntityUpsert],
    ) -> tuple[int, int] | None:
        """The bulk path: None (and nothing written) if an event of the batch is stored."""
        try:
            async with conn.transaction():
                await conn.copy_records_to_table(EVENTS_TABLE, records=rows, columns=_EVENT_COLUMNS)
                changed = await _upsert_entities(conn, first, second)
        except asyncpg.exceptions.UniqueViolationError:
            log.info("batch holds stored events, deduplicating", extra={"count": len(rows)})
            return None
        return len(rows), changed

    @staticmethod
    async def _write_deduplicated(
        conn: Any,
        rows: Sequence[EntityEventRow],
        first: list[EntityUpsert],
        second: list[EntityUpsert],
    ) -> tuple[int, int]:
        async with conn.transaction():
            await conn.copy_records_to_table(EVENT_STAGE, records=rows, columns=_EVENT_COLUMNS)
            inserted = _affected(await conn.execute(INSERT_EVENTS))
            changed = await _upsert_entities(conn, first, second)
        return inserted, changed
