"""Retention: old entity events go to the archival service, and are deleted once it confirms.

A batch is one entity type and one UTC day, at most `batch_rows` rows and about `batch_bytes`
(a Redis message has a size limit: `proto-max-bulk-len`), recorded in
`archival_batches` with the keys `(occurred_at, event_id)` of its rows before it is sent on
`archival.events`. Re-sends (after `confirm_timeout` without `archival.confirmed`) carry the
same batch id and the same rows (read only while the batch is still open: once confirmed, its
rows are gone, and a re-send without them would empty its object); the archival service writes
a batch to a deterministic object key, so re-sending never duplicates. Rows are deleted in the
transaction that records the confirmation. Crashes on either side at any point leave a batch
pending or sent: it is re-sent, never lost. An event stored again after its archival (a
redelivery) is deleted, not archived twice (`REDELIVERY_WINDOW`). One replica at a time runs a
pass (advisory lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

from analytics_engine.core import channels
from analytics_engine.core.bus import DeadLetters, Delivery, DurableConsumer, EventPublisher
from analytics_engine.core.errors import TransientError
from analytics_engine.core.storable import CHANNEL_BY_KIND, InvalidPayload
from analytics_engine.database.db import transient_errors
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.partitions import PartitionManager
from analytics_engine.database.simulation_data_consumer import dead_letter_invalid

log = logging.getLogger(__name__)

ARCHIVAL_LOCK: Final = 0x4145_4152  # "AEAR"

EVENT_COLUMNS: Final = (
    "event_id, event_kind, entity_type, entity_id, version, occurred_at, published_at,"
    " attributes, reason, source"
)

_OPEN_KEYS: Final = """
open_keys AS (
    SELECT unnest(occurred_ats) AS occurred_at, unnest(event_ids) AS event_id
    FROM archival_batches WHERE status IN ('pending', 'sent')
)"""
# An event `e` in no open batch. A hashed subplan: probed per candidate row, the unnested keys of
# the open batches are hashed once (a nested-loop anti-join over them is quadratic).
_NOT_IN_OPEN_BATCH: Final = (
    "(e.occurred_at, e.event_id) NOT IN (SELECT occurred_at, event_id FROM open_keys)"
)

# The oldest old event not in an open batch, found per entity type (a loose scan of the key's
# leading column, then one probe of each type's (occurred_at, event_id) order): the key leads
# with entity_type, so "oldest overall" is the oldest of each type's oldest.
OLDEST_CANDIDATE: Final = f"""
WITH RECURSIVE {_OPEN_KEYS.strip()},
types AS (
    SELECT min(entity_type) AS entity_type FROM entity_events WHERE occurred_at < $1
    UNION ALL
    SELECT (SELECT min(e.entity_type) FROM entity_events e
            WHERE e.entity_type > t.entity_type AND e.occurred_at < $1)
    FROM types t WHERE t.entity_type IS NOT NULL
)
SELECT c.entity_type, c.occurred_at
FROM types t
CROSS JOIN LATERAL (
    SELECT e.entity_type, e.occurred_at, e.event_id FROM entity_events e
    WHERE e.entity_type = t.entity_type AND e.occurred_at < $1
      AND {_NOT_IN_OPEN_BATCH}
    ORDER BY e.occurred_at, e.event_id
    LIMIT 1
) c
ORDER BY c.occurred_at, c.event_id
LIMIT 1
"""

# About the bytes a row takes in the `archival.events` message (`archived_row` as JSON: the
# field names, the id and the two timestamps are ~260 bytes; escaping can add to the texts).
_ROW_BYTES: Final = (
    "(300 + octet_length(e.entity_type) + octet_length(e.entity_id)"
    " + coalesce(octet_length(e.attributes::text), 4) + coalesce(octet_length(e.reason), 4)"
    " + octet_length(e.source))"
)

# A batch: the oldest rows of one entity type and day, at most $5 of them and about $7 bytes
# (always at least one row: a single event fitted in a bus message when it was published).
CREATE_BATCH: Final = f"""
WITH {_OPEN_KEYS},
candidates AS (
    SELECT e.occurred_at, e.event_id, {_ROW_BYTES} AS row_bytes FROM entity_events e
    WHERE e.entity_type = $2 AND e.occurred_at >= $3 AND e.occurred_at < $4
      AND {_NOT_IN_OPEN_BATCH}
      AND NOT EXISTS (SELECT 1 FROM archived_event_keys a
                      WHERE a.entity_type = $2 AND a.occurred_at = e.occurred_at
                        AND a.event_id = e.event_id)
    ORDER BY e.occurred_at, e.event_id
    LIMIT $5
),
sized AS (
    SELECT occurred_at, event_id,
           sum(row_bytes) OVER (ORDER BY occurred_at, event_id ROWS UNBOUNDED PRECEDING) AS upto,
           row_number() OVER (ORDER BY occurred_at, event_id) AS n
    FROM candidates
),
picked AS (SELECT occurred_at, event_id FROM sized WHERE upto <= $7 OR n = 1)
INSERT INTO archival_batches (batch_id, entity_type, day, status, row_count, occurred_ats,
                              event_ids)
SELECT $1, $2, $6, 'pending', count(*),
       array_agg(occurred_at ORDER BY occurred_at, event_id),
       array_agg(event_id ORDER BY occurred_at, event_id)
FROM picked
HAVING count(*) > 0
RETURNING row_count
"""

DUE_BATCHES: Final = """
SELECT batch_id, entity_type, day, occurred_ats, event_ids, status FROM archival_batches
WHERE status IN ('pending', 'sent') AND (sent_at IS NULL OR sent_at < now() - $1::interval)
ORDER BY created_at
LIMIT $2
"""

# A batch's rows by their keys: $1 occurred_ats, $2 event_ids, $3 entity type, $4/$5 the day's
# bounds (they prune to the day's partition; without them the planner hashes the whole table).
_BATCH_KEYS: Final = """
unnest($1::timestamptz[], $2::uuid[]) AS k(occurred_at, event_id)"""
_OF_BATCH: Final = """
e.entity_type = $3 AND e.occurred_at >= $4 AND e.occurred_at < $5
AND e.occurred_at = k.occurred_at AND e.event_id = k.event_id"""

BATCH_ROWS: Final = f"""
SELECT {", ".join("e." + c.strip() for c in EVENT_COLUMNS.split(","))}
FROM entity_events e JOIN {_BATCH_KEYS} ON {_OF_BATCH}
ORDER BY e.occurred_at, e.event_id
"""

# Deletes a confirmed batch's rows and returns how many; the keys of those stored within the
# redelivery window ($6) are remembered (`archived_event_keys`, migration 0006).
DELETE_BATCH_ROWS: Final = f"""
WITH gone AS (
    DELETE FROM entity_events e USING {_BATCH_KEYS} WHERE {_OF_BATCH}
    RETURNING e.entity_type, e.occurred_at, e.event_id, e.stored_at
),
remembered AS (
    INSERT INTO archived_event_keys (entity_type, occurred_at, event_id)
    SELECT entity_type, occurred_at, event_id FROM gone WHERE stored_at > now() - $6::interval
    ON CONFLICT DO NOTHING
)
SELECT count(*) FROM gone
"""

# Candidates of a new batch ($1 type, $2/$3 the day's bounds, $4 rows) that were archived
# already: stored again after their archival (a redelivery), deleted rather than archived twice.
DELETE_ARCHIVED_AGAIN: Final = f"""
WITH {_OPEN_KEYS},
candidates AS (
    SELECT e.occurred_at, e.event_id FROM entity_events e
    WHERE e.entity_type = $1 AND e.occurred_at >= $2 AND e.occurred_at < $3
      AND {_NOT_IN_OPEN_BATCH}
    ORDER BY e.occurred_at, e.event_id
    LIMIT $4
)
DELETE FROM entity_events e USING candidates c, archived_event_keys a
WHERE e.entity_type = $1 AND e.occurred_at >= $2 AND e.occurred_at < $3
  AND e.occurred_at = c.occurred_at AND e.event_id = c.event_id
  AND a.entity_type = $1 AND a.occurred_at = c.occurred_at AND a.event_id = c.event_id
"""

ANY_ARCHIVED_KEYS: Final = "SELECT EXISTS (SELECT 1 FROM archived_event_keys)"
PRUNE_ARCHIVED_KEYS: Final = (
    "DELETE FROM archived_event_keys WHERE archived_at < now() - $1::interval"
)

REDELIVERY_WINDOW: Final = timedelta(minutes=10)
"""How long after it was stored an event may come again. A writer acknowledges a batch right
after its commit; one that dies in between has the batch re-delivered to a peer after
`BUS_CLAIM_IDLE_MS` (30 s by default), and only a peer can have archived the events meanwhile
(a lone replica that died right after its commit archived nothing since). A publisher's retry
follows its first try. Events archived within this of being stored have their keys remembered
as long (`archived_event_keys`), so a second copy is not archived twice. Short on purpose: it
costs a remembered key per event archived soon after it was stored (a backlog of old events,
a short `DATABASE_RETENTION`)."""


def batch_keys(batch: Any) -> tuple[Any, ...]:
    """The parameters of `BATCH_ROWS` and `DELETE_BATCH_ROWS` for an `archival_batches` row."""
    return (
        batch["occurred_ats"],
        batch["event_ids"],
        batch["entity_type"],
        *day_bounds(batch["day"]),
    )


LOCK_OPEN_BATCH: Final = """
SELECT true FROM archival_batches WHERE batch_id = $1 AND status IN ('pending', 'sent') FOR SHARE
"""

MARK_SENT: Final = """
UPDATE archival_batches SET status = 'sent', sent_at = now(), send_count = send_count + 1
WHERE batch_id = $1 AND status IN ('pending', 'sent')
"""


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(0), tzinfo=UTC)
    return start, start + timedelta(days=1)


def archived_row(record: Any) -> dict[str, Any]:
    """One row of an `archival.events` batch, JSON-ready (pure)."""
    return {
        "event_id": str(record["event_id"]),
        "event_kind": record["event_kind"],
        "entity_type": record["entity_type"],
        "entity_id": record["entity_id"],
        "version": record["version"],
        "occurred_at": record["occurred_at"].isoformat(),
        "published_at": record["published_at"].isoformat(),
        "attributes": record["attributes"],
        "reason": record["reason"],
        "source": record["source"],
    }


def parse_confirmation(payload: dict[str, Any]) -> tuple[uuid.UUID, str, int]:
    try:
        batch_id = uuid.UUID(str(payload.get("batch_id")))
    except ValueError:
        raise InvalidPayload("batch_id: must be a UUID") from None
    key = payload.get("object_key")
    count = payload.get("row_count")
    if not isinstance(key, str) or not key:
        raise InvalidPayload("object_key: a non-empty string is required")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InvalidPayload("row_count: a non-negative integer is required")
    return batch_id, key, count


class Archiver:
    def __init__(
        self,
        *,
        pool: Any,
        publisher: EventPublisher,
        dead_letters: DeadLetters,
        metrics: DatabaseMetrics,
        partitions: PartitionManager,
        retention: timedelta,
        interval: timedelta,
        batch_rows: int,
        batch_bytes: int,
        confirm_timeout: timedelta,
        max_inflight: int,
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._dead = dead_letters
        self._metrics = metrics
        self._partitions = partitions
        self.retention = retention
        self.interval = interval
        self.batch_rows = batch_rows
        self.batch_bytes = batch_bytes
        self.confirm_timeout = confirm_timeout
        self.max_inflight = max_inflight
        self._wake = asyncio.Event()
        self._requested_cutoff: datetime | None = None
        self._consumer: DurableConsumer | None = None
        assert CHANNEL_BY_KIND  # rows carry event_kind; the archive maps it back to channels

    def bind(self, consumer: DurableConsumer) -> None:
        self._consumer = consumer

    # -- the loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Background task: a pass every `interval`, or sooner when a confirmation frees room."""
        while True:
            try:
                await self.run_pass()
            except TransientError as exc:
                log.warning("archival pass postponed", extra={"error": str(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval.total_seconds())
            self._wake.clear()

    async def request(self, older_than: timedelta | None) -> dict[str, int]:
        """`request_archival`: a pass now; with `older_than`, that cutoff holds until caught up."""
        if older_than is not None:
            cutoff = datetime.now(UTC) - older_than
            if self._requested_cutoff is None or cutoff > self._requested_cutoff:
                self._requested_cutoff = cutoff
        result = await self.run_pass()
        self._wake.set()
        return result

    def _cutoff(self) -> datetime:
        cutoff = datetime.now(UTC) - self.retention
        if self._requested_cutoff is not None and self._requested_cutoff > cutoff:
            return self._requested_cutoff
        return cutoff

    async def run_pass(self) -> dict[str, int]:
        """Re-send overdue batches, then create and send new ones up to `max_inflight`."""
        sent = resent = rows = 0
        cutoff = self._cutoff()
        with transient_errors("archival pass"):
            async with self._pool.acquire() as conn:
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ARCHIVAL_LOCK):
                    return {"batches": 0, "rows": 0, "resent": 0}
                try:
                    for batch in await conn.fetch(DUE_BATCHES, self.confirm_timeout, 1000):
                        n = await self._send(conn, batch)
                        if n is None:
                            continue  # confirmed since it was picked
                        if batch["status"] == "sent":
                            resent += 1
                            self._metrics.archival_batches.labels("resent").inc()
                        else:
                            sent += 1
                            rows += n
                    await conn.execute(PRUNE_ARCHIVED_KEYS, REDELIVERY_WINDOW)
                    while await self._open_batches(conn) < self.max_inflight:
                        created = await self._create(conn, cutoff)
                        if created is None:
                            self._requested_cutoff = None  # caught up
                            break
                        rows += await self._send(conn, created) or 0
                        sent += 1
                    await self._partitions.drop_empty_before(conn, cutoff)
                finally:
                    await conn.execute("SELECT pg_advisory_unlock($1)", ARCHIVAL_LOCK)
        if sent or resent:
            log.info("archival batches sent", extra={"batches": sent, "resent": resent})
        return {"batches": sent, "rows": rows, "resent": resent}

    async def _open_batches(self, conn: Any) -> int:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM archival_batches WHERE status IN ('pending', 'sent')"
            )
        )

    async def _create(self, conn: Any, cutoff: datetime) -> Any | None:
        """A new batch of the oldest candidates, or None when there are none. Candidates
        archived already (stored again since) are deleted first, and never put in a batch."""
        while True:
            oldest = await conn.fetchrow(OLDEST_CANDIDATE, cutoff)
            if oldest is None:
                return None
            day = oldest["occurred_at"].astimezone(UTC).date()
            start, end = day_bounds(day)
            if not await conn.fetchval(ANY_ARCHIVED_KEYS):
                break  # the steady state
            status = await conn.execute(
                DELETE_ARCHIVED_AGAIN,
                oldest["entity_type"],
                start,
                min(end, cutoff),
                self.batch_rows,
            )
            gone = int(status.rsplit(" ", 1)[-1])
            if not gone:
                break
            log.info("deleted events stored again after their archival", extra={"rows": gone})
        batch_id = uuid.uuid4()
        await conn.fetchval(
            CREATE_BATCH,
            batch_id,
            oldest["entity_type"],
            start,
            min(end, cutoff),
            self.batch_rows,
            day,
            self.batch_bytes,
        )
        return await conn.fetchrow(
            "SELECT batch_id, entity_type, day, occurred_ats, event_ids, status"
            " FROM archival_batches WHERE batch_id = $1",
            batch_id,
        )

    async def _send(self, conn: Any, batch: Any) -> int | None:
        """Publish a batch with its rows; None (nothing sent) when it is no longer open.

        A pass picks its due batches first and sends them one by one: a confirmation handled
        meanwhile has deleted a batch's rows, and that batch re-sent without them would overwrite
        its archived object (same key) with an empty one. So its rows are read in a transaction
        that holds the batch open (FOR SHARE: a confirmation waits for the read)."""
        async with conn.transaction():
            if not await conn.fetchval(LOCK_OPEN_BATCH, batch["batch_id"]):
                return None
            records = await conn.fetch(BATCH_ROWS, *batch_keys(batch))
        payload = {
            "batch_id": str(batch["batch_id"]),
            "entity_type": batch["entity_type"],
            "date": batch["day"].isoformat(),
            "rows": [archived_row(r) for r in records],
        }
        await self._publisher.publish(channels.ARCHIVAL_EVENTS, payload)
        await conn.execute(MARK_SENT, batch["batch_id"])
        self._metrics.archival_batches.labels("sent").inc()
        return len(records)

    # -- confirmations -----------------------------------------------------------------------
    async def on_confirmed(self, deliveries: Sequence[Delivery]) -> None:
        """Handler of `archival.confirmed`: delete the batch's rows, mark it deleted."""
        assert self._consumer is not None, "bind() the consumer first"
        invalid: list[tuple[Delivery, str]] = []
        for delivery in deliveries:
            try:
                batch_id, key, count = parse_confirmation(delivery.event.payload)
                await self._confirm(batch_id, key, count)
            except InvalidPayload as exc:
                invalid.append((delivery, str(exc)))
        await self._consumer.ack(deliveries, also=dead_letter_invalid(self._dead, invalid))
        self._wake.set()

    async def _confirm(self, batch_id: uuid.UUID, object_key: str, row_count: int) -> None:
        with transient_errors("confirming an archival batch"):
            async with self._pool.acquire() as conn, conn.transaction():
                batch = await conn.fetchrow(
                    "SELECT status, entity_type, day, row_count, occurred_ats, event_ids"
                    " FROM archival_batches"
                    " WHERE batch_id = $1 FOR UPDATE",
                    batch_id,
                )
                if batch is None or batch["status"] == "deleted":
                    return  # unknown (not ours) or a repeated confirmation
                if batch["row_count"] != row_count:
                    raise InvalidPayload(
                        f"row_count {row_count} does not match the batch's {batch['row_count']}"
                    )
                deleted = int(
                    await conn.fetchval(DELETE_BATCH_ROWS, *batch_keys(batch), REDELIVERY_WINDOW)
                )
                await conn.execute(
                    "UPDATE archival_batches SET status = 'deleted', confirmed_at = now(),"
                    " object_key = $2, occurred_ats = NULL, event_ids = NULL"
                    " WHERE batch_id = $1",
                    batch_id,
                    object_key,
                )
        self._metrics.archival_batches.labels("deleted").inc()
        self._metrics.archived_rows.inc(deleted)
