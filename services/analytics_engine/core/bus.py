"""The event bus: every event is PUBLISHed on its channel (what external subscribers see, as the
spec documents) and, on durable channels, also appended to a Redis Stream that each subscribing
service reads through its own consumer group (at-least-once, survives consumer downtime).

Publisher and consumer are separate classes; all Redis I/O of events lives here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast, overload

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from analytics_engine.core.channels import (
    channel_of_stream,
    channel_spec,
    dead_letter_key,
    stream_key,
)
from analytics_engine.core.envelopes import (
    ENVELOPE_FIELDS,
    ENVELOPE_JSON_OPTIONS,
    Event,
    MalformedMessage,
    common_event_fields,
    dumps,
    event_fields,
    new_id,
    parse_event,
    utcnow,
)
from analytics_engine.core.errors import InvalidEvent, TransientError
from analytics_engine.core.logs import correlation_id_var

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from analytics_engine.core.metrics import CoreMetrics

log = logging.getLogger(__name__)

FIELD = b"m"  # the one stream field: the event's JSON, byte-identical to what was PUBLISHed
DEAD_LETTER_MAXLEN = 100_000
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def encode_event(event: Event) -> bytes:
    return dumps(event)


EncodedEvent = tuple[str, bytes]
"""(channel, the event's wire bytes)."""


# One call per batch: for each event, XADD to its stream (durable channels) and PUBLISH the same
# bytes. A script runs atomically like MULTI/EXEC, so a durable consumer never misses what a live
# subscriber saw; and it costs redis-py one command to pack instead of two per event, which is
# what limits a Python publisher (measured: ~6k events/s with per-event commands, > 20k/s so).
# ARGV: the field name; per KEYS, its length cap; per KEYS, 1 if it applies backpressure (never
# trimmed here) or 0 (trimmed to its cap); then per event: KEYS index or 0, channel, data.
# Returns the KEYS indexes of backpressure streams now at or over their cap. The lengths are
# read before anything is written, so that a refused read (an ACL without XLEN) writes nothing.
PUBLISH_SCRIPT = """
local field = ARGV[1]
local n = #KEYS
local length = {}
for k = 1, n do
  if ARGV[1 + n + k] == '1' then
    length[k] = redis.call('XLEN', KEYS[k])
  end
end
for i = 2 * n + 2, #ARGV, 3 do
  local k = tonumber(ARGV[i])
  if k > 0 then
    if length[k] then
      redis.call('XADD', KEYS[k], '*', field, ARGV[i + 2])
      length[k] = length[k] + 1
    else
      redis.call('XADD', KEYS[k], 'MAXLEN', '~', ARGV[1 + k], '*', field, ARGV[i + 2])
    end
  end
  redis.call('PUBLISH', ARGV[i + 1], ARGV[i + 2])
end
local full = {}
for k = 1, n do
  if length[k] and length[k] >= tonumber(ARGV[1 + k]) then
    full[#full + 1] = k
  end
end
return full
"""

_ROOM_POLL_S: Final = (0.05, 1.0)
"""How often a publisher waiting for room looks again: first, and at most (doubling)."""
_ROOM_LOG_EVERY_S: Final = 30.0


class EventPublisher:
    """Publishes events: PUBLISH for live subscribers plus XADD for durable consumers, both in
    one atomic script call per batch."""

    def __init__(
        self,
        redis: Redis,
        *,
        source: str,
        stream_maxlen: int,
        metrics: CoreMetrics | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self._redis = redis
        self._source = source
        self._maxlen = stream_maxlen
        self._metrics = metrics
        self._stopping = stopping if stopping is not None else asyncio.Event()
        self._script = redis.register_script(PUBLISH_SCRIPT)
        self._waiting: collections.Counter[str] = collections.Counter()

    @property
    def waiting_for(self) -> list[str]:
        """The channels whose full streams publishes are waiting on now (`wait_for_room`)."""
        return sorted(c for c, n in self._waiting.items() if n > 0)

    def make_event(
        self,
        channel: str,
        payload: Mapping[str, Any],
        *,
        event_id: str | None = None,
        timestamp: datetime | None = None,
    ) -> Event:
        # every field is ours and well-typed: validation would only cost time
        return Event.trusted(
            event_id=event_id or new_id(),
            event_type=channel,
            source=self._source,
            timestamp=timestamp or utcnow(),
            payload=dict(payload),
        )

    async def publish(
        self, channel: str, payload: Mapping[str, Any], *, event_id: str | None = None
    ) -> Event:
        event = self.make_event(channel, payload, event_id=event_id)
        await self.publish_events([event])
        return event

    async def publish_many(self, items: Iterable[tuple[str, Mapping[str, Any]]]) -> list[Event]:
        events = [self.make_event(channel, payload) for channel, payload in items]
        await self.publish_events(events)
        return events

    def encode_batch(
        self,
        items: Sequence[tuple[str, Mapping[str, Any]]],
        event_ids: Sequence[str],
        timestamp: datetime,
    ) -> list[EncodedEvent]:
        """The wire bytes of events sharing one timestamp, byte-identical to
        `encode_event(make_event(channel, payload, event_id=..., timestamp=timestamp))`.

        For a producer of many events (the simulator): no model per event, and the fields a
        batch shares are encoded once, so a batch costs about one `orjson.dumps` per payload.
        """
        options = ENVELOPE_JSON_OPTIONS
        middle: dict[str, bytes] = {}  # per channel: from event_type to the payload's key
        shared = (
            b',"source":'
            + orjson.dumps(self._source)
            + b',"timestamp":'
            + orjson.dumps(timestamp, option=options)
            + b',"payload":'
        )
        out: list[EncodedEvent] = []
        for (channel, payload), event_id in zip(items, event_ids, strict=True):
            part = middle.get(channel)
            if part is None:
                part = middle[channel] = b',"event_type":' + orjson.dumps(channel) + shared
            body = payload if type(payload) is dict else dict(payload)
            out.append(
                (
                    channel,
                    b'{"event_id":'
                    + orjson.dumps(event_id)
                    + part
                    + orjson.dumps(body, option=options)
                    + b"}",
                )
            )
        return out

    async def publish_events(self, events: Sequence[Event]) -> None:
        """Publish prepared events in one round trip (retried events keep their `event_id`, so
        consumers can drop the duplicates a retry may cause)."""
        await self.publish_encoded([(e.event_type, encode_event(e)) for e in events])

    async def publish_encoded(self, events: Sequence[EncodedEvent]) -> None:
        """`publish_events` for events already in their wire form (`encode_batch`).

        Returns once the events are published and their streams have room for more: a
        stream with backpressure that this batch filled makes the call wait
        (`wait_for_room`)."""
        if events:
            keys, args = self._script_arguments(events)
            full = await self._script(keys=keys, args=args)
            self._count(events)
            if full:
                await self.wait_for_room(channel_of_stream(keys[int(k) - 1]) for k in full)

    def add_to_pipeline(self, pipe: Pipeline, events: Sequence[Event]) -> None:
        """Queue the publishing of `events` on a caller's pipeline (to publish and acknowledge
        in one transaction). The caller applies backpressure: `wait_for_room` after the
        transaction, before its next one."""
        if events:
            encoded = [(e.event_type, encode_event(e)) for e in events]
            keys, args = self._script_arguments(encoded)
            pipe.scripts.add(self._script)  # type: ignore[arg-type]  # loaded first if missing
            pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            self._count(encoded)

    async def wait_for_room(self, channels: Iterable[str]) -> None:
        """Wait until the stream of every backpressure channel among `channels` holds fewer
        entries than its cap.

        Backpressure: a full stream has readers that are down or behind, and retention trims
        only what they consumed (`core.retention`), so its publisher waits rather than grow it
        past its cap or drop what they have not read. The stream gains room when they catch up
        and the next trim runs (`OBSERVABILITY_TRIM_INTERVAL`). Redis being unreachable
        meanwhile only prolongs the wait: what was published stays published. A service that
        is stopping (`stopping`, the runtime's) does not wait: it is finishing its work."""
        full = [c for c in set(channels) if channel_spec(c).backpressure]
        started = time.monotonic()
        logged = 0.0
        delay, longest = _ROOM_POLL_S
        waiting: set[str] = set()
        try:
            while full and not self._stopping.is_set():
                with contextlib.suppress(*REDIS_ERRORS):
                    full = await self.full(full)
                if not full:
                    break
                self._waiting.update(set(full) - waiting)
                waiting.update(full)
                now = time.monotonic()
                if now - logged >= _ROOM_LOG_EVERY_S:
                    logged = now
                    log.warning(
                        "stream full: waiting for its readers to catch up",
                        extra={"channels": sorted(full), "waited_s": round(now - started, 1)},
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._metrics is not None:
                    for channel in full:
                        self._metrics.publish_wait_seconds.labels(channel).inc(delay)
                delay = min(delay * 2, longest)
        finally:
            self._waiting.subtract(waiting)
        if logged:
            waited = round(time.monotonic() - started, 1)
            log.info("stream has room again: publishing", extra={"waited_s": waited})

    async def full(self, channels: Sequence[str]) -> list[str]:
        """Those of `channels` (with backpressure) whose streams hold their cap or more."""
        pipe = self._redis.pipeline(transaction=False)
        for channel in channels:
            pipe.xlen(stream_key(channel))
        lengths = await pipe.execute()
        return [c for c, n in zip(channels, lengths, strict=True) if n >= self.cap(c)]

    def cap(self, channel: str) -> int:
        """The entries `channel`'s stream holds at most (approximately)."""
        spec = channel_spec(channel)
        return min(self._maxlen, spec.maxlen or self._maxlen)

    def _script_arguments(self, events: Sequence[EncodedEvent]) -> tuple[list[str], list[Any]]:
        keys: list[str] = []  # the batch's streams (one per durable channel)
        caps: list[int] = []  # each one's length cap
        waits: list[int] = []  # each one: 1 if it applies backpressure, 0 if trimmed at its cap
        indexes: dict[str, int] = {}  # per channel: its stream's KEYS index, 0 if not durable
        triples: list[Any] = []
        for channel, data in events:
            index = indexes.get(channel)
            if index is None:
                index = 0
                spec = channel_spec(channel)
                if spec.durable:
                    keys.append(stream_key(channel))
                    caps.append(self.cap(channel))
                    waits.append(int(spec.backpressure))
                    index = len(keys)
                indexes[channel] = index
            triples.extend((index, channel, data))
        return keys, [FIELD, *caps, *waits, *triples]

    def _count(self, events: Sequence[EncodedEvent]) -> None:
        if self._metrics is None:
            return
        per_channel: dict[str, int] = {}
        for channel, _ in events:
            per_channel[channel] = per_channel.get(channel, 0) + 1
        for channel, count in per_channel.items():
            self._metrics.published.labels(channel).inc(count)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event as delivered from a stream: `id` is the stream entry id, `attempt` starts at 1."""

    id: bytes
    channel: str
    event: Event
    attempt: int = 1


class DeliveryBatch(Sequence[Delivery]):
    """A batch of deliveries whose `Event`s are built only when a delivery is looked at (a
    consumer's `lazy_events`). The envelopes were checked as for any batch (a malformed one is
    dead-lettered before the handler sees the batch); a handler that reads only fields takes
    them from the parallel lists (`ids`, `channels`, `envelopes` — each envelope's five fields
    as `envelopes.event_fields` gives them —, `payloads`, `attempts`) and saves the ~10 objects
    per message that an `Event` and its `Delivery` cost."""

    __slots__ = ("_built", "_raws", "attempts", "channels", "envelopes", "ids", "payloads")

    def __init__(
        self,
        *,
        ids: list[bytes],
        channels: list[str],
        raws: list[bytes],
        envelopes: list[dict[str, Any]],
        attempts: list[int],
    ) -> None:
        self.ids = ids
        self.channels = channels
        self.envelopes = envelopes
        self.payloads: list[dict[str, Any]] = [e["payload"] for e in envelopes]
        self.attempts = attempts
        self._raws = raws
        self._built: dict[int, Delivery] = {}

    @classmethod
    def of(cls, deliveries: Sequence[Delivery]) -> DeliveryBatch:
        """`deliveries` as a batch (itself if it is one), so a handler reads one shape whichever
        way its consumer decodes."""
        if isinstance(deliveries, DeliveryBatch):
            return deliveries
        batch = cls(
            ids=[d.id for d in deliveries],
            channels=[d.channel for d in deliveries],
            raws=[],  # never read: every delivery is built already
            envelopes=[
                {name: getattr(d.event, name) for name in ENVELOPE_FIELDS} for d in deliveries
            ],
            attempts=[d.attempt for d in deliveries],
        )
        batch._built = dict(enumerate(deliveries))
        return batch

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> Delivery: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Delivery]: ...

    def __getitem__(self, index: int | slice) -> Delivery | Sequence[Delivery]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("delivery index out of range")
        delivery = self._built.get(index)
        if delivery is None:
            # the envelope was checked when the batch was made: this cannot raise
            event = parse_event(self._raws[index])
            delivery = Delivery(self.ids[index], self.channels[index], event, self.attempts[index])
            self._built[index] = delivery
        return delivery


BatchHandler = Callable[[Sequence[Delivery]], Awaitable[None]]
Entry = tuple[bytes, dict[bytes, bytes]]
_Parsed = TypeVar("_Parsed")
Rejected = tuple[bytes, bytes, bytes, str]
"""(stream key, entry id, original bytes, reason) of a message to dead-letter."""


def raw_entries(reply: Any) -> list[tuple[bytes, Entry]]:
    """An XREADGROUP reply as it comes off the wire, flattened into (stream key, (entry id,
    fields)) pairs: a map of stream key -> entries (RESP3) or a list of [key, entries] pairs
    (RESP2), each entry [id, [field, value, ...]], or [id, nil] for a pending entry trimmed from
    the stream (empty fields here)."""
    if not reply:
        return []
    streams = reply.items() if isinstance(reply, dict) else reply
    return [
        (
            key,
            (
                entry_id,
                {flat[0]: flat[1]}
                if flat and len(flat) == 2
                else dict(zip(flat[::2], flat[1::2], strict=True))
                if flat
                else {},
            ),
        )
        for key, entries in streams
        for entry_id, flat in entries
    ]


# The command name as bytes: redis-py looks response callbacks up by the str name, so this one
# comes back as parsed by hiredis, unconverted. Its conversion (a Python dict and tuple per
# entry) cost a consumer ~0.7 us per entry, measured here: about half of what reading costs it.
_XREADGROUP: Final = b"XREADGROUP"


async def read_group(
    redis: Any,
    group: str,
    consumer: str,
    streams: Mapping[bytes, bytes],
    *,
    count: int,
    block_ms: int | None = None,
    noack: bool = False,
) -> list[tuple[bytes, Entry]]:
    """XREADGROUP of `streams` (stream key -> id: `>` for new entries, an id for this
    consumer's pending ones after it), as (stream key, (entry id, fields)) pairs in reply order:
    what redis-py's `xreadgroup` returns, flattened, for less."""
    args: list[Any] = [_XREADGROUP, "GROUP", group, consumer, "COUNT", count]
    if block_ms is not None:
        args += ["BLOCK", block_ms]
    if noack:
        args.append("NOACK")
    args += ["STREAMS", *streams.keys(), *streams.values()]
    return raw_entries(await redis.execute_command(*args))


class DeadLetters:
    """Writes messages that cannot be handled to `ae:dlq:{channel}` with the reason."""

    def __init__(self, redis: Redis, *, service: str, metrics: CoreMetrics | None = None) -> None:
        self._redis = redis
        self._service = service
        self._metrics = metrics

    def add_to_pipeline(
        self,
        pipe: Pipeline,
        *,
        channel: str,
        reason: str,
        original: bytes,
        kind: str,
        stream_id: bytes | None = None,
    ) -> None:
        fields: dict[Any, Any] = {
            "channel": channel,
            "reason": reason[:2000],
            "kind": kind,
            "service": self._service,
            "failed_at": utcnow().isoformat(),
            "original": original[:1_000_000],
        }
        if stream_id is not None:
            fields["stream_id"] = stream_id
        pipe.xadd(dead_letter_key(channel), fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        if self._metrics is not None:
            self._metrics.dead_letters.labels(channel, kind).inc()

    async def add(self, *, channel: str, reason: str, original: bytes, kind: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        self.add_to_pipeline(pipe, channel=channel, reason=reason, original=original, kind=kind)
        await pipe.execute()
        log.warning("dead-lettered a message", extra={"channel": channel, "reason": reason[:200]})


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


def decode_entries(
    entries: Sequence[tuple[bytes, Entry]],
    channels: Mapping[bytes, str],
    attempts: Mapping[bytes, int],
    max_deliveries: int,
) -> tuple[list[Delivery], list[Rejected]]:
    """Stream entries (stream key, (entry id, fields)) -> the deliveries to hand to a handler,
    and the entries to dead-letter: not an envelope, or delivered more than `max_deliveries`
    times (`attempts`: entry id -> deliveries so far, 1 if absent)."""
    rejected: list[Rejected] = []
    accepted = _accepted(entries, attempts, max_deliveries, parse_event, rejected)
    deliveries = [Delivery(i, channels[key], event, n) for key, i, _, event, n in accepted]
    return deliveries, rejected


def decode_lazily(
    entries: Sequence[tuple[bytes, Entry]],
    channels: Mapping[bytes, str],
    attempts: Mapping[bytes, int],
    max_deliveries: int,
) -> tuple[DeliveryBatch, list[Rejected]]:
    """`decode_entries` (the same checks, the same outcome) as a `DeliveryBatch`."""
    if not attempts:  # first deliveries (none over `max_deliveries`): try the batch at once
        raws = [fields.get(FIELD, b"") for _, (_, fields) in entries]
        envelopes = common_event_fields(raws)
        if envelopes is not None:
            batch = DeliveryBatch(
                ids=[entry_id for _, (entry_id, _) in entries],
                channels=[channels[key] for key, _ in entries],
                raws=raws,
                envelopes=envelopes,
                attempts=[1] * len(raws),
            )
            return batch, []
    rejected: list[Rejected] = []
    accepted = list(_accepted(entries, attempts, max_deliveries, event_fields, rejected))
    batch = DeliveryBatch(
        ids=[a[1] for a in accepted],
        channels=[channels[a[0]] for a in accepted],
        raws=[a[2] for a in accepted],
        envelopes=[a[3] for a in accepted],
        attempts=[a[4] for a in accepted],
    )
    return batch, rejected


def _accepted(
    entries: Sequence[tuple[bytes, Entry]],
    attempts: Mapping[bytes, int],
    max_deliveries: int,
    parse: Callable[[bytes], _Parsed],
    rejected: list[Rejected],
) -> Iterator[tuple[bytes, bytes, bytes, _Parsed, int]]:
    """(stream key, entry id, raw, parsed, attempt) of each entry to hand over; one that is not
    an envelope, or was delivered more than `max_deliveries` times, goes to `rejected`."""
    for key, (entry_id, fields) in entries:
        raw = fields.get(FIELD, b"")
        try:
            parsed = parse(raw)
        except MalformedMessage as exc:
            rejected.append((key, entry_id, raw, f"malformed event: {exc}"))
            continue
        attempt = attempts.get(entry_id, 1)
        if attempt > max_deliveries:
            rejected.append((key, entry_id, raw, f"gave up after {attempt - 1} deliveries"))
            continue
        yield key, entry_id, raw, parsed, attempt


def ids_by_channel(entries: Iterable[tuple[bytes, str]]) -> dict[str, list[bytes]]:
    """(entry id, channel) pairs grouped by channel (for `ack_ids` and `keep_alive`)."""
    grouped: dict[str, list[bytes]] = {}
    for entry_id, channel in entries:
        group = grouped.get(channel)
        if group is None:
            grouped[channel] = group = []
        group.append(entry_id)
    return grouped


def describe_error(exc: BaseException, *, limit: int = 500) -> str:
    """`Type: message` of an exception, short enough for a dead letter or a log line."""
    return f"{type(exc).__name__}: {str(exc)[:limit]}"


def parse_json_object(raw: bytes) -> Mapping[str, Any] | None:
    """Best-effort parse for error paths (finding a `reply_to` in a malformed request)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


class LiveSubscription:
    """A pub/sub subscription (channels and/or patterns) that survives Redis restarts by
    re-subscribing with backoff. For live-only readers: reply channels, dashboards, heartbeats.

    `on_message(channel, data)` is called synchronously from the reader task; keep it cheap
    (hand work to a task or queue).
    """

    def __init__(
        self,
        redis: Redis,
        on_message: Callable[[bytes], None] | Callable[[bytes, bytes], None],
        *,
        channels: Sequence[str] = (),
        patterns: Sequence[str] = (),
        with_channel: bool = False,
    ) -> None:
        self._redis = redis
        self._channels = tuple(channels)
        self._patterns = tuple(patterns)
        self._on_message = on_message
        self._with_channel = with_channel
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        if self._task is None:
            name = ",".join(self._channels + self._patterns)
            self._task = asyncio.create_task(self._run(), name=f"sub:{name}")
        await self.subscribed.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            self.subscribed.clear()

    def _deliver(self, message: dict[str, Any]) -> None:
        if self._with_channel:
            self._on_message(message["channel"], message["data"])  # type: ignore[call-arg]
        else:
            self._on_message(message["data"])  # type: ignore[call-arg]

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                if self._channels:
                    await pubsub.subscribe(*self._channels)
                if self._patterns:
                    await pubsub.psubscribe(*self._patterns)
                self.subscribed.set()
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None and message["type"] in ("message", "pmessage"):
                        self._deliver(message)
            except REDIS_ERRORS as exc:
                self.subscribed.clear()
                log.warning("subscription lost, reconnecting", extra={"error": str(exc)[:200]})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
