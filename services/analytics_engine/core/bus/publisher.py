"""Publishing: every event is PUBLISHed on its channel and, on durable channels, appended to its
stream in the same atomic call of a Redis function (`functions`), with backpressure on streams
whose readers lag."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import orjson
from redis.exceptions import ResponseError

from analytics_engine.core.bus.functions import (
    PUBLISH_FUNCTION,
    FunctionMissing,
    is_function_missing,
)
from analytics_engine.core.bus.streams import FIELD, REDIS_ERRORS
from analytics_engine.core.channels import channel_of_stream, channel_spec, stream_key
from analytics_engine.core.envelopes import (
    ENVELOPE_JSON_OPTIONS,
    Event,
    dumps,
    new_id,
    utcnow,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from analytics_engine.core.metrics import CoreMetrics
    from analytics_engine.core.redis import CheckedPipeline

log = logging.getLogger(__name__)


def encode_event(event: Event) -> bytes:
    return dumps(event)


EncodedEvent = tuple[str, bytes]
"""(channel, the event's wire bytes)."""


_ROOM_POLL_S: Final = (0.05, 1.0)
"""How often a publisher waiting for room looks again: first, and at most (doubling)."""
_ROOM_LOG_EVERY_S: Final = 30.0
_MISSING_LOG_EVERY_S: Final = 30.0


class EventPublisher:
    """Publishes events: PUBLISH for live subscribers plus XADD for durable consumers, both in
    one atomic call of the publish function (`FCALL`) per batch.

    Redis without the function (`FunctionMissing`, a `ConnectionError`) publishes nothing: the
    caller backs off and retries as for a Redis outage; a log line names the fix."""

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
        self._missing_logged: float | None = None  # when a missing function was last logged
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
            keys, args = self._call_arguments(events)
            try:
                full = await self._redis.fcall(PUBLISH_FUNCTION, len(keys), *keys, *args)
            except ResponseError as exc:
                if not is_function_missing(exc):
                    raise
                raise self._missing() from exc
            self._count(events)
            if full:
                await self.wait_for_room(channel_of_stream(keys[int(k) - 1]) for k in full)

    def add_to_pipeline(self, pipe: Pipeline, events: Sequence[Event]) -> None:
        """Queue the publishing of `events` on a caller's pipeline (to publish and acknowledge
        in one transaction). The caller applies backpressure: `wait_for_room` after the
        transaction, before its next one.

        `pipe` must come from `core.redis.connect`'s client (a `CheckedPipeline`): before its
        MULTI it checks that the function is there, as redis-py loads a pipeline's scripts,
        since in a transaction a missing function would fail alone while the acknowledgement
        beside it went through."""
        if events:
            before = getattr(pipe, "before", None)
            if before is None:
                raise TypeError("add_to_pipeline needs a pipeline of core.redis.connect's client")
            encoded = [(e.event_type, encode_event(e)) for e in events]
            keys, args = self._call_arguments(encoded)
            before[PUBLISH_FUNCTION] = self._check_function
            pipe.execute_command("FCALL", PUBLISH_FUNCTION, len(keys), *keys, *args)
            self._count(encoded)

    async def _check_function(self, pipe: CheckedPipeline) -> None:
        """Raise `FunctionMissing` unless Redis has the publish function: it publishes nothing
        when called without events (`FCALL` on the pipeline's connection, before its MULTI)."""
        try:
            await pipe.immediate_execute_command("FCALL", PUBLISH_FUNCTION, 0, FIELD)  # type: ignore[no-untyped-call]
        except ResponseError as exc:
            if not is_function_missing(exc):
                raise
            raise self._missing() from exc

    def _missing(self) -> FunctionMissing:
        """The error for Redis's reply that it has no publish function, logged (at most every
        30 s) with what to do about it."""
        error = FunctionMissing()
        now = time.monotonic()
        if self._missing_logged is None or now - self._missing_logged >= _MISSING_LOG_EVERY_S:
            self._missing_logged = now
            log.error(
                "cannot publish: the Redis function is not loaded, retrying",
                extra={"function": PUBLISH_FUNCTION, "fix": str(error)},
            )
        return error

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

    def _call_arguments(self, events: Sequence[EncodedEvent]) -> tuple[list[str], list[Any]]:
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
