"""Batched writes of entity events and entity state: one transaction, one COPY per batch.

The batch is COPied (binary) into a per-connection temporary staging table. From there, in the
same transaction:

- events go into `entity_events` with a plain `INSERT ... SELECT`. A batch holding an event
  that is already stored (a redelivery, a publisher's retry) fails that statement on the primary
  key; it is rolled back to a savepoint and redone with `ON CONFLICT DO NOTHING`, which skips
  the stored ones. Batches known to be redeliveries take that way at once. (Conflict handling
  costs on every row, so only batches that need it pay.)
- entity state: the batch is folded per entity in Python (`model.fold_entity_events`) and each
  staged event carries its step (1, 2, or none) and its entity's first `occurred_at`; a
  version-guarded upsert per step applies the marked events. The row's status (version,
  active, deactivation) follows its newest event; its attributes follow its newest
  created/updated event (`attributes_version`), which may be older than a deactivation that
  committed first. So `entities` is what applying every stored event in version order gives,
  whatever order writers commit in, and late events never roll state back.

The fold costs the service's Python one dictionary pass; done in SQL (window functions over a
sort of the batch) it cost PostgreSQL, the drain's busiest process, about twice as much.

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

from analytics_engine.core.storable import EntityEventRow
from analytics_engine.database.db import transient_errors
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.model import fold_entity_events
from analytics_engine.database.partitions import PartitionManager

log = logging.getLogger(__name__)

EVENT_STAGE: Final = "ae_stage_events"

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


# Run on every writer connection (temporary tables live as long as the connection).
# `fold_step`/`first_seen_us`: the event's part in its entity's state (`fold_entity_events`).
STAGING_SETUP: Final = f"""
CREATE TEMP TABLE IF NOT EXISTS {EVENT_STAGE} (
    event_id uuid, event_kind text, entity_type text, entity_id text, version bigint,
    occurred_us bigint, published_us bigint,
    occurred_at timestamptz GENERATED ALWAYS AS ({_timestamptz("occurred_us")}) STORED,
    published_at timestamptz GENERATED ALWAYS AS ({_timestamptz("published_us")}) STORED,
    attributes jsonb, reason text, source text, fold_step smallint, first_seen_us bigint
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
    "fold_step",
    "first_seen_us",
)
_COLUMN_LIST: Final = ", ".join(_EVENT_COLUMNS)

INSERT_NEW_EVENTS: Final = f"""
INSERT INTO entity_events ({_COLUMN_LIST})
SELECT {_COLUMN_LIST} FROM {EVENT_STAGE}
"""
INSERT_EVENTS: Final = f"{INSERT_NEW_EVENTS}ON CONFLICT DO NOTHING\n"

# "newer" (for the row's status): a higher version, or the same version turning a live entity
# into a deactivated one (a deactivation wins a tie).
_NEWER: Final = (
    "(cur.version < EXCLUDED.version OR (cur.version = EXCLUDED.version"
    " AND cur.active AND NOT EXCLUDED.active))"
)
# Attributes: a created/updated event newer than the ones held, even if older than the row (a
# deactivation of a higher version committed first). Deactivations stage -1: never newer.
_NEWER_ATTRIBUTES: Final = "cur.attributes_version < EXCLUDED.attributes_version"

# The marked events of one step, in key order so concurrent writers lock entities in the same
# order (a deadlock would still only cost a retry: it is a transient error).
UPSERT_ENTITIES: Final = f"""
INSERT INTO entities AS cur (entity_type, entity_id, version, attributes, attributes_version,
                             active, created_at, updated_at, deactivated_at, deactivation_reason,
                             last_event_id)
SELECT u.entity_type, u.entity_id, u.version, COALESCE(u.attributes, '{{}}'::jsonb),
       CASE WHEN u.event_kind = 'deactivated' THEN -1 ELSE u.version END,
       u.event_kind <> 'deactivated', {_timestamptz("u.first_seen_us")}, u.occurred_at,
       CASE WHEN u.event_kind = 'deactivated' THEN u.occurred_at END,
       CASE WHEN u.event_kind = 'deactivated' THEN u.reason END, u.event_id
FROM {EVENT_STAGE} u
WHERE u.fold_step = $1
ORDER BY u.entity_type, u.entity_id
ON CONFLICT (entity_type, entity_id) DO UPDATE SET
    version = CASE WHEN {_NEWER} THEN EXCLUDED.version ELSE cur.version END,
    attributes = CASE WHEN {_NEWER_ATTRIBUTES} THEN EXCLUDED.attributes ELSE cur.attributes END,
    attributes_version = GREATEST(cur.attributes_version, EXCLUDED.attributes_version),
    active = CASE WHEN {_NEWER} THEN EXCLUDED.active ELSE cur.active END,
    created_at = LEAST(cur.created_at, EXCLUDED.created_at),
    updated_at = CASE WHEN {_NEWER} THEN EXCLUDED.updated_at ELSE cur.updated_at END,
    deactivated_at = CASE WHEN {_NEWER} THEN EXCLUDED.deactivated_at ELSE cur.deactivated_at END,
    deactivation_reason = CASE WHEN {_NEWER} THEN EXCLUDED.deactivation_reason
                               ELSE cur.deactivation_reason END,
    last_event_id = CASE WHEN {_NEWER} THEN EXCLUDED.last_event_id ELSE cur.last_event_id END
WHERE {_NEWER} OR {_NEWER_ATTRIBUTES} OR EXCLUDED.created_at < cur.created_at
"""


def stage_records(rows: Sequence[EntityEventRow]) -> tuple[list[tuple[Any, ...]], bool]:
    """The batch as COPY records for `_STAGE_COLUMNS` (positional: this runs per event), and
    whether any event is marked for the second upsert step.

    Consecutive events often share a timestamp (a publisher stamps a whole batch with one
    `published_at`), so each conversion is reused while the value repeats. Equal aware
    datetimes are the same instant unless they differ only by `fold` (same zone, ambiguous wall
    time), hence the `fold` check.
    """
    us = epoch_microseconds
    steps = fold_entity_events(rows)
    get_step = steps.get
    records: list[tuple[Any, ...]] = []
    append = records.append
    occurred: Any = None
    published: Any = None
    occurred_us = published_us = 0
    second_step = False
    for index, r in enumerate(rows):
        if r[5] != occurred or r[5].fold != occurred.fold:
            occurred = r[5]
            occurred_us = us(occurred)
        if r[6] != published or r[6].fold != published.fold:
            published = r[6]
            published_us = us(published)
        step = get_step(index)
        fold_step: int | None = None
        first_us: int | None = None
        if step is not None:
            fold_step, first_seen = step
            # an entity's first sighting is usually this very event
            first_us = occurred_us if first_seen is r[5] else us(first_seen)
            second_step = second_step or fold_step == 2
        append(
            (r[0], r[1], r[2], r[3], r[4], occurred_us, published_us, *r[7:], fold_step, first_us)
        )
    return records, second_step


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
        records, second_step = stage_records(rows)
        with transient_errors("writing entity events"):
            async with self._pool.acquire() as conn:
                await self._partitions.ensure(conn, {r.occurred_at.date() for r in rows})
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        EVENT_STAGE, records=records, columns=_STAGE_COLUMNS
                    )
                    inserted = await _insert_events(conn, len(rows), redelivered=redelivered)
                    changed = _affected(await conn.execute(UPSERT_ENTITIES, 1))
                    if second_step:
                        changed += _affected(await conn.execute(UPSERT_ENTITIES, 2))
        m = self._metrics
        m.write_seconds.labels("entity_events").observe(time.perf_counter() - started)
        m.batch_size.labels("entity_events").observe(len(rows))
        m.rows_written.labels("entity_events").inc(inserted)
        m.rows_written.labels("entities").inc(changed)
        m.duplicates.labels("entity_events").inc(len(rows) - inserted)
        return inserted
