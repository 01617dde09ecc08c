"""Durable consumption: a service reads its channels' streams through a consumer group
(at-least-once, shared by replicas, surviving restarts), hands batches to its handler and
acknowledges them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import ResponseError

from analytics_engine.core.bus.deliveries import (
    BatchHandler,
    Delivery,
    DeliveryBatch,
    decode_entries,
    decode_lazily,
)
from analytics_engine.core.bus.publisher import encode_event
from analytics_engine.core.bus.streams import REDIS_ERRORS, Entry, ids_by_channel, read_group
from analytics_engine.core.channels import channel_spec, stream_key
from analytics_engine.core.errors import InvalidEvent, TransientError, describe_error
from analytics_engine.core.logs import correlation_id_var

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from analytics_engine.core.bus.dead_letters import DeadLetters
    from analytics_engine.core.metrics import CoreMetrics

log = logging.getLogger(__name__)


class DurableConsumer:
    """Reads durable channels through a consumer group; replicas of one service share the work.

    - A batch is handed to `handler`; when it returns, the batch is acknowledged
      (`auto_ack=True`), or the handler acknowledges itself through `ack()` (to tie the ack to a
      checkpoint in the same transaction).
    - `TransientError` from the handler: back off and retry the same batch, never dead-letter.
    - Any other exception: retry event by event to isolate the bad one; an event failing
      `max_deliveries` times, or one that does not parse, goes to the dead-letter stream.
    - Pending entries of a dead consumer are claimed after `claim_idle_ms`; on start the consumer
      first re-reads its own pending entries (crash recovery).
    - `linger_ms`: a read that finds fewer than `batch_size` entries waits this long once and
      tops the batch up before handing it over. For handlers whose cost is mostly per batch (a
      database transaction) and whose latency nobody waits on; 0 (the default) hands over at once.
    - `lazy_events`: hand the handler `DeliveryBatch`es, for handlers that read only the
      payloads: the same checks, malformed messages dead-lettered the same way, but no `Event`
      is built unless a delivery is looked at.
    - `read_ahead`: while the handler works on a batch, the next read is already on its way (on
      another connection), so Redis assembles batch n+1 while the handler parses batch n instead
      of each waiting for the other. For backlog drains whose handler and Redis both cost CPU per
      entry. At most one batch is read ahead; it is pending like any delivered entry: on
      stop the consumer hands it to the handler if it has arrived (else cancels the read), after
      a Redis error it is dropped and re-read with the consumer's own pending entries, and after
      a crash it is re-delivered as those are. Not with `checkpointed`.
    - `checkpointed`: the handler's owner keeps the stream positions it has processed together
      with its own state (a checkpoint) instead of acknowledging entries. Reads are XREADGROUP
      NOACK, so nothing is pending per entry (the pending list and the XACKs cost Redis ~6x
      what the reads do), and before the consumer starts the owner rewinds the group to the
      positions of its last checkpoint (`rewind`): what was read after it is read again. For
      a single active reader per group (nothing to claim from peers); implies no `auto_ack`.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        channels: Sequence[str],
        group: str,
        consumer: str,
        handler: BatchHandler,
        dead_letters: DeadLetters,
        batch_size: int = 500,
        max_deliveries: int = 5,
        claim_idle_ms: int = 30_000,
        block_ms: int = 1000,
        auto_ack: bool = True,
        start_id: str = "0",
        linger_ms: int = 0,
        metrics: CoreMetrics | None = None,
        lazy_events: bool = False,
        checkpointed: bool = False,
        read_ahead: bool = False,
    ) -> None:
        for channel in channels:
            if not channel_spec(channel).durable:
                raise ValueError(f"{channel} is not a durable channel")
        self._redis = redis
        # redis-py's stream signatures are stricter than the values it returns; stream calls
        # go through this untyped alias rather than a cast at every call site.
        self._streams: Any = redis
        self.channels = tuple(channels)
        self.group = group
        self.consumer = consumer
        self._handler = handler
        self._dead = dead_letters
        self._batch = batch_size
        self._max_deliveries = max_deliveries
        self._claim_idle_ms = claim_idle_ms
        self._block_ms = block_ms
        self._auto_ack = auto_ack and not checkpointed
        self._noack = checkpointed
        self._handed_over: dict[str, str | bytes] = {}
        """`checkpointed`: per channel, the last entry id the handler has taken (or the
        position `rewind` set)."""
        self._start_id = start_id
        self._linger = linger_ms / 1000
        self._metrics = metrics
        self._lazy = lazy_events
        self._read_ahead = read_ahead and not checkpointed
        self._ahead: asyncio.Task[list[tuple[bytes, Entry]]] | None = None
        """`read_ahead`: the read of the next batch, started when the last one was handed over."""
        self._keys = {stream_key(c).encode(): c for c in self.channels}
        self._stopping = asyncio.Event()
        self._last_claim = 0.0
        self.ready = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the batch in hand, acknowledge it, then return from `run()`."""
        self._stopping.set()

    async def run(self) -> None:
        try:
            await self._run()
            await self._finish_ahead()
        finally:
            await self._drop_ahead()

    async def _run(self) -> None:
        backoff = 0.1
        recovering = True
        while not self._stopping.is_set():
            try:
                if recovering:
                    # a batch read ahead is re-read with the pending entries (if it was read)
                    await self._drop_ahead()
                    await self._ensure_groups()
                    if not self._noack:
                        await self._drain_own_pending()
                    elif self.ready.is_set() and self._handed_over:
                        # a reconnect: a read whose reply was lost moved the group past
                        # entries nobody received, so read on from what the handler has
                        await self.rewind(self._handed_over)
                    recovering = False
                    self.ready.set()
                    backoff = 0.1
                await self._poll_once()
            except REDIS_ERRORS as exc:
                log.warning("redis unavailable, retrying", extra={"error": str(exc)[:200]})
                recovering = True
                await self._sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                recovering = True  # Redis lost its data (restarted without persistence)

    async def _drop_ahead(self) -> None:
        task, self._ahead = self._ahead, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, *REDIS_ERRORS, ResponseError):
            await task

    async def _finish_ahead(self) -> None:
        """On the way out: hand over a batch read ahead if it has arrived (as `stop` finishes
        the batch in hand), else cancel the read. Entries it took without being handed over
        stay pending: re-read by this consumer's next start, or claimed by a peer."""
        task = self._ahead
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return  # `run` drops it
        self._ahead = None
        entries = task.result()
        if entries:
            with contextlib.suppress(*REDIS_ERRORS):
                await self._dispatch(entries, redelivered=False)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def rewind(self, positions: Mapping[str, str | bytes]) -> None:
        """Point the group of each channel at a checkpointed position (stream entry id; a
        channel left out: its start): the next reads deliver what follows it. Entries a reader
        left pending (one that acknowledged, before `checkpointed`) are dropped from the pending
        list: each one is at or before the position, and covered, or after it, and read again.
        """
        for channel in self.channels:
            key = stream_key(channel)
            position = positions.get(channel, "0")
            # where a reconnect rewinds to, until the handler takes something of this channel
            self._handed_over[channel] = position
            try:
                await self._redis.xgroup_create(key, self.group, id=position, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
                await self._redis.xgroup_setid(key, self.group, position)
            while pending := await self._streams.xpending_range(
                key, self.group, min="-", max="+", count=1000
            ):
                await self._redis.xack(key, self.group, *(p["message_id"] for p in pending))

    async def _ensure_groups(self) -> None:
        for key in self._keys:
            try:
                await self._redis.xgroup_create(key, self.group, id=self._start_id, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # -- reading ---------------------------------------------------------------------------
    async def _drain_own_pending(self) -> None:
        """Re-deliver what this consumer read but never acknowledged before it stopped."""
        cursor = dict.fromkeys(self._keys, b"0")
        while not self._stopping.is_set():
            read = await read_group(
                self._redis, self.group, self.consumer, cursor, count=self._batch
            )
            entries = [(key, e) for key, e in read if e[1]]
            if not entries:
                return
            for key, (entry_id, _) in entries:
                cursor[key] = entry_id
            await self._dispatch(entries, redelivered=True)

    async def _poll_once(self) -> None:
        now = time.monotonic()
        if now - self._last_claim >= self._claim_idle_ms / 1000 / 2:
            self._last_claim = now
            if not self._noack:
                await self._claim_abandoned()
            await self._update_lag()
        ahead, self._ahead = self._ahead, None
        entries = await (ahead if ahead is not None else self._read_new())
        if entries and self._read_ahead and not self._stopping.is_set():
            self._ahead = asyncio.create_task(self._read_new(), name="read-ahead")
        if entries:
            await self._dispatch(entries, redelivered=False)

    async def _read_new(self) -> list[tuple[bytes, Entry]]:
        """The next batch of entries never delivered to the group (waiting up to `block_ms`)."""
        new = dict.fromkeys(self._keys, b">")
        noack = self._noack
        entries = await read_group(
            self._redis,
            self.group,
            self.consumer,
            new,
            count=self._batch,
            block_ms=self._block_ms,
            noack=noack,
        )
        if entries and self._linger and len(entries) < self._batch:
            await self._sleep(self._linger)
            entries += await read_group(
                self._redis,
                self.group,
                self.consumer,
                new,
                count=self._batch - len(entries),
                noack=noack,
            )
        return entries

    async def _claim_abandoned(self) -> None:
        """Take over entries pending longer than `claim_idle_ms`: a dead peer's, and our own
        orphans (an XREADGROUP whose reply was lost in a reconnect delivered entries we never
        saw). Consumers that hold entries on purpose keep them fresh with `keep_alive`."""
        for key in self._keys:
            pending = await self._streams.xpending_range(
                key, self.group, min="-", max="+", count=self._batch, idle=self._claim_idle_ms
            )
            ids = [p["message_id"] for p in pending]
            if not ids:
                continue
            claimed = await self._streams.xclaim(
                key, self.group, self.consumer, self._claim_idle_ms, ids
            )
            entries: list[Entry] = [e for e in claimed if e[1]]
            if entries:
                log.info("claimed abandoned events", extra={"count": len(entries)})
                await self._dispatch([(key, e) for e in entries], redelivered=True)

    async def keep_alive(self, ids_by_channel: Mapping[str, Sequence[bytes]]) -> None:
        """Reset the idle time of entries this consumer still holds (buffered for a later
        acknowledgement, `ack_ids`), so peers do not claim them and their delivery count stays
        put (XCLAIM JUSTID does not count a delivery)."""
        for channel, ids in ids_by_channel.items():
            if ids:
                await self._streams.xclaim(
                    stream_key(channel), self.group, self.consumer, 0, list(ids), justid=True
                )

    async def _update_lag(self) -> None:
        if self._metrics is None:
            return
        for key, channel in self._keys.items():
            for info in await self._redis.xinfo_groups(key):
                if info.get("name") in (self.group, self.group.encode()):
                    lag = info.get("lag")
                    if lag is not None:
                        self._metrics.consumer_lag.labels(channel, self.group).set(lag)

    async def lag(self) -> dict[str, int]:
        """Entries of each channel not yet delivered to this group (for heartbeats)."""
        out: dict[str, int] = {}
        for key, channel in self._keys.items():
            try:
                groups = await self._redis.xinfo_groups(key)
            except ResponseError:
                continue
            for info in groups:
                if info.get("name") in (self.group, self.group.encode()):
                    out[channel] = int(info.get("lag") or 0)
        return out

    # -- handling --------------------------------------------------------------------------
    async def _attempts(self, key: bytes, ids: list[bytes]) -> dict[bytes, int]:
        if not ids:
            return {}
        pending = await self._redis.xpending_range(
            key, self.group, min=min(ids), max=max(ids), count=len(ids) * 2
        )
        return {cast(bytes, p["message_id"]): int(p["times_delivered"]) for p in pending}

    async def _dispatch(self, entries: list[tuple[bytes, Entry]], *, redelivered: bool) -> None:
        attempts: dict[bytes, int] = {}
        if redelivered:
            by_key: dict[bytes, list[bytes]] = {}
            for key, (entry_id, _) in entries:
                by_key.setdefault(key, []).append(entry_id)
            for key, ids in by_key.items():
                attempts.update(await self._attempts(key, ids))
        deliveries: Sequence[Delivery]
        decode = decode_lazily if self._lazy else decode_entries
        deliveries, malformed = decode(entries, self._keys, attempts, self._max_deliveries)
        if malformed:
            pipe = self._redis.pipeline(transaction=True)
            for key, entry_id, raw, reason in malformed:
                self._dead.add_to_pipeline(
                    pipe,
                    channel=self._keys[key],
                    reason=reason,
                    original=raw,
                    kind="event",
                    stream_id=entry_id,
                )
                pipe.xack(key, self.group, entry_id)
            await pipe.execute()
            log.warning("dead-lettered events", extra={"count": len(malformed)})
        if deliveries:
            await self._handle(deliveries)
        if self._noack:
            for key, (entry_id, _) in entries:
                self._handed_over[self._keys[key]] = entry_id

    async def _handle(self, deliveries: Sequence[Delivery]) -> None:
        backoff = 0.05
        while True:
            try:
                await self._call(deliveries)
                return
            except TransientError as exc:
                log.warning("dependency unavailable, will retry batch", extra={"error": str(exc)})
                if self._stopping.is_set():
                    return  # stays pending; redelivered after restart
                await self._sleep(backoff)
                backoff = min(backoff * 2, 1.0)  # resume soon after the dependency is back
            except REDIS_ERRORS:
                raise  # the bus itself is down: `run` reconnects and re-reads what is pending
            except InvalidEvent as exc:
                if len(deliveries) == 1:
                    await self._dead_letter(deliveries[0], f"invalid event: {exc}")
                    return
                for delivery in deliveries:  # find which one, keep the others
                    await self._handle([delivery])
                return
            except Exception as exc:
                if len(deliveries) == 1:
                    await self._retry_single(deliveries[0], exc)
                    return
                log.warning("batch failed, isolating events", exc_info=True)
                for delivery in deliveries:
                    await self._handle([delivery])
                return

    async def _retry_single(self, delivery: Delivery, first_error: Exception) -> None:
        """Retry one failing event with backoff; dead-letter it after `max_deliveries`."""
        reason = describe_error(first_error)
        attempt = delivery.attempt
        while attempt < self._max_deliveries:
            if self._stopping.is_set():
                return  # stays pending; retried after restart
            attempt += 1
            await self._sleep(min(0.05 * 2**attempt, 2.0))
            try:
                await self._call([delivery])
                return
            except TransientError:
                attempt -= 1  # an outage is not the event's fault
            except REDIS_ERRORS:
                raise
            except Exception as exc:
                reason = describe_error(exc)
        await self._dead_letter(delivery, f"handler failed {attempt} times: {reason}")

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        self._dead.add_to_pipeline(
            pipe,
            channel=delivery.channel,
            reason=reason,
            original=encode_event(delivery.event),
            kind="event",
            stream_id=delivery.id,
        )
        pipe.xack(stream_key(delivery.channel), self.group, delivery.id)
        await pipe.execute()
        log.error(
            "event dead-lettered",
            extra={"channel": delivery.channel, "event_id": delivery.event.event_id},
        )

    async def _call(self, deliveries: Sequence[Delivery]) -> None:
        started = time.perf_counter()
        token = correlation_id_var.set(deliveries[0].event.event_id)
        try:
            await self._handler(deliveries)
        except Exception:
            if self._metrics is not None:
                self._metrics.handler_errors.labels(deliveries[0].channel).inc()
            raise
        finally:
            correlation_id_var.reset(token)
        if self._metrics is not None:
            self._metrics.handler_seconds.labels(deliveries[0].channel).observe(
                time.perf_counter() - started
            )
        if self._auto_ack:
            await self.ack(deliveries)

    async def ack(
        self,
        deliveries: Sequence[Delivery],
        *,
        also: Callable[[Pipeline], None] | None = None,
    ) -> None:
        """Acknowledge deliveries; `also` adds commands (a checkpoint, follow-up events) to the
        same MULTI/EXEC so they happen together or not at all."""
        if isinstance(deliveries, DeliveryBatch):
            pairs: Iterable[tuple[bytes, str]] = zip(
                deliveries.ids, deliveries.channels, strict=True
            )
        else:
            pairs = ((d.id, d.channel) for d in deliveries)
        await self.ack_ids(ids_by_channel(pairs), also=also)

    async def ack_ids(
        self,
        ids_by_channel: Mapping[str, Sequence[bytes]],
        *,
        also: Callable[[Pipeline], None] | None = None,
    ) -> None:
        """`ack` by stream entry ids (channel -> ids), for a handler that keeps only the ids of
        what it holds (not the deliveries, whose events it has consumed already)."""
        pipe = self._redis.pipeline(transaction=True)
        if also is not None:
            also(pipe)
        for channel, ids in ids_by_channel.items():
            if ids:
                pipe.xack(stream_key(channel), self.group, *ids)
        await pipe.execute()
        if self._metrics is not None:
            for channel, ids in ids_by_channel.items():
                self._metrics.consumed.labels(channel, self.group).inc(len(ids))
