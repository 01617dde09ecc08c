"""Batched writes of entity events and entity state: one transaction, one COPY per batch.

The batch is COPied (binary) into a per-connection temporary staging table, numbered in
delivery order. From there, in the same transaction:

- events go into `entity_events` with a plain `INSERT ... SELECT`. A batch holding an event
  that is already stored (a redelivery, a publisher's retry) fails that statement on the primary
  key `(occurred_at, event_id)`; it is rolled back to a savepoint and redone with
  `ON CONFLICT DO NOTHING`, which skips the stored ones. Batches known to be redeliveries take
  that way at once. (Conflict handling costs on every row, so only batches that need it pay.)
- entity state is folded per entity in SQL (`FOLD_ENTITIES`, the same rule as the pure
  `model.plan_entity_upserts`) and applied by a version-guarded upsert: a row changes only for a
  newer version, so late events never roll state back.

Doing the fold in PostgreSQL rather than in Python sends every event once and keeps the
service's single Python thread, the drain's bottleneck, free for parsing.

Timestamps cross as integer microseconds since the Unix epoch (`epoch_microseconds`), turned
back into `timestamptz` by generated staging columns: asyncpg's `datetime` encoder costs the
Python thread about twice as much as the integer arithmetic, and the conversion is exact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg

from analytics_engine.database.db import transient_errors
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.model import EntityEventRow
from analytics_engine.database.partitions import PartitionManager

log = logging.getLogger(__name__)

EVENT_STAGE: Final = "ae_stage_events"
ENTITY_STAGE: Final = "ae_stage_entities"

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_DAY_US: Final = 86_400_000_000


def epoch_microseconds(moment: datetime) -> int:
    """Microseconds since 1970-01-01 UTC of an aware datetime (exact integer arithmetic)."""
    return (moment - _EPOCH) // _MICROSECOND


def _timestamptz(us_column: str) -> str:
    """SQL turning integer microseconds since the epoch back into a `timestamptz`, exactly and
    whatever the session's time zone: whole days and the remainder stay integral (and far
    below 2**53) through `interval` multiplication, and the arithmetic is done on `timestamp`."""
    return (
        f"(TIMESTAMP '1970-01-01' + ({us_column} / {_DAY_US}) * INTERVAL '1 day'"
        f" + ({us_column} % {_DAY_US}) * INTERVAL '1 microsecond') AT TIME ZONE 'UTC'"
    )


# Run on every writer connection (temporary tables live as long as the connection). `seq` is
# the position in the batch: ties between events of one entity go to the earlier one.
STAGING_SETUP: Final = f"""
CREATE TEMP TABLE IF NOT EXISTS {EVENT_STAGE} (
    event_id uuid, event_kind text, entity_type text, entity_id text, version bigint,
    occurred_us bigint, published_us bigint,
    occurred_at timestamptz GENERATED ALWAYS AS ({_timestamptz("occurred_us")}) STORED,
    published_at timestamptz GENERATED ALWAYS AS ({_timestamptz("published_us")}) STORED,
    attributes jsonb, reason text, source text, seq integer
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS {ENTITY_STAGE} (
    step smallint, entity_type text, entity_id text, version bigint, attributes jsonb,
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
# What the batch COPY sends: the event columns with the timestamps as epoch microseconds.
_STAGE_COLUMNS: Final = (
    *_EVENT_COLUMNS[:5],
    "occurred_us",
    "published_us",
    *_EVENT_COLUMNS[7:],
    "seq",
)
_COLUMN_LIST: Final = ", ".join(_EVENT_COLUMNS)

INSERT_NEW_EVENTS: Final = f"""
INSERT INTO entity_events ({_COLUMN_LIST})
SELECT {_COLUMN_LIST} FROM {EVENT_STAGE}
"""
INSERT_EVENTS: Final = f"{INSERT_NEW_EVENTS}ON CONFLICT DO NOTHING\n"

# Per entity: the newest attribute-carrying event (step 1) and the newest deactivation, as a
# second step when it is at least as new (or as step 1 for an entity with only deactivations);
# `created_at` is the earliest `occurred_at` of the entity in the batch. One sort serves both
# windows and leaves the rows in key order, the order the upsert takes them in (so concurrent
# writers lock entities in the same order). `model.plan_entity_upserts` is the same rule in
# Python; the integration tests check the two agree.
FOLD_ENTITIES: Final = f"""
INSERT INTO {ENTITY_STAGE} (step, entity_type, entity_id, version, attributes, active,
                            created_at, updated_at, deactivated_at, reason, last_event_id)
SELECT CASE WHEN deactivation AND attributes_version IS NOT NULL THEN 2 ELSE 1 END,
       entity_type, entity_id, version, attributes, NOT deactivation, first_seen, occurred_at,
       CASE WHEN deactivation THEN occurred_at END, CASE WHEN deactivation THEN reason END,
       event_id
FROM (
    SELECT s.entity_type, s.entity_id, s.version, s.attributes, s.occurred_at, s.reason,
           s.event_id, s.event_kind = 'deactivated' AS deactivation,
           min(s.occurred_at) OVER per_entity AS first_seen,
           max(s.version) FILTER (WHERE s.event_kind <> 'deactivated') OVER per_entity
               AS attributes_version,
           row_number() OVER per_kind AS newest
    FROM {EVENT_STAGE} s
    WINDOW per_entity AS (PARTITION BY s.entity_type, s.entity_id),
           per_kind AS (PARTITION BY s.entity_type, s.entity_id, s.event_kind = 'deactivated'
                        ORDER BY s.version DESC, s.seq)
) folded
WHERE newest = 1
  AND (NOT deactivation OR attributes_version IS NULL OR version >= attributes_version)
ORDER BY entity_type, entity_id
"""

# "newer": a higher version, or the same version turning a live entity into a deactivated one
# (a deactivation wins a tie).
_NEWER: Final = (
    "(cur.version < EXCLUDED.version OR (cur.version = EXCLUDED.version"
    " AND cur.active AND NOT EXCLUDED.active))"
)

# Rows are read in the order `FOLD_ENTITIES` wrote them, key order, so concurrent writers lock
# them in the same order (a deadlock would still only cost a retry: it is a transient error).
UPSERT_ENTITIES: Final = f"""
INSERT INTO entities AS cur (entity_type, entity_id, version, attributes, active, created_at,
                             updated_at, deactivated_at, deactivation_reason, last_event_id)
SELECT u.entity_type, u.entity_id, u.version, COALESCE(u.attributes, '{{}}'::jsonb),
       u.active, u.created_at, u.updated_at, u.deactivated_at, u.reason, u.last_event_id
FROM {ENTITY_STAGE} u
WHERE u.step = $1
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


def stage_records(rows: Sequence[EntityEventRow]) -> list[tuple[Any, ...]]:
    """The batch as COPY records for `_STAGE_COLUMNS` (positional: this runs per event).

    Consecutive events often share a timestamp (a publisher stamps a whole batch with one
    `published_at`), so each conversion is reused while the value repeats. Equal aware
    datetimes are the same instant unless they differ only by `fold` (same zone, ambiguous wall
    time), hence the `fold` check.
    """
    us = epoch_microseconds
    records: list[tuple[Any, ...]] = []
    append = records.append
    occurred: Any = None
    published: Any = None
    occurred_us = published_us = 0
    for seq, r in enumerate(rows):
        if r[5] != occurred or r[5].fold != occurred.fold:
            occurred = r[5]
            occurred_us = us(occurred)
        if r[6] != published or r[6].fold != published.fold:
            published = r[6]
            published_us = us(published)
        append((r[0], r[1], r[2], r[3], r[4], occurred_us, published_us, r[7], r[8], r[9], seq))
    return records


def _affected(status: str) -> int:
    """Row count from a command tag like `INSERT 0 42`."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


async def _insert_events(conn: Any, count: int, *, redelivered: bool) -> int:
    """Move the staged events into `entity_events`; returns how many were new."""
    if not redelivered:
        try:
            async with conn.transaction():  # a savepoint: a stored event undoes only this
                await conn.execute(INSERT_NEW_EVENTS)
            return count
        except asyncpg.exceptions.UniqueViolationError:
            log.info("batch holds stored events, deduplicating", extra={"count": count})
    return _affected(await conn.execute(INSERT_EVENTS))


class EntityEventWriter:
    """Writes batches through a pool whose connections ran `STAGING_SETUP`."""

    def __init__(self, pool: Any, partitions: PartitionManager, metrics: DatabaseMetrics) -> None:
        self._pool = pool
        self._partitions = partitions
        self._metrics = metrics

    async def write(self, rows: Sequence[EntityEventRow], *, redelivered: bool = False) -> int:
        """Store a batch; returns how many events were new (the rest were duplicates).

        `redelivered`: the batch was delivered before, so some of it may be stored already.
        """
        if not rows:
            return 0
        started = time.perf_counter()
        records = stage_records(rows)
        with transient_errors("writing entity events"):
            async with self._pool.acquire() as conn:
                await self._partitions.ensure(conn, {r.occurred_at.date() for r in rows})
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        EVENT_STAGE, records=records, columns=_STAGE_COLUMNS
                    )
                    inserted = await _insert_events(conn, len(rows), redelivered=redelivered)
                    await conn.execute(FOLD_ENTITIES)
                    changed = _affected(await conn.execute(UPSERT_ENTITIES, 1))
                    changed += _affected(await conn.execute(UPSERT_ENTITIES, 2))
        m = self._metrics
        m.write_seconds.labels("entity_events").observe(time.perf_counter() - started)
        m.batch_size.labels("entity_events").observe(len(rows))
        m.rows_written.labels("entity_events").inc(inserted)
        m.rows_written.labels("entities").inc(changed)
        m.duplicates.labels("entity_events").inc(len(rows) - inserted)
        return inserted
