"""Stream subscriptions: replay stored entity events of one type into a subscriber's channel.

`stream.subscribe {subscription_id, entity_type, since, until?, channel}` registers a
subscription; a replay worker then publishes the events with `since <= occurred_at < until`
(until defaults to the subscribe request's timestamp), ordered by (occurred_at, published_at,
event_id), as events `{event: <original envelope>}` on `channel`, then one end marker
`{subscription_id, done: true, count}`. `stream.heartbeat {subscription_id}` keeps it alive;
`stream.unsubscribe {subscription_id}` or no heartbeat for `timeout` ends it (a timed-out
subscription gets an end marker with `done: true, reason: "timeout"`). These are events, not
requests: a heartbeat or unsubscribe naming a subscription that is not live gets no answer; it
is counted in `analytics_db_subscription_controls_ignored_total{channel, reason}` (`unknown`:
never subscribed or its state expired; `ended`: a heartbeat after the end) and logged once per
id at info.

State lives in Redis (`ae:db:sub:{id}` hash, `ae:db:subs` set of live ids). Each page is
published in the same MULTI/EXEC that advances the subscription's cursor, and the MULTI is
fenced by the replica's lease (`ae:db:sub:{id}:lease`, WATCHed): a crash at any point neither
loses nor repeats an event, and two replicas never replay the same subscription. Pages wait
while the target stream's consumers lag by more than `max_lag` entries (backpressure: nothing
is trimmed from the stream before the subscriber reads it, and memory stays one page).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import orjson
from redis.exceptions import ResponseError, WatchError

from analytics_engine.core import channels
from analytics_engine.core.bus import (
    REDIS_ERRORS,
    DeadLetters,
    Delivery,
    DurableConsumer,
    EventPublisher,
)
from analytics_engine.core.envelopes import Event
from analytics_engine.core.errors import TransientError
from analytics_engine.core.storable import CHANNEL_BY_KIND, InvalidPayload, parse_timestamp
from analytics_engine.database.db import transient_errors
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.simulation_data_consumer import dead_letter_invalid

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

log = logging.getLogger(__name__)

SUBSCRIPTIONS_KEY: Final = f"{channels.KEY_PREFIX}db:subs"
STATE_TTL_S: Final = 7 * 86400
REPLAY_NAMESPACE: Final = uuid.UUID("1f4e2a6b-8c0d-4f3a-b7e5-2d9c6a1b0e47")
# As the `StreamSubscribe` schema (core/payloads.py) has them. No `:` in an id: the id ends up in
# Redis keys (`ae:db:sub:{id}`, `ae:db:sub:{id}:lease`), and `x:lease` would name x's lease.
_ID: Final = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
# Only replay channels: the one kind of stream the database service's Redis user may append to
# for a subscriber, and no subscriber can make it write into anyone else's stream.
_CHANNEL: Final = re.compile(rf"^{re.escape(channels.REPLAY_PREFIX)}[A-Za-z0-9_.\-]+$")
_CHANNEL_MAX: Final = 200
_NOTED_MAX: Final = 1000
"""Subscription ids whose control events for a subscription that is not live were logged."""

PAGE_FIRST: Final = """
SELECT event_id, event_kind, entity_type, entity_id, version, occurred_at, published_at,
       attributes, reason, source
FROM entity_events
WHERE entity_type = $1 AND occurred_at >= $2 AND occurred_at < $3
ORDER BY occurred_at, published_at, event_id
LIMIT $4
"""

PAGE_NEXT: Final = """
SELECT event_id, event_kind, entity_type, entity_id, version, occurred_at, published_at,
       attributes, reason, source
FROM entity_events
WHERE entity_type = $1 AND occurred_at >= $5 AND occurred_at < $3
  AND (occurred_at, published_at, event_id) > ($5, $6, $7)
  AND occurred_at >= $2
ORDER BY occurred_at, published_at, event_id
LIMIT $4
"""


def state_key(subscription_id: str) -> str:
    return f"{channels.KEY_PREFIX}db:sub:{subscription_id}"


def lease_key(subscription_id: str) -> str:
    return f"{channels.KEY_PREFIX}db:sub:{subscription_id}:lease"


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    subscription_id: str
    entity_type: str
    since: datetime
    until: datetime
    channel: str

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "subscription_id": self.subscription_id,
                "entity_type": self.entity_type,
                "since": self.since.isoformat(),
                "until": self.until.isoformat(),
                "channel": self.channel,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> SubscriptionSpec:
        data = orjson.loads(raw)
        return cls(
            subscription_id=data["subscription_id"],
            entity_type=data["entity_type"],
            since=parse_timestamp(data["since"], "since"),
            until=parse_timestamp(data["until"], "until"),
            channel=data["channel"],
        )


def subscription_id_of(payload: dict[str, Any]) -> str:
    sid = payload.get("subscription_id")
    if not isinstance(sid, str) or not _ID.fullmatch(sid):
        raise InvalidPayload("subscription_id: 1-100 characters of [A-Za-z0-9_.-] required")
    return sid


def parse_subscribe(event: Event) -> SubscriptionSpec:
    """Validate a `stream.subscribe` payload (pure)."""
    p = event.payload
    sid = subscription_id_of(p)
    entity_type = p.get("entity_type")
    if not isinstance(entity_type, str) or not entity_type or len(entity_type) > 200:
        raise InvalidPayload("entity_type: a non-empty string is required")
    channel = p.get("channel")
    if (
        not isinstance(channel, str)
        or len(channel) > _CHANNEL_MAX
        or not _CHANNEL.fullmatch(channel)
    ):
        shown = channel[:_CHANNEL_MAX] if isinstance(channel, str) else channel
        raise InvalidPayload(
            f"channel: {shown!r} is not a replay channel: {channels.REPLAY_PREFIX}<name> "
            f"([A-Za-z0-9_.-], at most {_CHANNEL_MAX} characters) required, "
            f"e.g. {channels.REPLAY_PREFIX}{sid}"
        )
    since = parse_timestamp(p.get("since"), "since")
    until_raw = p.get("until")
    until = (
        parse_timestamp(until_raw, "until")
        if until_raw is not None
        else parse_timestamp(event.timestamp.isoformat(), "timestamp")
    )
    return SubscriptionSpec(sid, entity_type, since, until, channel)


def original_envelope(record: Any) -> dict[str, Any]:
    """The stored event as the envelope it was published in (pure)."""
    payload: dict[str, Any] = {
        "entity_type": record["entity_type"],
        "entity_id": record["entity_id"],
        "version": record["version"],
        "occurred_at": record["occurred_at"].isoformat(),
    }
    if record["event_kind"] == "deactivated":
        if record["reason"] is not None:
            payload["reason"] = record["reason"]
    else:
        payload["attributes"] = record["attributes"]
    return {
        "event_id": str(record["event_id"]),
        "event_type": CHANNEL_BY_KIND[record["event_kind"]],
        "source": record["source"],
        # as the core serialises envelope timestamps (pydantic: UTC as "Z")
        "timestamp": record["published_at"].isoformat().replace("+00:00", "Z"),
        "payload": payload,
    }


class StreamSubscriptions:
    def __init__(
        self,
        *,
        redis: Redis,
        pool: Any,
        publisher: EventPublisher,
        dead_letters: DeadLetters,
        metrics: DatabaseMetrics,
        instance: str,
        timeout: timedelta,
        page_rows: int,
        max_lag: int,
        lease: timedelta = timedelta(seconds=10),
        max_parallel: int = 4,
    ) -> None:
        self._redis = redis
        self._pool = pool
        self._publisher = publisher
        self._dead = dead_letters
        self._metrics = metrics
        self._me = instance.encode()
        self.timeout = timeout
        self.page_rows = page_rows
        self.max_lag = max_lag
        self._lease_ms = int(lease.total_seconds() * 1000)
        self._max_parallel = max_parallel
        self._running: dict[str, asyncio.Task[None]] = {}
        self._consumer: DurableConsumer | None = None
        self._wake = asyncio.Event()
        self._noted: dict[str, None] = {}
        """Ids logged by `_note_not_live` (insertion-ordered, the oldest dropped first)."""

    def bind(self, consumer: DurableConsumer) -> None:
        self._consumer = consumer

    # -- control events ----------------------------------------------------------------------
    async def on_control(self, deliveries: Sequence[Delivery]) -> None:
        """Handler of stream.subscribe / stream.heartbeat / stream.unsubscribe."""
        assert self._consumer is not None, "bind() the consumer first"
        invalid: list[tuple[Delivery, str]] = []
        ops: list[tuple[str, Any]] = []
        for d in deliveries:
            try:
                if d.channel == channels.STREAM_SUBSCRIBE:
                    ops.append(("subscribe", parse_subscribe(d.event)))
                elif d.channel == channels.STREAM_HEARTBEAT:
                    ops.append(("heartbeat", subscription_id_of(d.event.payload)))
                else:
                    ops.append(("unsubscribe", subscription_id_of(d.event.payload)))
            except InvalidPayload as exc:
                invalid.append((d, str(exc)))
        dead = dead_letter_invalid(self._dead, invalid)
        await self._note_not_live(ops)
        now = str(time.time()).encode()

        def also(pipe: Pipeline) -> None:
            for kind, arg in ops:
                if kind == "subscribe":
                    key = state_key(arg.subscription_id)
                    pipe.hsetnx(key, "spec", arg.to_json())
                    pipe.hsetnx(key, "status", b"active")
                    pipe.hsetnx(key, "count", b"0")
                    pipe.hset(key, "heartbeat", now)
                    pipe.expire(key, STATE_TTL_S)
                    pipe.sadd(SUBSCRIPTIONS_KEY, arg.subscription_id)
                elif kind == "heartbeat":
                    pipe.hset(state_key(arg), "heartbeat", now)
                    pipe.expire(state_key(arg), STATE_TTL_S)
                else:
                    pipe.hset(state_key(arg), "status", b"cancelled")
                    pipe.expire(state_key(arg), STATE_TTL_S)
                    pipe.srem(SUBSCRIPTIONS_KEY, arg)
            if dead is not None:
                dead(pipe)

        await self._consumer.ack(deliveries, also=also)
        if any(kind == "subscribe" for kind, _ in ops):
            self._wake.set()

    async def _note_not_live(self, ops: Sequence[tuple[str, Any]]) -> None:
        """Count (and log once per id) heartbeats and unsubscribes naming a subscription that
        is not live. They are events, with no reply: the subscriber learns of the end from its
        channel's end marker, or, for an id unknown here (never subscribed, or its state
        expired), from the replay's silence. An unsubscribe after the end is the subscriber's
        normal cleanup and is not counted. Diagnostics only: a Redis error skips them."""
        named = [(kind, arg) for kind, arg in ops if kind != "subscribe"]
        if not named:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for _, sid in named:
                pipe.hget(state_key(sid), "status")
            statuses: list[bytes | None] = await pipe.execute()
        except REDIS_ERRORS:
            return
        for (kind, sid), status in zip(named, statuses, strict=True):
            if status is None:
                reason = "unknown"
            elif status != b"active" and kind == "heartbeat":
                reason = "ended"
            else:
                continue
            channel = (
                channels.STREAM_HEARTBEAT if kind == "heartbeat" else channels.STREAM_UNSUBSCRIBE
            )
            self._metrics.subscription_controls_ignored.labels(channel, reason).inc()
            if sid not in self._noted:
                if len(self._noted) >= _NOTED_MAX:
                    self._noted.pop(next(iter(self._noted)))
                self._noted[sid] = None
                log.info(
                    "control event for a subscription that is not live",
                    extra={
                        "subscription": sid,
                        "channel": channel,
                        "reason": reason,
                        "status": status.decode(errors="replace") if status else None,
                    },
                )

    # -- replay workers ----------------------------------------------------------------------
    async def run(self) -> None:
        """Background task: pick up live subscriptions whose lease is free (or ours)."""
        try:
            while True:
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._adopt()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                self._wake.clear()
        finally:
            for task in self._running.values():
                task.cancel()
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def _adopt(self) -> None:
        for task_id in [k for k, t in self._running.items() if t.done()]:
            del self._running[task_id]
        members: set[bytes] = await self._redis.smembers(SUBSCRIPTIONS_KEY)  # type: ignore[assignment]
        for raw in members:
            sid = raw.decode()
            if sid in self._running or len(self._running) >= self._max_parallel:
                continue
            lkey = lease_key(sid)
            taken = await self._redis.set(lkey, self._me, nx=True, px=self._lease_ms)
            if not taken and await self._redis.get(lkey) != self._me:
                continue  # another replica replays it
            if not taken:  # our own lease from before a restart: take it over
                await self._redis.pexpire(lkey, self._lease_ms)
            self._running[sid] = asyncio.create_task(self._replay(sid), name=f"replay:{sid}")

    async def _replay(self, sid: str) -> None:
        backoff = 0.1
        while True:
            try:
                if not await self._step(sid):
                    return
                backoff = 0.1
            except (TransientError, *REDIS_ERRORS) as exc:
                log.warning("replay paused", extra={"subscription": sid, "error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:
                log.exception("replay failed", extra={"subscription": sid})
                await asyncio.sleep(1.0)

    async def _renew(self, sid: str) -> bool:
        lkey = lease_key(sid)
        if await self._redis.get(lkey) != self._me:
            return False
        await self._redis.pexpire(lkey, self._lease_ms)
        return True

    async def _step(self, sid: str) -> bool:
        """One page (or the end); False when this replica is done with the subscription."""
        if not await self._renew(sid):
            return False
        state: dict[bytes, bytes] = await self._redis.hgetall(state_key(sid))  # type: ignore[assignment]
        if state.get(b"status") != b"active" or b"spec" not in state:
            await self._release(sid, drop=True)
            return False
        spec = SubscriptionSpec.from_json(state[b"spec"])
        count = int(state.get(b"count", b"0"))
        heartbeat = float(state.get(b"heartbeat", b"0"))
        if time.time() - heartbeat > self.timeout.total_seconds():
            await self._finish(sid, spec, count, reason="timeout")
            return False
        if await self._lag(spec.channel) > self.max_lag:
            await asyncio.sleep(0.2)  # backpressure: let the subscriber catch up
            return True
        cursor = orjson.loads(state[b"cursor"]) if b"cursor" in state else None
        records = await self._page(spec, cursor)
        if not records:
            await self._finish(sid, spec, count, reason=None)
            return False
        events = [
            self._publisher.make_event(
                spec.channel,
                {"event": original_envelope(r)},
                event_id=str(uuid.uuid5(REPLAY_NAMESPACE, f"{sid}|{r['event_id']}")),
            )
            for r in records
        ]
        last = records[-1]
        new_cursor = orjson.dumps(
            [
                last["occurred_at"].isoformat(),
                last["published_at"].isoformat(),
                str(last["event_id"]),
            ]
        )
        fields = {b"cursor": new_cursor, b"count": str(count + len(events)).encode()}
        if await self._fenced(sid, lambda pipe: self._publish_page(pipe, sid, events, fields)):
            self._metrics.replayed.inc(len(events))
            return True
        return False

    def _publish_page(
        self, pipe: Pipeline, sid: str, events: list[Event], fields: dict[bytes, bytes]
    ) -> None:
        self._publisher.add_to_pipeline(pipe, events)
        pipe.hset(state_key(sid), mapping=fields)  # type: ignore[arg-type]
        pipe.expire(state_key(sid), STATE_TTL_S)

    async def _fenced(self, sid: str, commands: Any) -> bool:
        """Run `commands` in a MULTI that only executes while we still hold the lease."""
        lkey = lease_key(sid)
        async with self._redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(lkey)
                if await pipe.get(lkey) != self._me:
                    return False
                pipe.multi()  # type: ignore[no-untyped-call]
                commands(pipe)
                await pipe.execute()
                return True
            except WatchError:
                return await self._renew(sid)  # lost the lease: stop; else retry the step

    async def _finish(
        self, sid: str, spec: SubscriptionSpec, count: int, *, reason: str | None
    ) -> None:
        payload: dict[str, Any] = {"subscription_id": sid, "done": True, "count": count}
        if reason is not None:
            payload["reason"] = reason
        marker = self._publisher.make_event(
            spec.channel, payload, event_id=str(uuid.uuid5(REPLAY_NAMESPACE, f"{sid}|end"))
        )

        def commands(pipe: Pipeline) -> None:
            self._publisher.add_to_pipeline(pipe, [marker])
            pipe.hset(state_key(sid), "status", reason or "done")
            pipe.srem(SUBSCRIPTIONS_KEY, sid)
            pipe.delete(lease_key(sid))

        if await self._fenced(sid, commands):
            log.info(
                "subscription ended",
                extra={"subscription": sid, "count": count, "reason": reason or "done"},
            )

    async def _release(self, sid: str, *, drop: bool) -> None:
        pipe = self._redis.pipeline(transaction=True)
        if drop:
            pipe.srem(SUBSCRIPTIONS_KEY, sid)
        pipe.delete(lease_key(sid))
        await pipe.execute()

    async def _lag(self, channel: str) -> int:
        """Entries of the target stream its slowest consumer group has not read yet."""
        key = channels.stream_key(channel)
        try:
            groups = await self._redis.xinfo_groups(key)
        except ResponseError:
            groups = []  # no stream yet
        if not groups:
            return int(await self._redis.xlen(key))
        lags = [g.get("lag") for g in groups]
        if any(lag is None for lag in lags):
            return int(await self._redis.xlen(key))
        return max(int(lag) for lag in lags)  # type: ignore[arg-type]

    async def _page(self, spec: SubscriptionSpec, cursor: list[str] | None) -> list[Any]:
        with transient_errors("replaying events"):
            async with self._pool.acquire() as conn:
                if cursor is None:
                    return list(
                        await conn.fetch(
                            PAGE_FIRST, spec.entity_type, spec.since, spec.until, self.page_rows
                        )
                    )
                return list(
                    await conn.fetch(
                        PAGE_NEXT,
                        spec.entity_type,
                        spec.since,
                        spec.until,
                        self.page_rows,
                        parse_timestamp(cursor[0], "cursor"),
                        parse_timestamp(cursor[1], "cursor"),
                        uuid.UUID(cursor[2]),
                    )
                )
