"""KPIResultConsumer: upserts `kpi.calculated` results and forwards them to the archive.

Forwarding is crash-safe without a separate outbox table: `kpi_results.forwarded` is the
outbox flag. Per batch:
1. one transaction upserts the results (a row changes only if its value, sample count or
   definition version changed, and only for a computation at least as new as the stored one;
   a change clears `forwarded` and bumps `revision`), records where each definition version
   begins (`kpi_result_versions`), and reads back the batch's rows that are not forwarded yet;
2. those rows are published on `archive.kpi_results` in the same Redis MULTI that acknowledges
   the batch (and dead-letters its invalid events);
3. the rows are marked forwarded if their revision is still the one published.
A crash before 2 redelivers the batch, and step 1 finds the rows still unforwarded; a crash
between 2 and 3 leaves a flag unset but loses nothing (the archival service de-duplicates by
result key, so the rare extra forward is harmless).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import orjson

from analytics_engine.core import channels
from analytics_engine.core.bus import DeadLetters, Delivery, DurableConsumer, EventPublisher
from analytics_engine.core.storable import InvalidPayload
from analytics_engine.database.db import TRANSIENT_ERRORS, transient_errors
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.model import KpiResultRow, parse_kpi_result
from analytics_engine.database.simulation_data_consumer import dead_letter_invalid

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

log = logging.getLogger(__name__)

FORWARD_NAMESPACE: Final = uuid.UUID("5d0c7c1e-3f1b-4c55-9a51-4b7f2f2a9e10")

UPSERT_RESULTS: Final = """
INSERT INTO kpi_results AS cur (kpi_code, window_start, window_end, dimensions, dims_key, value,
                                sample_count, definition_version, computed_at)
SELECT r.kpi_code, r.window_start, r.window_end, r.dimensions::jsonb, r.dims_key, r.value,
       r.sample_count, r.definition_version, r.computed_at
FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[], $5::text[],
            $6::float8[], $7::int8[], $8::int4[], $9::timestamptz[])
     AS r(kpi_code, window_start, window_end, dimensions, dims_key, value, sample_count,
          definition_version, computed_at)
ORDER BY 1, 2, 3, 5
ON CONFLICT (kpi_code, window_start, window_end, dims_key) DO UPDATE SET
    value = EXCLUDED.value,
    dimensions = EXCLUDED.dimensions,
    sample_count = EXCLUDED.sample_count,
    definition_version = EXCLUDED.definition_version,
    computed_at = EXCLUDED.computed_at,
    stored_at = now(),
    forwarded = false,
    revision = cur.revision + 1
WHERE EXCLUDED.computed_at >= cur.computed_at
  AND (cur.value, cur.sample_count, cur.definition_version)
      IS DISTINCT FROM (EXCLUDED.value, EXCLUDED.sample_count, EXCLUDED.definition_version)
"""

# `kpi_result_versions` (migration 0007): each (code, version) of the batch begins no later
# than its earliest window. ON CONFLICT DO UPDATE (not a separate UPDATE) so two replicas
# storing a new version's first results at once both see the row the other inserted.
RECORD_VERSIONS: Final = """
INSERT INTO kpi_result_versions AS cur (kpi_code, definition_version, since)
SELECT b.kpi_code, b.definition_version, min(b.begins)
FROM unnest($1::text[], $2::int4[], $3::timestamptz[])
     AS b(kpi_code, definition_version, begins)
GROUP BY 1, 2
ORDER BY 1, 2
ON CONFLICT (kpi_code, definition_version) DO UPDATE SET since = EXCLUDED.since
WHERE EXCLUDED.since < cur.since
"""

UNFORWARDED: Final = """
SELECT k.kpi_code, k.window_start, k.window_end, k.dimensions, k.dims_key, k.value,
       k.sample_count, k.definition_version, k.computed_at, k.stored_at, k.revision
FROM kpi_results k
JOIN unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[])
     AS b(kpi_code, window_start, window_end, dims_key)
  USING (kpi_code, window_start, window_end, dims_key)
WHERE NOT k.forwarded
"""

MARK_FORWARDED: Final = """
UPDATE kpi_results k SET forwarded = true
FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::text[], $5::int8[])
     AS b(kpi_code, window_start, window_end, dims_key, revision)
WHERE k.kpi_code = b.kpi_code AND k.window_start = b.window_start
  AND k.window_end = b.window_end AND k.dims_key = b.dims_key AND k.revision = b.revision
"""


def latest_per_key(rows: Sequence[KpiResultRow]) -> list[KpiResultRow]:
    """One row per result key (an upsert cannot touch a row twice): the newest computation,
    the later delivery on a tie (pure)."""
    chosen: dict[tuple[str, datetime, datetime, str], KpiResultRow] = {}
    for row in rows:
        held = chosen.get(row.key)
        if held is None or row.computed_at >= held.computed_at:
            chosen[row.key] = row
    return list(chosen.values())


def forward_payload(record: Any) -> dict[str, Any]:
    """The `archive.kpi_results` payload of a stored row."""
    return {
        "kpi_code": record["kpi_code"],
        "value": record["value"],
        "window_start": record["window_start"].isoformat(),
        "window_end": record["window_end"].isoformat(),
        "dimensions": record["dimensions"],
        "sample_count": record["sample_count"],
        "definition_version": record["definition_version"],
        "computed_at": record["computed_at"].isoformat(),
        "stored_at": record["stored_at"].isoformat(),
    }


def forward_event_id(record: Any) -> str:
    """Stable per (result key, revision): a re-forward of the same state has the same id."""
    key = "|".join(
        (
            record["kpi_code"],
            record["window_start"].isoformat(),
            record["window_end"].isoformat(),
            record["dims_key"],
            str(record["revision"]),
        )
    )
    return str(uuid.uuid5(FORWARD_NAMESPACE, key))


class KPIResultConsumer:
    def __init__(
        self,
        pool: Any,
        publisher: EventPublisher,
        dead_letters: DeadLetters,
        metrics: DatabaseMetrics,
    ) -> None:
        self._pool = pool
        self._publisher = publisher
        self._dead = dead_letters
        self._metrics = metrics
        self._consumer: DurableConsumer | None = None

    def bind(self, consumer: DurableConsumer) -> None:
        self._consumer = consumer

    async def __call__(self, deliveries: Sequence[Delivery]) -> None:
        assert self._consumer is not None, "bind() the consumer first"
        rows: list[KpiResultRow] = []
        invalid: list[tuple[Delivery, str]] = []
        for delivery in deliveries:
            try:
                rows.append(parse_kpi_result(delivery.event))
            except InvalidPayload as exc:
                invalid.append((delivery, str(exc)))
                self._metrics.invalid.labels(delivery.channel).inc()
        to_forward = await self._store(latest_per_key(rows)) if rows else []
        events = [
            self._publisher.make_event(
                channels.ARCHIVE_KPI_RESULTS, forward_payload(r), event_id=forward_event_id(r)
            )
            for r in to_forward
        ]
        dead = dead_letter_invalid(self._dead, invalid)

        def also(pipe: Pipeline) -> None:
            self._publisher.add_to_pipeline(pipe, events)
            if dead is not None:
                dead(pipe)

        await self._consumer.ack(deliveries, also=also)
        self._metrics.forwarded.inc(len(events))
        if to_forward:
            await self._mark_forwarded(to_forward)
        if events:
            await self._publisher.wait_for_room([channels.ARCHIVE_KPI_RESULTS])

    async def _store(self, rows: Sequence[KpiResultRow]) -> list[Any]:
        started = time.perf_counter()
        cols: list[list[Any]] = [[] for _ in range(9)]
        for r in rows:
            for i, v in enumerate(
                (
                    r.kpi_code,
                    r.window_start,
                    r.window_end,
                    orjson.dumps(r.dimensions).decode(),
                    r.dims_key,
                    r.value,
                    r.sample_count,
                    r.definition_version,
                    r.computed_at,
                )
            ):
                cols[i].append(v)
        keys = [cols[0], cols[1], cols[2], cols[4]]
        with transient_errors("storing KPI results"):
            async with self._pool.acquire() as conn, conn.transaction():
                status = await conn.execute(UPSERT_RESULTS, *cols)
                await conn.execute(RECORD_VERSIONS, cols[0], cols[7], [r.begins for r in rows])
                pending = list(await conn.fetch(UNFORWARDED, *keys))
        self._metrics.write_seconds.labels("kpi_results").observe(time.perf_counter() - started)
        self._metrics.batch_size.labels("kpi_results").observe(len(rows))
        self._metrics.rows_written.labels("kpi_results").inc(int(status.rsplit(" ", 1)[-1]))
        return pending

    async def _mark_forwarded(self, records: Sequence[Any]) -> None:
        cols: list[list[Any]] = [[] for _ in range(5)]
        for r in records:
            for i, name in enumerate(
                ("kpi_code", "window_start", "window_end", "dims_key", "revision")
            ):
                cols[i].append(r[name])
        try:
            async with self._pool.acquire() as conn:
                await conn.execute(MARK_FORWARDED, *cols)
        except TRANSIENT_ERRORS as exc:
            # Already published and acknowledged: an unset flag only risks a duplicate forward.
            log.warning("could not mark KPI results forwarded", extra={"error": str(exc)})
