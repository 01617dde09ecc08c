"""SimulationDataConsumer: stores `simulation.entity.*` events and the entities' current state."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from analytics_engine.core.bus import (
    DeadLetters,
    Delivery,
    DeliveryBatch,
    DurableConsumer,
    encode_event,
)
from analytics_engine.core.storable import EntityEventRow, InvalidPayload, parse_entity_fields
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.writer import EntityEventWriter

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

log = logging.getLogger(__name__)


def dead_letter_invalid(
    dead_letters: DeadLetters, invalid: Sequence[tuple[Delivery, str]]
) -> Callable[[Pipeline], None] | None:
    """An `also=` callback for `DurableConsumer.ack`: dead-letter `invalid` in the ack's MULTI."""
    if not invalid:
        return None

    def add(pipe: Pipeline) -> None:
        for delivery, reason in invalid:
            dead_letters.add_to_pipeline(
                pipe,
                channel=delivery.channel,
                reason=f"invalid payload: {reason}",
                original=encode_event(delivery.event),
                kind="event",
                stream_id=delivery.id,
            )

    return add


class SimulationDataConsumer:
    """Batch handler for the entity channels.

    Valid events are written in one transaction; events failing validation are dead-lettered
    atomically with the batch's acknowledgement, so a malformed event never holds up the others.
    An outage raises `TransientError` (from the writer): the batch stays pending and is retried.
    """

    def __init__(
        self, writer: EntityEventWriter, dead_letters: DeadLetters, metrics: DatabaseMetrics
    ) -> None:
        self._writer = writer
        self._dead = dead_letters
        self._metrics = metrics
        self._consumer: DurableConsumer | None = None

    def bind(self, consumer: DurableConsumer) -> None:
        """The consumer whose deliveries this handler acknowledges (it runs with auto_ack off)."""
        self._consumer = consumer

    async def __call__(self, deliveries: Sequence[Delivery]) -> None:
        assert self._consumer is not None, "bind() the consumer first"
        rows: list[EntityEventRow] = []
        invalid: list[tuple[Delivery, str]] = []
        append = rows.append
        batch = DeliveryBatch.of(deliveries)
        redelivered = any(a > 1 for a in batch.attempts)
        times: dict[str, datetime] = {}  # a batch's events often share an `occurred_at`
        for index, (channel, e) in enumerate(zip(batch.channels, batch.envelopes, strict=True)):
            try:
                append(
                    parse_entity_fields(
                        channel,
                        e["event_id"],
                        e["source"],
                        e["timestamp"],
                        e["payload"],
                        times=times,
                    )
                )
            except InvalidPayload as exc:
                invalid.append((batch[index], str(exc)))
        for delivery, _ in invalid:
            self._metrics.invalid.labels(delivery.channel).inc()
        if rows:
            await self._writer.write(rows, redelivered=redelivered)
        if invalid:
            log.warning("dead-lettering invalid entity events", extra={"count": len(invalid)})
        await self._consumer.ack(deliveries, also=dead_letter_invalid(self._dead, invalid))
