"""Drives the generator: paces it with the token bucket, publishes batches, emits ticks, and
holds the state the HTTP control API shows and changes (running, rate, counters)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from analytics_engine.core import channels
from analytics_engine.core.bus import REDIS_ERRORS, EncodedEvent, EventPublisher
from analytics_engine.core.envelopes import utcnow
from analytics_engine.simulator.generator import EventGenerator
from analytics_engine.simulator.rate import TokenBucket

log = logging.getLogger(__name__)

MAX_RATE = 100_000.0
MAX_BATCH = 1000
TARGET_PUBLISHES_PER_S = 100  # batch size ~ rate/100: 10 ms pacing granularity


class MaxEventsReached(Exception):
    """`start` after `SIMULATOR_MAX_EVENTS` events were emitted."""


class SimulatorController:
    def __init__(
        self,
        generator: EventGenerator,
        publisher: EventPublisher,
        *,
        rate: float,
        max_events: int | None = None,
        tick_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < rate <= MAX_RATE:
            raise ValueError(f"rate must be in (0, {MAX_RATE:g}]")
        self.generator = generator
        self._publisher = publisher
        self._clock = clock
        self._bucket = TokenBucket(rate, clock())
        self.max_events = max_events
        self.tick_interval_s = tick_interval_s
        self.events_emitted = 0
        self.batches_published = 0
        self.started_at: datetime | None = None
        self._running = asyncio.Event()
        self._commanded = False
        """Started or stopped on request: the autostart leaves the simulator as it was told."""
        self._pending: list[EncodedEvent] = []
        self._pending_batch: tuple[list[tuple[str, dict[str, Any]]], list[str]] = ([], [])
        self._pending_now: datetime | None = None
        """The `now` the pending batch was generated at (its `occurred_at` follow it)."""
        self._tick = 0
        self._last_tick_count = 0
        self._last_tick_time = clock()
        self._measured_rate = 0.0

    # -- control ---------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._running.is_set()

    @property
    def rate(self) -> float:
        return self._bucket.rate

    @property
    def finished(self) -> bool:
        return self.max_events is not None and self.events_emitted >= self.max_events

    def start(self) -> None:
        if self.finished:
            raise MaxEventsReached(f"all {self.max_events} events were emitted")
        self._commanded = True
        self._start()

    def autostart(self) -> bool:
        """Start unless already started or stopped on request (a `stop` sent while the service
        waited for the metadata service holds) or finished; True when it started."""
        if self._commanded or self.finished:
            return False
        self._start()
        return True

    def _start(self) -> None:
        if not self.running:
            self._bucket.reset(self._clock())
            self.started_at = utcnow()
            if self._pending:
                self._redate_pending(self.started_at)
            self._last_tick_time = self._clock()
            self._last_tick_count = self.events_emitted
            self._running.set()
            log.info("simulation started", extra={"rate": self.rate})

    def stop(self) -> None:
        self._commanded = True
        if self.running:
            self._running.clear()
            self._measured_rate = 0.0  # stopped: no events now (the last tick's rate was then)
            log.info("simulation stopped", extra={"events_emitted": self.events_emitted})

    def set_rate(self, rate: float) -> None:
        if not 0 < rate <= MAX_RATE:
            raise ValueError(f"rate must be in (0, {MAX_RATE:g}]")
        self._bucket.set_rate(rate, self._clock())

    def status(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "rate": self.rate,
            "measured_rate": round(self._measured_rate, 3),
            # channels whose full streams hold the simulator back (backpressure): their
            # readers are down or behind
            "waiting_for": list(self._publisher.waiting_for),
            "events_emitted": self.events_emitted,
            "max_events": self.max_events,
            "seed": self.generator.config.seed,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "entity_types": list(self.generator.entity_types),
            "counts": {name: dict(kinds) for name, kinds in self.generator.counts.items()},
            "tick": self._tick,
        }

    # -- the loops -------------------------------------------------------------------------
    async def run(self) -> None:
        """Generate and publish while running; idle (cheaply) while stopped."""
        backoff = 0.05
        while True:
            if not self.running:
                await self._running.wait()
                continue
            if self._pending:
                try:
                    await self._publish_pending()
                    backoff = 0.05
                except REDIS_ERRORS as exc:
                    log.warning("publish failed, retrying", extra={"error": str(exc)[:200]})
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    self._stamp_pending(utcnow())
                continue
            if self.finished:
                self.stop()
                continue
            await self._step()

    async def _step(self) -> None:
        """Generate the next batch the bucket allows into `_pending` (or sleep until one)."""
        now = self._clock()
        remaining = (
            MAX_BATCH
            if self.max_events is None
            else min(MAX_BATCH, self.max_events - self.events_emitted)
        )
        # Wait for a whole batch (rate / TARGET_PUBLISHES_PER_S events): taking whatever
        # accrued while the last batch was being published would shrink batches to a few
        # events at high rates, one script call and one wake-up each.
        min_batch = int(max(1.0, min(float(MAX_BATCH), self.rate / TARGET_PUBLISHES_PER_S)))
        wait = self._bucket.wait_time(min(min_batch, remaining), now)
        if wait > 0:
            await asyncio.sleep(min(max(wait, 0.001), 0.1))
            return
        n = self._bucket.take(remaining, now)
        first = self.generator.sequence
        wall = utcnow()
        batch = self.generator.next_batch(n, wall)
        event_id = self.generator.event_id
        self._pending_batch = (batch, [event_id(first + i) for i in range(len(batch))])
        self._pending_now = wall
        self._stamp_pending(wall)
        # published by `run` next, retried there until Redis takes it (no gap in the sequence)

    def _stamp_pending(self, published_at: datetime) -> None:
        """The pending batch's envelopes, stamped `published_at`. A retry is stamped anew: an
        event's `timestamp` is when it is published, and the calculation engine closes windows
        on Redis time once it has read everything, so a batch stamped before a Redis outage
        and appended after it would be on time by its stamp for a window already closed."""
        batch, ids = self._pending_batch
        self._pending = self._publisher.encode_batch(batch, ids, published_at)

    def _redate_pending(self, now: datetime) -> None:
        """Move the pending batch to `now`: its `occurred_at` by as much as `now` is after the
        batch's generation, keeping each event's lateness (the same payloads otherwise, for a
        given seed). A batch held while the simulator was stopped (its publish failed, Redis
        down, and the simulator was stopped before a retry went through) would otherwise be
        published at the next start as events of the moment it stopped, late for every window
        by the length of the pause. Timestamp attributes drawn at generation keep their value.
        """
        generated = self._pending_now
        if generated is None or now <= generated:
            return
        shift = now - generated
        for _, payload in self._pending_batch[0]:
            occurred = datetime.fromisoformat(payload["occurred_at"])
            payload["occurred_at"] = (occurred + shift).isoformat()
        self._pending_now = now
        self._stamp_pending(now)

    async def _publish_pending(self) -> None:
        await self._publisher.publish_encoded(self._pending)
        self.events_emitted += len(self._pending)
        self.batches_published += 1
        self._pending = []
        self._pending_batch = ([], [])
        self._pending_now = None

    async def tick_loop(self) -> None:
        """`simulation.tick` every `tick_interval_s` while running."""
        while True:
            await asyncio.sleep(self.tick_interval_s)
            if not self.running:
                continue
            now = self._clock()
            elapsed = max(now - self._last_tick_time, 1e-9)
            self._measured_rate = (self.events_emitted - self._last_tick_count) / elapsed
            self._last_tick_time = now
            self._last_tick_count = self.events_emitted
            self._tick += 1
            payload = {
                "tick": self._tick,
                "simulated_time": utcnow().isoformat(),
                "events_emitted": self.events_emitted,
                "rate_per_s": round(self._measured_rate, 3),
            }
            try:
                await self._publisher.publish(channels.SIMULATION_TICK, payload)
            except REDIS_ERRORS as exc:
                log.warning("tick not published", extra={"error": str(exc)[:200]})
