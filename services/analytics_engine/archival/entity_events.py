"""Archive `archival.events` batches and confirm them on `archival.confirmed`.

Each message is one batch the database service wants to delete from PostgreSQL. It is written to
a key derived from the batch alone (`entity_events/entity_type=<t>/date=<d>/batch-<id>.parquet`),
so a re-delivered or re-sent batch overwrites its own object: the lake never holds an event twice.
The confirmation `{batch_id, object_key, row_count}` is published in the same MULTI/EXEC as the
XACK, only after S3 acknowledged the PUT: the database deletes rows only once they are durable.
A batch without rows is confirmed without a PUT, so it can never empty an archived object.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from analytics_engine.archival.layout import entity_events_object_key
from analytics_engine.archival.tables import (
    EventBatch,
    PayloadError,
    parse_event_batch,
    to_parquet,
)
from analytics_engine.core.bus import encode_event, redis_outage_is_transient
from analytics_engine.core.channels import ARCHIVAL_CONFIRMED
from analytics_engine.core.errors import TransientError

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from analytics_engine.archival.s3 import ObjectStore
    from analytics_engine.core.bus import DeadLetters, Delivery, DurableConsumer, EventPublisher
    from analytics_engine.core.envelopes import Event

log = logging.getLogger(__name__)


class EntityEventArchiver:
    def __init__(
        self,
        *,
        store: ObjectStore,
        publisher: EventPublisher,
        dead_letters: DeadLetters,
        compression_level: int | None = None,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._dead = dead_letters
        self._level = compression_level
        self._consumer: DurableConsumer | None = None
        self.rows_written = 0
        self.batches_written = 0

    def attach(self, consumer: DurableConsumer) -> None:
        self._consumer = consumer

    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        good: list[tuple[Delivery, EventBatch]] = []
        bad: list[tuple[Delivery, str]] = []
        for delivery in deliveries:
            try:
                good.append((delivery, parse_event_batch(delivery.event.payload)))
            except PayloadError as exc:
                bad.append((delivery, str(exc)))
        keys = [entity_events_object_key(b.entity_type, b.day, b.batch_id) for _, b in good]
        # A batch without rows writes nothing: the database never makes one, but a re-send of a
        # batch whose rows it had already deleted (confirmed meanwhile) would otherwise replace
        # the archived object with an empty file. Its confirmation names nothing to delete.
        results = await asyncio.gather(
            *(
                self._store.put(key, to_parquet(batch.table, compression_level=self._level))
                for key, (_, batch) in zip(keys, good, strict=True)
                if batch.table.num_rows
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                # Nothing acknowledged: the retry rewrites the same keys (idempotent).
                if isinstance(result, TransientError):
                    raise result
                raise TransientError(f"S3 write failed: {result}") from result
        confirmations: list[Event] = [
            self._publisher.make_event(
                ARCHIVAL_CONFIRMED,
                {"batch_id": batch.batch_id, "object_key": key, "row_count": batch.table.num_rows},
            )
            for key, (_, batch) in zip(keys, good, strict=True)
        ]

        def also(pipe: Pipeline) -> None:
            self._publisher.add_to_pipeline(pipe, confirmations)
            for delivery, reason in bad:
                self._dead.add_to_pipeline(
                    pipe,
                    channel=delivery.channel,
                    reason=f"unarchivable event batch: {reason}",
                    original=encode_event(delivery.event),
                    kind="event",
                    stream_id=delivery.id,
                )

        if self._consumer is None:
            raise RuntimeError("EntityEventArchiver.attach(consumer) was not called")
        with redis_outage_is_transient():
            await self._consumer.ack(deliveries, also=also)
            if confirmations:
                await self._publisher.wait_for_room([ARCHIVAL_CONFIRMED])
        if bad:
            log.warning("dead-lettered unarchivable event batches", extra={"count": len(bad)})
        self.batches_written += len(good)
        self.rows_written += sum(b.table.num_rows for _, b in good)
