"""The outbox relay: publishes committed changes on `metadata.changed`.

Writers commit the event into `metadata_outbox` with the change; this loop publishes it. It wakes
at once after a local commit (`store.changed`) and polls every `poll_interval` otherwise, which
covers rows left by a crashed process and changes committed by another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from analytics_engine.core.bus import REDIS_ERRORS
from analytics_engine.core.channels import METADATA_CHANGED
from analytics_engine.metadata.errors import StoreUnavailable

if TYPE_CHECKING:
    from analytics_engine.core.bus import EventPublisher
    from analytics_engine.metadata.store import MetadataStore, OutboxEntry

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S: Final = 5.0


class OutboxRelay:
    def __init__(
        self,
        store: MetadataStore,
        publisher: EventPublisher,
        *,
        poll_interval: float = 1.0,
        batch_size: int = 100,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._poll = poll_interval
        self._batch = batch_size
        self.published = 0

    async def _publish(self, entries: Sequence[OutboxEntry]) -> None:
        events = [
            self._publisher.make_event(METADATA_CHANGED, e.payload, event_id=e.event_id)
            for e in entries
        ]
        await self._publisher.publish_events(events)

    async def drain(self) -> int:
        """Publish everything pending now; returns how many events were published."""
        total = 0
        while True:
            count = await self._store.drain_outbox(self._publish, limit=self._batch)
            total += count
            self.published += count
            if count < self._batch:
                return total

    async def run(self) -> None:
        backoff = self._poll
        while True:
            self._store.changed.clear()
            try:
                if self._store.schema_ready:
                    await self._drain_to_completion()
                backoff = self._poll
            except (StoreUnavailable, *REDIS_ERRORS) as exc:
                log.warning("cannot relay metadata changes yet", extra={"error": str(exc)[:200]})
                backoff = min(backoff * 2, 10.0)
                await asyncio.sleep(backoff)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._store.changed.wait(), self._poll)

    async def _drain_to_completion(self) -> None:
        """Drain; on shutdown let a batch in flight commit first, since a batch cancelled
        between its publish and its commit is published again by the next process."""
        drain = asyncio.ensure_future(self.drain())
        try:
            await asyncio.shield(drain)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(drain, SHUTDOWN_GRACE_S)
            raise
