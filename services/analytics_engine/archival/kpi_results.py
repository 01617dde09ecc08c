"""Archive `archive.kpi_results` to `kpi_results/kpi_code=<c>/date=<d>/<batch>.parquet`,
each result at most once, although the bus delivers at least once.

Why a protocol is needed: results arrive one per event and are written in batches, so a file
cannot have a name derived from its content, and a result can be delivered twice (a crash
between the PUT and the XACK re-delivers the whole batch; the database may forward a rare
duplicate). Redis keeps two records next to the stream:

* the *ledger*: per partition `(kpi_code, date)`, a hash of the fingerprints of the results
  already in the lake (`ae:archival:seen:{code}:{date}`, expiring `ARCHIVAL_DEDUP_TTL` after its
  last write). A fingerprint is the result key `(kpi_code, window_start, window_end,
  dimensions)` plus its value, sample count and definition version (`layout.result_fingerprint`).
* *intents*: `ae:archival:intents`, batch name -> the object keys a flush is about to write.

A flush (batch full: `ARCHIVAL_BATCH_ROWS`; its oldest result waited `ARCHIVAL_FLUSH_INTERVAL`;
or a quarter batch is in hand and nothing more came for `QUIET_FLUSH_S`, as at a backlog's end)
then does:

1. if the batch holds re-delivered entries (or an earlier flush of ours failed half-way),
   *resolve* intents first (see below), so whatever an interrupted flush wrote is in the ledger;
2. drop results whose fingerprint is in the ledger, or repeated within the batch;
3. write the intent (batch name, object keys), then PUT one Parquet file per partition;
4. in ONE MULTI/EXEC: add the fingerprints to the ledger, XACK every entry of the batch
   (dropped duplicates included) and delete the intent (`DurableConsumer.ack_ids(..., also=...)`).

In the steady state a flush runs in the background while the consumer reads and parses the next
batches (at most one flush at a time, at most two flushes' worth buffered); the steps and their
order are the same, so what is acknowledged is still exactly what is durable.

Resolving an intent: for each object it names, if the object exists, read it back and add its
fingerprints to the ledger; then delete the intent. Either the PUT landed (its rows are now known,
re-delivered copies are dropped at step 2) or it did not (the re-delivered entries are written
again). Because step 4 is atomic, a crash anywhere leaves one of: nothing written (entries
pending, intent maybe present: resolved to nothing), objects written but unacknowledged (intent
present: resolved into the ledger), or everything committed. On start the service resolves its
own intents and those older than `BUS_CLAIM_IDLE_MS` (their owner is gone), before consuming;
intents are dated and judged by Redis's clock (`Ledger.now`), not by the replicas' own.
A fresh intent of another replica whose objects are not all written is never deleted: that
replica may be between its PUTs and its step 4, and had it died there, what it wrote would be
unknown to the ledger; such an intent is settled once all its objects exist, or once it is stale.

While results wait in the buffer (while S3 is down or slow, and while a flush holds them), their
stream entries are kept "fresh" with `XCLAIM ... JUSTID` (which does not count a delivery), once
the oldest has waited a third of `BUS_CLAIM_IDLE_MS`, so the bus neither re-delivers them
nor dead-letters them after `BUS_MAX_DELIVERIES`, nor hands them to a peer replica. When the
buffer is full and S3 is down the handler raises `TransientError`: consumption pauses (bounded
memory) and resumes when S3 is back. Nothing is ever dead-lettered because of an outage; only
payloads that can never be archived (no kpi_code, bad times) are.

Residual race (documented, not handled): two replicas could both write a result if one claims
entries another still holds, which the keep-alive above prevents unless a replica stalls for
longer than `BUS_CLAIM_IDLE_MS` in the middle of a flush.

Compaction (`compaction.py`, `compactor.py`) later merges the small files of old partitions
into `compacted-<uuid>.parquet` objects. It leaves alone every object an open intent names (its
resolution reads them back), and the ledger holds fingerprints, not object keys, so merging
changes nothing above: a result re-delivered after its file was merged is still dropped.
Between a merged object's PUT and the deletion of the files it replaces (milliseconds) a reader
listing the partition can see those rows twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import pyarrow as pa

from analytics_engine.archival.kpi_columns import KpiChunk, parse_kpi_results
from analytics_engine.archival.layout import kpi_object_key, new_batch_name
from analytics_engine.archival.ledger import Intent, Ledger, PlannedObject
from analytics_engine.archival.tables import (
    KpiRow,
    fingerprints_of,
    from_parquet,
    lake_order,
    to_parquet,
)
from analytics_engine.core.bus import (
    REDIS_ERRORS,
    DeliveryBatch,
    encode_event,
    ids_by_channel,
    redis_outage_is_transient,
)
from analytics_engine.core.errors import TransientError, describe_error

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from analytics_engine.archival.s3 import ObjectStore
    from analytics_engine.core.bus import DeadLetters, Delivery, DurableConsumer

log = logging.getLogger(__name__)

Partition = tuple[str, str]
QUIET_FLUSH_S = 0.25
"""A buffer of a quarter batch or more is flushed once no result came for this long."""
Hook = Callable[[Sequence[str]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ArchivalHooks:
    """Test seams: called with the object keys of a flush right before / after the PUTs."""

    before_put: Hook | None = None
    after_put: Hook | None = None


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FlushPlan(Generic[T]):
    """What one flush writes (pure result of dedup)."""

    partitions: dict[Partition, list[T]]
    dropped: int


def plan_positions(
    fingerprints: Sequence[bytes], partitions: Sequence[Partition], archived: set[bytes]
) -> FlushPlan[int]:
    """Positions of the new results, grouped by partition; those archived already or repeated
    in the batch are dropped."""
    seen = set(archived)
    grouped: dict[Partition, list[int]] = {}
    dropped = 0
    for position, (fingerprint, partition) in enumerate(zip(fingerprints, partitions, strict=True)):
        if fingerprint in seen:
            dropped += 1
            continue
        seen.add(fingerprint)
        group = grouped.get(partition)
        if group is None:
            grouped[partition] = group = []
        group.append(position)
    return FlushPlan(grouped, dropped)


def plan_flush(rows: Sequence[KpiRow], archived: set[bytes]) -> FlushPlan[KpiRow]:
    """`plan_positions` over row objects."""
    plan = plan_positions(
        [r.fingerprint for r in rows], [(r.kpi_code, r.day) for r in rows], archived
    )
    return FlushPlan(
        {part: [rows[i] for i in positions] for part, positions in plan.partitions.items()},
        plan.dropped,
    )


def new_positions(ids: Sequence[bytes], held: Mapping[bytes, object]) -> Sequence[int]:
    """Positions of the ids neither in `held` nor seen earlier in `ids` (a redelivery while
    buffered, or an id twice in a batch); the usual batch of new ids is checked in C."""
    if held.keys().isdisjoint(ids) and len(set(ids)) == len(ids):
        return range(len(ids))
    fresh: list[int] = []
    seen: set[bytes] = set()
    for position, entry_id in enumerate(ids):
        if entry_id in held or entry_id in seen:
            continue
        seen.add(entry_id)
        fresh.append(position)
    return fresh


def candidates_of(
    fingerprints: Sequence[bytes], partitions: Sequence[Partition]
) -> dict[Partition, list[bytes]]:
    """Fingerprints grouped by partition (what to look up in the ledger)."""
    grouped: dict[Partition, list[bytes]] = {}
    for fingerprint, partition in zip(fingerprints, partitions, strict=True):
        group = grouped.get(partition)
        if group is None:
            grouped[partition] = group = []
        group.append(fingerprint)
    return grouped


class KpiResultArchiver:
    def __init__(
        self,
        *,
        store: ObjectStore,
        ledger: Ledger,
        dead_letters: DeadLetters,
        channel: str,
        group: str,
        owner: str,
        batch_rows: int,
        flush_interval_s: float,
        claim_idle_s: float,
        compression_level: int | None = None,
        hooks: ArchivalHooks | None = None,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._dead = dead_letters
        self._channel = channel
        self._group = group
        self._owner = owner
        self._batch_rows = batch_rows
        self._interval = flush_interval_s
        self._claim_idle = claim_idle_s
        self._level = compression_level
        self._hooks = hooks or ArchivalHooks()
        # Entries held until a flush makes them durable (id -> channel) and their results, in
        # order. Only ids are kept, not the deliveries: their events would pin ~6 objects per
        # result for the garbage collector to walk again and again (measured: a third of CPU).
        self._held: dict[bytes, str] = {}
        self._chunks: list[KpiChunk] = []
        self._oldest: float | None = None
        self._last_touch = 0.0
        self._last_handled = 0.0
        self._handling = False
        self._lock = asyncio.Lock()
        self._behind: asyncio.Task[None] | None = None  # a flush running while reading goes on
        self._behind_failed = False
        self._needs_resolution = True
        self._consumer: DurableConsumer | None = None
        self.rows_written = 0
        self.files_written = 0
        self.duplicates_dropped = 0

    def attach(self, consumer: DurableConsumer) -> None:
        self._consumer = consumer

    @property
    def buffered(self) -> int:
        return len(self._held)

    # -- consumer side -----------------------------------------------------------------------
    async def handle(self, deliveries: Sequence[Delivery]) -> None:
        """Buffer the batch; flush when the buffer is full or old. Never acknowledges here:
        entries are acknowledged by the flush that made them durable."""
        self._handling = True  # a handler waiting on a flush is not a quiet stream
        try:
            await self._buffer(deliveries)
        finally:
            self._handling = False
            self._last_handled = time.monotonic()

    async def _buffer(self, deliveries: Sequence[Delivery]) -> None:
        batch = DeliveryBatch.of(deliveries)
        ids, channels, payloads = batch.ids, batch.channels, batch.payloads
        if any(attempt > 1 for attempt in batch.attempts):
            self._needs_resolution = True
        held = self._held
        fresh = new_positions(ids, held)  # positions of the entries not in hand already
        if len(fresh) < len(ids):
            payloads = [payloads[i] for i in fresh]
        parsed = parse_kpi_results(payloads)
        rejected = dict(parsed.rejected)
        if not rejected and len(fresh) == len(ids):
            held.update(zip(ids, channels, strict=True))
        else:
            for position, index in enumerate(fresh):
                if position not in rejected:
                    held[ids[index]] = channels[index]
        self._chunks.extend(parsed.chunks)
        if held and self._oldest is None:
            self._oldest = time.monotonic()
        if rejected:
            await self._dead_letter([(batch[fresh[i]], reason) for i, reason in rejected.items()])
        if self._due():
            await self._flush_behind()

    async def _flush_behind(self) -> None:
        """Flush while the consumer reads on: the ledger, Parquet, S3 and acknowledgement round
        trips of one flush overlap the parsing of the next batches (acknowledged, as ever, only
        by the flush that made them durable).

        Memory stays bounded: with two flushes' worth buffered, wait for the running one. And
        failures are handled as they were: after a background flush failed, or while recovering
        (re-delivered entries, intents to resolve), flushes run in the handler, so a failure
        reaches the bus with the batch in hand (`TransientError`: retried with backoff, no
        reading meanwhile; anything else: isolated event by event)."""
        task = self._behind
        if task is not None:
            if not task.done() and len(self._held) < 2 * self._batch_rows:
                return
            self._behind = None
            await self._settle_behind(task)
        if self._behind_failed or self._needs_resolution or len(self._held) >= 2 * self._batch_rows:
            await self.flush()
            self._behind_failed = False
            return
        self._behind = asyncio.create_task(self.flush(), name="archive-flush-behind")

    async def _settle_behind(self, task: asyncio.Task[None]) -> None:
        """Wait for a background flush; a failure is logged and sends the next flush to the
        handler (`_flush_behind`)."""
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                raise  # we are cancelled, not the flush
            self._behind_failed = True
        except Exception as exc:
            self._behind_failed = True
            log.warning(
                "background archive flush failed", extra={"error": describe_error(exc, limit=200)}
            )

    @property
    def _flushing_behind(self) -> bool:
        return self._behind is not None and not self._behind.done()

    def _due(self) -> bool:
        if not self._held:
            return False
        if len(self._held) >= self._batch_rows:
            return True
        now = time.monotonic()
        if self._oldest is not None and now - self._oldest >= self._interval:
            return True
        # Nothing more came for a moment and a file's worth is in hand (a backlog's tail):
        # write it now, not a flush interval later. A trickle below that still waits for the
        # interval; bursts of a quarter batch or more make a file each (at most 4x as many).
        return (
            len(self._held) >= self._batch_rows // 4
            and not self._handling
            and now - self._last_handled >= QUIET_FLUSH_S
        )

    async def _dead_letter(self, bad: Sequence[tuple[Delivery, str]]) -> None:
        def add(pipe: Pipeline) -> None:
            for delivery, reason in bad:
                self._dead.add_to_pipeline(
                    pipe,
                    channel=delivery.channel,
                    reason=f"unarchivable kpi result: {reason}",
                    original=encode_event(delivery.event),
                    kind="event",
                    stream_id=delivery.id,
                )

        await self._ack([d for d, _ in bad], add)
        log.warning("dead-lettered unarchivable kpi results", extra={"count": len(bad)})

    async def _ack(
        self, deliveries: Sequence[Delivery], also: Callable[[Pipeline], None] | None
    ) -> None:
        await self._ack_ids(ids_by_channel((d.id, d.channel) for d in deliveries), also)

    async def _ack_ids(
        self, ids: Mapping[str, Sequence[bytes]], also: Callable[[Pipeline], None] | None
    ) -> None:
        if self._consumer is None:
            raise RuntimeError("KpiResultArchiver.attach(consumer) was not called")
        with redis_outage_is_transient():
            await self._consumer.ack_ids(ids, also=also)

    # -- flushing ----------------------------------------------------------------------------
    async def flush(self) -> None:
        """Write the buffer to the lake (steps 1-4 of the module docstring)."""
        async with self._lock:
            try:
                await self._flush_locked()
            except TransientError:
                self._needs_resolution = True  # our intent may name objects that did land
                raise
            except asyncio.CancelledError:
                # Torn down mid-flush (shutdown): the next flush, or the next start, settles
                # the intent this one may have left.
                self._needs_resolution = True
                raise
            except Exception:
                # A bug or a payload the writer chokes on: do not wedge the buffer. The entries
                # stay pending; the bus re-delivers them one by one and dead-letters the culprit.
                self._held.clear()
                self._chunks.clear()
                self._oldest = None
                self._needs_resolution = True
                raise

    async def _flush_locked(self) -> None:
        if not self._held:
            return
        if self._needs_resolution:
            await self.resolve(everything=True)
            self._needs_resolution = False
        held = list(self._held.items())
        settled = ids_by_channel(held)
        chunks = list(self._chunks)
        fingerprints = list(itertools.chain.from_iterable(c.fingerprints for c in chunks))
        partitions = list(itertools.chain.from_iterable(c.partitions for c in chunks))
        archived = await self._ledger.archived(candidates_of(fingerprints, partitions))
        plan = plan_positions(fingerprints, partitions, archived)
        if not plan.partitions:
            await self._ack_ids(settled, None)
            self._forget(held, len(chunks), plan.dropped, 0)
            return
        batch = new_batch_name()
        objects = {
            part: PlannedObject(kpi_object_key(part[0], part[1], batch), part[0], part[1])
            for part in plan.partitions
        }
        table = pa.concat_tables([c.table for c in chunks])
        bodies = {
            part: to_parquet(
                lake_order(table.take(pa.array(positions, pa.int64()))),
                compression_level=self._level,
            )
            for part, positions in plan.partitions.items()
        }
        keys = [o.object_key for o in objects.values()]
        created_at = await self._ledger.now()
        await self._ledger.write_intent(
            Intent(batch, self._owner, created_at, tuple(objects.values()))
        )
        if self._hooks.before_put is not None:
            await self._hooks.before_put(keys)
        results = await asyncio.gather(
            *(self._store.put(objects[part].object_key, body) for part, body in bodies.items()),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for failure in failures:
                if not isinstance(failure, Exception):
                    raise failure
            first = failures[0]
            if isinstance(first, TransientError):
                raise first
            raise TransientError(f"S3 write failed: {first}") from first
        if self._hooks.after_put is not None:
            await self._hooks.after_put(keys)

        def commit(pipe: Pipeline) -> None:
            for part, positions in plan.partitions.items():
                self._ledger.record(pipe, part, [fingerprints[i] for i in positions])
            self._ledger.drop_intent(pipe, batch)

        await self._ack_ids(settled, commit)
        written = sum(len(p) for p in plan.partitions.values())
        self.files_written += len(objects)
        self._forget(held, len(chunks), plan.dropped, written)
        log.debug("archived kpi results", extra={"rows": written, "files": len(objects)})

    def _forget(
        self, held: Sequence[tuple[bytes, str]], chunks: int, dropped: int, written: int
    ) -> None:
        """Drop what a flush settled (results buffered meanwhile stay)."""
        for entry_id, _ in held:
            self._held.pop(entry_id, None)
        del self._chunks[:chunks]
        self._oldest = time.monotonic() if self._held else None
        self.rows_written += written
        self.duplicates_dropped += dropped

    async def resolve(self, *, everything: bool) -> int:
        """Settle write-ahead intents: our own and stale ones (older than `BUS_CLAIM_IDLE_MS`:
        their owner is gone); with `everything`, a peer's fresh ones too, as far as their objects
        exist. A fresh intent of a peer whose objects are not all there yet is kept: the peer
        may be writing them right now, and dropping its intent would leave what lands unknown to
        the ledger if that peer then died before acknowledging. Returns how many were dropped.
        """
        settled = 0
        cutoff = await self._ledger.now() - self._claim_idle
        for intent in await self._ledger.intents():
            ours_or_stale = intent.owner == self._owner or intent.created_at < cutoff
            if not (everything or ours_or_stale):
                continue
            found: dict[Partition, list[bytes]] = {}
            complete = True
            for obj in intent.objects:
                data = await self._store.get(obj.object_key)
                if data is None:
                    complete = False
                    continue
                found.setdefault((obj.kpi_code, obj.day), []).extend(
                    fingerprints_of(from_parquet(data))
                )
            if not (complete or ours_or_stale):
                await self._ledger.settle(intent, found, drop=False)
                continue
            await self._ledger.settle(intent, found)
            settled += 1
            log.info(
                "resolved an archival intent",
                extra={"batch": intent.batch, "objects_found": sum(map(len, found.values()))},
            )
        return settled

    # -- lifecycle ---------------------------------------------------------------------------
    async def recover(self) -> None:
        """On start: settle intents left by an earlier life of this instance or a dead peer.

        S3 or Redis being down must not stop the service from starting: the first flush
        resolves instead (`_needs_resolution` stays set)."""
        try:
            await self.resolve(everything=False)
        except TransientError as exc:
            log.warning("could not resolve intents at start", extra={"error": str(exc)[:200]})

    async def run_timer(self) -> None:
        """Background loop: flush quiet buffers, keep held entries fresh while S3 is down."""
        backoff = 0.1
        tick = min(self._interval / 2, QUIET_FLUSH_S)
        while True:
            await asyncio.sleep(tick)
            if self._held_long():
                # a flush that takes long (a slow S3): left idle, what it holds would be
                # claimed as abandoned, each claim a delivery, until dead-lettered and
                # acknowledged while it is only in memory
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._keep_alive()
            if not self._due() or self._flushing_behind or self._lock.locked():
                continue
            try:
                await self.flush()
                backoff = 0.1
            except TransientError as exc:
                log.warning("archive flush failed, will retry", extra={"error": str(exc)[:200]})
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._keep_alive()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _held_long(self) -> bool:
        """Whether the buffer's oldest entry has waited a third of `BUS_CLAIM_IDLE_MS`."""
        return self._oldest is not None and time.monotonic() - self._oldest >= self._claim_idle / 3

    async def _keep_alive(self) -> None:
        if self._consumer is None or not self._held:
            return
        if time.monotonic() - self._last_touch < self._claim_idle / 3:
            return
        self._last_touch = time.monotonic()
        await self._consumer.keep_alive(ids_by_channel(self._held.items()))

    async def close(self, *, timeout: float = 10.0) -> None:
        """Final flush on graceful shutdown; what it cannot write stays pending in the stream."""
        task, self._behind = self._behind, None
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settle_behind(task), timeout)
        if not self._held:
            return
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except (TransientError, TimeoutError) as exc:
            log.warning(
                "final archive flush failed; entries stay pending",
                extra={"error": str(exc)[:200], "buffered": len(self._held)},
            )
