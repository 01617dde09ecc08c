"""`StreamProcessor`: the entity event streams -> the pure `KPIEngine` -> `kpi.calculated`.

Delivery and crash safety
-------------------------
* Consumer group `calculation_engine`, read as a `checkpointed` consumer: the checkpoint, not
  per-entry acknowledgements, records what has been processed. The engine runs as ONE active
  replica per KPI set (its state is one process's memory); a second replica would split the
  events between two engines.
* Every `checkpoint_interval` (and on shutdown) one MULTI/EXEC writes `engine.snapshot()` with
  the definitions and their origins (`registry`: directory or metadata service), the merge
  position (per stream, the last entry the engine has taken in) and the backfill jobs to
  `ae:calc:checkpoint` (with what is new of the dedupe ring, kept in its own chunks:
  `recent_ids_log`), and publishes results not yet published. On start
  the group is rewound to the checkpoint's merge position, so the restored snapshot plus the
  entries read again replay exactly what came after it, in the same order: every window is
  emitted with the same value (a window emitted between the checkpoint and the crash is emitted
  again, identical but for `computed_at`, with the same event ids). Nothing is pending per
  entry: at 20k events/s the pending list and its acknowledgements were most of the Redis time
  the engine cost.
* Results are published as soon as a batch closes windows (freshness), and again inside the
  checkpoint MULTI if that publish failed: duplicates are harmless downstream (upsert by key),
  losses are not possible.

Ordering
--------
`StreamMerger` re-merges the two streams in publication order (the engine's watermark needs
it) and drops redeliveries. The idle-close path (`engine.advance(now)`) runs only when every
stream is caught up as of a Redis `TIME`: while a backlog is being read, windows close on the
events' own publication times, never on the wall clock, so a restart never turns a backlog into
late events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import orjson

from analytics_engine.calculation.cache import LatestResults
from analytics_engine.calculation.checkpoint_store import (
    CheckpointStore,
    CorruptCheckpoint,
    delete_strays,
)
from analytics_engine.calculation.events import (
    EntityEventDecoder,
    InvalidEntityEvent,
    result_events,
)
from analytics_engine.calculation.metrics import EVENT_ISSUES, CalculationMetrics
from analytics_engine.calculation.ordering import StreamMerger
from analytics_engine.calculation.recent_ids_log import RecentIdsLog, RingManifest, RingWrite
from analytics_engine.core import channels
from analytics_engine.core.bus import REDIS_ERRORS, Delivery, DeliveryBatch, DurableConsumer
from analytics_engine.core.channels import StreamId, format_stream_id, parse_stream_id
from analytics_engine.core.envelopes import Event, utcnow
from analytics_engine.kpi import KPIEngine, KPIResult, VersionedKPIDefinition

if TYPE_CHECKING:
    from analytics_engine.core.runtime import ServiceRuntime

log = logging.getLogger(__name__)

INPUT_CHANNELS: Final = (channels.ENTITY_CREATED, channels.ENTITY_UPDATED)
CHECKPOINT_FORMAT: Final = 1
EAGER_RETRIES: Final = 5
"""Immediate re-checks for events that close a window but are still held back."""
GROUP: Final = "calculation_engine"

ResultFilter = Callable[[KPIResult], bool]


Held = dict[str, Any]
"""What the merger holds per event: its envelope's fields (as `envelopes.event_fields` gives
them; no `Event` or `Delivery` is built on this path)."""


def _published(held: Held) -> datetime:
    timestamp: datetime = held["timestamp"]
    return timestamp


def new_merger(released: Mapping[str, StreamId] | None = None) -> StreamMerger[Held]:
    return StreamMerger(INPUT_CHANNELS, released=released, tiebreak=_published)


class StreamProcessor:
    def __init__(
        self,
        runtime: ServiceRuntime,
        *,
        consumer_name: str,
        checkpoint_key: str,
        checkpoint_interval_s: float = 1.0,
        checkpoint_part_bytes: int = 4 * 1024 * 1024,
        advance_interval_s: float = 0.05,
        idle_close_grace: timedelta = timedelta(seconds=1),
        dedupe_capacity: int = 50_000,
        metrics: CalculationMetrics,
        cache: LatestResults,
        batch_size: int | None = None,
    ) -> None:
        self._runtime = runtime
        self._redis = runtime.redis
        self._source = runtime.service
        self.checkpoint_key = checkpoint_key
        self._store = CheckpointStore(self._redis, checkpoint_key, part_bytes=checkpoint_part_bytes)
        self.ring = RecentIdsLog(self._redis, checkpoint_key, part_bytes=checkpoint_part_bytes)
        self._checkpoint_interval = checkpoint_interval_s
        self._advance_interval = advance_interval_s
        self._metrics = metrics
        self._cache = cache
        self.engine = KPIEngine(
            clock=utcnow, idle_close_grace=idle_close_grace, dedupe_capacity=dedupe_capacity
        )
        self.merger: StreamMerger[Held] = new_merger()
        self.consumer: DurableConsumer = runtime.consume(
            list(INPUT_CHANNELS),
            self.handle,
            group=GROUP,
            consumer=consumer_name,
            auto_ack=False,
            batch_size=batch_size,
            lazy_events=True,
            checkpointed=True,
        )
        self._decoder = EntityEventDecoder()
        self._unpublished: list[tuple[KPIResult, list[Event], str]] = []
        self._dirty = False
        self._close_pending = asyncio.Event()
        self._exported: dict[tuple[str, str], int] = {}  # (kpi_code, counter): count exported
        self.suppress: ResultFilter = lambda _: False
        """Set by the backfill manager: live results it will produce itself."""
        self.extra_checkpoint: Callable[[], dict[str, Any]] = dict
        self.origins: dict[str, str] = {}
        """Where each running definition came from (`registry.Origin`), as `set_definitions`
        was told; after `load_checkpoint`, as the checkpoint recorded it (possibly nothing)."""
        self.events_processed = 0
        self.invalid_events = 0
        self.checkpoints = 0
        self.restored = False

    # -- definitions -----------------------------------------------------------------------
    def set_definitions(
        self,
        definitions: Iterable[VersionedKPIDefinition],
        origins: Mapping[str, str] | None = None,
    ) -> tuple[list[str], list[str]]:
        """Hot reload: returns (new or changed codes, removed codes) of streaming KPIs.

        `origins` (code -> origin) goes into the checkpoint with the definitions: a restart
        treats a definition by where it came from (`registry.DefinitionRegistry.restore`)."""
        before = self.engine.definitions
        self.engine.set_definitions(definitions)
        after = self.engine.definitions
        changed = sorted(code for code, d in after.items() if before.get(code) != d)
        removed = sorted(code for code in before if code not in after)
        for code in removed:
            self._cache.forget(code)
        known = origins or {}
        running_origins = {code: known[code] for code in sorted(after) if code in known}
        if running_origins != self.origins:
            self.origins = running_origins
            self._dirty = True
        if changed or removed:
            self._dirty = True
            log.info("definitions applied", extra={"changed": changed, "removed": removed})
        return changed, removed

    def mark_dirty(self) -> None:
        """Have the next checkpoint written although the engine's state did not change (what
        `extra_checkpoint` returns did)."""
        self._dirty = True

    # -- events ----------------------------------------------------------------------------
    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        merger = self.merger
        batch = DeliveryBatch.of(deliveries)
        merger.offer_many(zip(batch.channels, batch.ids, batch.envelopes, strict=True))
        self._process(merger.release())
        self._metrics.buffered.set(merger.buffered)
        self.collect_results()
        await self.flush_results()
        if merger.buffered and self._closing_held():
            # Held back in the merger (their millisecond may still get entries on the other
            # stream) are events that close a window: check at once instead of at the next
            # tick whether the streams are complete past them, so the result is out sooner.
            self._close_pending.set()

    def _closing_held(self) -> bool:
        """Whether events held back in the merger would close a window."""
        closes_by = self.engine.closes_by
        return any(closes_by(_published(held)) for held in self.merger.newest_buffered())

    def _process(self, released: list[tuple[str, Held]]) -> None:
        if not released:
            return
        decode = self._decoder.decode
        feed = self.engine.feed
        invalid = 0
        for channel, envelope in released:
            try:
                fields = decode(envelope, channel)
            except InvalidEntityEvent as exc:
                invalid += 1
                if invalid == 1:
                    log.warning(
                        "skipping an invalid entity event",
                        extra={"event_id": envelope["event_id"], "error": str(exc)[:200]},
                    )
                continue
            feed(fields)
        processed = len(released) - invalid
        self.events_processed += processed
        self.invalid_events += invalid
        self._metrics.events.inc(processed)
        if invalid:
            self._metrics.invalid_events.inc(invalid)
        self._dirty = True

    # -- results ---------------------------------------------------------------------------
    def collect_results(self) -> None:
        """Move the engine's closed windows to the publish queue (minus suppressed ones)."""
        results = self.engine.drain_results()
        if results:
            self.queue_results(results, origin="live")

    def queue_results(
        self,
        results: Iterable[KPIResult],
        *,
        origin: str,
        version_since: Callable[[KPIResult], datetime | None] | None = None,
    ) -> None:
        """Queue results for publishing; `version_since` tells where a result's definition
        version begins (a backfill's results carry it)."""
        now = utcnow()
        for result in results:
            if origin == "live" and self.suppress(result):
                continue
            self._cache.add(result)
            since = None if version_since is None else version_since(result)
            events = result_events(result, source=self._source, now=now, version_since=since)
            self._unpublished.append((result, events, origin))
        self._dirty = True

    async def flush_results(self) -> None:
        """Publish queued results now; on a Redis error they stay queued (the checkpoint
        publishes them in its MULTI at the latest)."""
        if not self._unpublished:
            return
        batch, self._unpublished = self._unpublished, []
        try:
            await self._runtime.publisher.publish_events([e for _, evs, _ in batch for e in evs])
        except REDIS_ERRORS as exc:
            log.warning("results not published yet, will retry", extra={"error": str(exc)[:200]})
            self._unpublished = batch + self._unpublished
            return
        self._observe_published(batch)

    def _observe_published(self, batch: list[tuple[KPIResult, list[Event], str]]) -> None:
        now = datetime.now(UTC)
        definitions = self.engine.definitions
        for result, _, origin in batch:
            self._metrics.results.labels(result.kpi_code, origin).inc()
            if origin != "live":
                continue
            definition = definitions.get(result.kpi_code)
            if definition is None or definition.window is None:
                continue
            close = result.window_end + definition.window.allowed_lateness
            self._metrics.freshness.labels(result.kpi_code).observe(
                max(0.0, (now - close).total_seconds())
            )

    # -- idle close ------------------------------------------------------------------------
    async def caught_up_time(self) -> datetime | None:
        """The Redis time as of which every input stream has been fully received, or None.

        Also tells the merger (so a quiet stream does not hold the other one back)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.time()
        for channel in INPUT_CHANNELS:
            pipe.xrevrange(channels.stream_key(channel), count=1)
        reply = await pipe.execute()
        seconds, micros = reply[0]
        redis_now = datetime.fromtimestamp(int(seconds) + int(micros) / 1e6, UTC)
        redis_ms = int(seconds) * 1000 + int(micros) // 1000
        all_caught_up = True
        for channel, last in zip(INPUT_CHANNELS, reply[1:], strict=True):
            if last and parse_stream_id(last[0][0]) > self.merger.delivered(channel):
                all_caught_up = False
                continue
            self.merger.mark_caught_up(channel, redis_ms)
        return redis_now if all_caught_up else None

    async def advance_once(self) -> bool:
        """Release what the streams' completeness allows, close idle windows; True when every
        stream was caught up."""
        now = await self.caught_up_time()
        self._process(self.merger.release())
        self._metrics.buffered.set(self.merger.buffered)
        if now is not None:
            # what is still buffered was stored in the current millisecond: published at
            # `now` (give or take clock skew, which the idle grace covers)
            self.engine.advance(now)
        self.collect_results()
        await self.flush_results()
        return now is not None

    async def advance_loop(self) -> None:
        """Idle-close path every ~50 ms, sooner when a window is ready to close."""
        await self.consumer.ready.wait()
        retries = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._close_pending.wait(), self._advance_interval)
            self._close_pending.clear()
            try:
                caught_up = await self.advance_once()
                if caught_up and self._closing_held() and retries < EAGER_RETRIES:
                    # still held: they were stored in the millisecond of the check; the next
                    # one releases them
                    retries += 1
                    await asyncio.sleep(0.001)
                    self._close_pending.set()
                else:
                    retries = 0
            except REDIS_ERRORS as exc:
                log.warning("redis unavailable in the advance loop", extra={"error": str(exc)})
                await asyncio.sleep(0.5)

    async def checkpoint_loop(self) -> None:
        """A checkpoint every ~1 s. A task of its own: while one is in flight (~0.1 s at 20k
        events/s: 2 MB and 20k acknowledgements), windows still close on the advance loop."""
        await self.consumer.ready.wait()
        while True:
            await asyncio.sleep(self._checkpoint_interval)
            try:
                self.update_kpi_counters()
                await self.checkpoint()
            except REDIS_ERRORS as exc:
                log.warning("redis unavailable for a checkpoint", extra={"error": str(exc)})
                await asyncio.sleep(0.5)

    def update_kpi_counters(self) -> None:
        """Export the engine's per-KPI counters (monotonic since the engine started) as
        Prometheus counters: what they gained since the last export."""
        metrics = self._metrics
        for code, counters in self.engine.stats().kpis.items():
            late = metrics.late_events.labels(code)
            self._export(code, "late_events", counters.late_events, late)
            for counter, issue in EVENT_ISSUES.items():
                count = getattr(counters, counter)
                self._export(code, counter, count, metrics.event_issues.labels(code, issue))

    def _export(self, code: str, counter: str, count: int, metric: Any) -> None:
        seen = self._exported.get((code, counter), 0)
        if count > seen:
            metric.inc(count - seen)
            self._exported[code, counter] = count

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint_data(self) -> tuple[bytes, RingWrite]:
        """The checkpoint's value, and what it writes of the dedupe ring (`recent_ids_log`)."""
        ring = self.ring.plan(self.engine)
        data = {
            "format": CHECKPOINT_FORMAT,
            "saved_at": utcnow().isoformat(),
            "definitions": [
                d.model_dump(mode="json") for _, d in sorted(self.engine.definitions.items())
            ],
            "definition_origins": self.origins,
            "engine": self.engine.snapshot(recent_ids=False),
            "recent_ids": ring.manifest.to_json(),
            "released": {c: format_stream_id(s) for c, s in self.merger.released().items()},
            **self.extra_checkpoint(),
        }
        return orjson.dumps(data), ring

    async def checkpoint(self) -> None:
        """Snapshot + unpublished results in one MULTI (see the module docstring)."""
        if not self._dirty and not self._unpublished:
            return
        started = time.perf_counter()
        await self.ring.check_stored()
        data, ring = self.checkpoint_data()
        released = self.merger.released()
        pending, self._unpublished = self._unpublished, []
        self._dirty = False
        events = [e for _, evs, _ in pending for e in evs]
        pipe = self._redis.pipeline(transaction=True)
        if events:
            self._runtime.publisher.add_to_pipeline(pipe, events)
        parts = self._store.add_to_pipeline(pipe, data)
        self.ring.add_to_pipeline(pipe, ring)
        # where a restart rewinds to: stream retention keeps what comes after (core.retention)
        for channel, position in released.items():
            pipe.hset(channels.stream_hold_key(channel), GROUP, format_stream_id(position))
        try:
            await pipe.execute()
        except BaseException:
            self._unpublished = pending + self._unpublished
            self._dirty = True
            raise
        self._store.written(parts)
        self.ring.written(ring)
        self.checkpoints += 1
        if pending:
            self._observe_published(pending)
        self._metrics.checkpoint_seconds.observe(time.perf_counter() - started)
        if events:
            await self._runtime.publisher.wait_for_room({e.event_type for e in events})
        self._metrics.checkpoint_bytes.set(len(data) + ring.bytes)

    async def load_checkpoint(self) -> dict[str, Any] | None:
        """Restore the engine from the last checkpoint and rewind the streams to the position
        it covers (call before consuming starts; without a checkpoint, to their start).

        Returns the checkpoint's extra sections (backfill jobs) or None without a checkpoint.
        """
        raw = await self._store.load()
        if raw is None:
            await self._drop_strays()
            await self.consumer.rewind({})
            return None
        data: dict[str, Any] = orjson.loads(raw)
        if data.get("format") != CHECKPOINT_FORMAT:
            raise RuntimeError(f"unsupported checkpoint format {data.get('format')!r}")
        definitions = [VersionedKPIDefinition.model_validate(d) for d in data["definitions"]]
        self.engine.set_definitions(definitions)
        # absent from checkpoints written before origins were recorded (`registry` infers them)
        recorded = data.get("definition_origins")
        self.origins = (
            {str(c): o for c, o in recorded.items() if isinstance(o, str)}
            if isinstance(recorded, dict)
            else {}
        )
        self.engine.restore(data["engine"])
        if "recent_ids" in data:  # else in the snapshot (written before the ring had its own)
            manifest = RingManifest.from_json(data["recent_ids"])
            try:
                self.engine.restore_recent(await self.ring.load(manifest), manifest.end)
            except CorruptCheckpoint as exc:
                # the windows are whole; what is lost is the guard against a producer's retried
                # duplicates among the last ids, which is no reason to stay down
                log.error("dedupe ring not restored: starting it empty", extra={"error": str(exc)})
                self.engine.restore_recent([], manifest.end)
        await self._drop_strays()
        positions: dict[str, str] = data.get("released", {})
        self.merger = new_merger({c: parse_stream_id(s) for c, s in positions.items()})
        await self.consumer.rewind(positions)
        self.restored = True
        log.info(
            "checkpoint restored",
            extra={"saved_at": data.get("saved_at"), "kpis": len(definitions)},
        )
        return data

    async def _drop_strays(self) -> None:
        """Delete the keys under the checkpoint's that it does not list: parts and ring chunks
        are deleted as checkpoints stop needing them, but those of a checkpoint deleted by hand
        (or of a version that numbered them otherwise) would stay for good."""
        keep = self._store.stored_keys() | self.ring.stored_keys()
        dropped = await delete_strays(self._redis, f"{self.checkpoint_key}:", keep)
        if dropped:
            log.info("deleted keys no checkpoint lists", extra={"keys": dropped})

    async def shutdown(self) -> None:
        """Final checkpoint (consumers have stopped by now)."""
        self.collect_results()
        with contextlib.suppress(*REDIS_ERRORS):
            await self.flush_results()
            await self.checkpoint()

    def status(self) -> Mapping[str, Any]:
        stats = self.engine.stats()
        return {
            "events_processed": self.events_processed,
            "invalid_events": self.invalid_events,
            "duplicates": stats.duplicates,
            "open_windows": stats.open_windows,
            "watermark": stats.watermark.isoformat() if stats.watermark else None,
            "buffered": self.merger.buffered,
            "checkpoints": self.checkpoints,
        }
