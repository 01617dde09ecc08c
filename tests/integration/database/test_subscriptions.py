"""Stream subscriptions: stored events replayed in order into the subscriber's channel."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from analytics_engine.calculation.backfill import (
    REPLAY_CHANNEL_PREFIX,
    BackfillFailed,
    BackfillManager,
    computation,
    owner_tag,
    plan,
)
from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher
from analytics_engine.core.envelopes import Event
from analytics_engine.core.errors import RequestTimeout
from analytics_engine.core.request_reply import RequestReplyClient
from analytics_engine.kpi import VersionedKPIDefinition

from .conftest import Start, count, entity_event, wait_for

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
ORDERS_COUNT = VersionedKPIDefinition.model_validate(
    {
        "code": "orders_count",
        "display_name": "orders",
        "entity_type": "order",
        "aggregation": "count",
        "window": {"type": "tumbling", "size": "1m"},
        "version": 1,
    }
)


async def _no_results(_: list[Any]) -> None:
    return None


async def _store_orders(publisher: EventPublisher, pg: asyncpg.Connection, n: int) -> None:
    """Orders o-0 .. o-{n-1}, created a second apart from T0, published and stored."""
    await publisher.publish_events(
        [
            entity_event(publisher, "created", f"o-{i}", 1, occurred_at=T0 + timedelta(seconds=i))
            for i in range(n)
        ]
    )

    async def stored() -> bool:
        return await count(pg, "SELECT count(*) FROM entity_events") == n

    await wait_for(stored)


def _backfills(redis: Redis, **over: Any) -> BackfillManager:
    """The calculation engine's backfills, as it builds them, publishing nothing."""
    settings: dict[str, Any] = {
        "horizon": timedelta(minutes=5),
        "delay": timedelta(0),
        "max_events": 1000,
        "on_results": _no_results,
        "watermark": lambda: None,
        **over,
    }
    publisher = EventPublisher(redis, source="calculation_engine", stream_maxlen=1_000_000)
    return BackfillManager(redis, publisher, **settings)


async def replayed(redis: Redis, channel: str) -> list[dict[str, Any]]:
    entries = await redis.xrange(channels.stream_key(channel))
    return [orjson.loads(f[b"m"]) for _, f in entries]


async def _replayed_to_the_end(
    redis: Redis, channel: str, timeout: float = 15.0
) -> list[dict[str, Any]]:
    """The replay's events once it has said it is done."""

    async def ended() -> bool:
        events = await replayed(redis, channel)
        return bool(events) and events[-1]["payload"].get("done") is True

    await wait_for(ended, timeout=timeout)
    return await replayed(redis, channel)


def envelope(event: Event) -> dict[str, Any]:
    """The envelope as published, with `occurred_at` normalised like the stored copy."""
    data: dict[str, Any] = orjson.loads(
        orjson.dumps(event.model_dump(mode="json", exclude_none=True))
    )
    occurred = datetime.fromisoformat(data["payload"]["occurred_at"]).astimezone(UTC)
    data["payload"]["occurred_at"] = occurred.isoformat()
    return data


async def subscribe(publisher: EventPublisher, sid: str, **extra: Any) -> str:
    channel = f"stream.replay.{sid}"
    await publisher.publish(
        channels.STREAM_SUBSCRIBE,
        {
            "subscription_id": sid,
            "entity_type": "order",
            "since": T0.isoformat(),
            "until": (T0 + timedelta(hours=1)).isoformat(),
            "channel": channel,
            **extra,
        },
    )
    return channel


async def test_replays_the_matching_events_in_time_order_then_ends(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    await start_service(replay_page_rows=3)
    inside = [
        entity_event(
            publisher,
            "created",
            f"o-{i}",
            1,
            occurred_at=T0 + timedelta(minutes=i),
            attributes={"amount": i},
        )
        for i in range(7)
    ]
    late = entity_event(
        publisher,
        "updated",
        "o-0",
        2,
        occurred_at=T0 + timedelta(seconds=30),
        attributes={"amount": 100},
    )
    deact = entity_event(
        publisher,
        "deactivated",
        "o-1",
        3,
        occurred_at=T0 + timedelta(minutes=1, seconds=1),
        reason="gone",
    )
    outside = [
        entity_event(publisher, "created", "o-early", 1, occurred_at=T0 - timedelta(seconds=1)),
        entity_event(publisher, "created", "o-late", 1, occurred_at=T0 + timedelta(hours=1)),
        entity_event(
            publisher,
            "created",
            "c-1",
            1,
            entity_type="customer",
            occurred_at=T0 + timedelta(minutes=2),
        ),
    ]
    await publisher.publish_events([*inside, *outside])
    await publisher.publish_events([late, deact])

    async def stored() -> bool:
        return await count(pg, "SELECT count(*) FROM entity_events") == 12

    await wait_for(stored)
    channel = await subscribe(publisher, "s1")
    events = await _replayed_to_the_end(redis, channel)
    expected = [inside[0], late, inside[1], deact, *inside[2:]]
    assert [e["payload"]["event"] for e in events[:-1]] == [envelope(x) for x in expected]
    assert events[-1]["payload"] == {"subscription_id": "s1", "done": True, "count": 9}
    assert all(e["event_type"] == channel for e in events)
    assert all(e["source"] == "database_service" for e in events)


async def test_backpressure_then_heartbeat_timeout_ends_the_subscription(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    await start_service(
        replay_page_rows=2, replay_max_lag=4, subscription_timeout=timedelta(seconds=1.5)
    )
    await _store_orders(publisher, pg, 20)
    channel = "stream.replay.s2"
    await redis.xgroup_create(channels.stream_key(channel), "slow", id="0", mkstream=True)
    await subscribe(publisher, "s2")
    # heartbeats keep it alive while the subscriber does not read: the replay waits
    for _ in range(6):
        await publisher.publish(channels.STREAM_HEARTBEAT, {"subscription_id": "s2"})
        await asyncio.sleep(0.4)
    held = await replayed(redis, channel)
    assert 4 <= len(held) <= 6  # paused at max_lag (plus at most one page)
    assert not any(e["payload"].get("done") for e in held)

    last = (await _replayed_to_the_end(redis, channel, timeout=10))[-1]["payload"]
    assert last == {"subscription_id": "s2", "done": True, "count": len(held), "reason": "timeout"}


async def test_unsubscribe_stops_the_replay(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    await start_service(replay_page_rows=1, replay_max_lag=2)
    await publisher.publish_events(
        [
            entity_event(publisher, "created", f"o-{i}", 1, occurred_at=T0 + timedelta(seconds=i))
            for i in range(10)
        ]
    )

    async def stored() -> bool:
        return await count(pg, "SELECT count(*) FROM entity_events") == 10

    await wait_for(stored)
    channel = "stream.replay.s3"
    await redis.xgroup_create(channels.stream_key(channel), "slow", id="0", mkstream=True)
    await subscribe(publisher, "s3")

    async def paused() -> bool:
        return len(await replayed(redis, channel)) >= 2

    await wait_for(paused)
    await publisher.publish(channels.STREAM_UNSUBSCRIBE, {"subscription_id": "s3"})

    async def cancelled() -> bool:
        state = await redis.hget("ae:db:sub:s3", "status")
        return state == b"cancelled" and not await redis.sismember("ae:db:subs", "s3")

    await wait_for(cancelled)
    await redis.xgroup_destroy(channels.stream_key(channel), "slow")  # no more backpressure
    await asyncio.sleep(1.0)
    events = await replayed(redis, channel)
    assert len(events) <= 3 and not any(e["payload"].get("done") for e in events)


async def test_invalid_subscriptions_are_dead_lettered(
    start_service: Start, publisher: EventPublisher, redis: Redis
) -> None:
    await start_service()
    await subscribe(publisher, "bad1", channel=channels.ENTITY_CREATED)  # reserved channel
    await subscribe(publisher, "bad2", since="last tuesday")

    async def dead() -> bool:
        return await redis.xlen(channels.dead_letter_key(channels.STREAM_SUBSCRIBE)) == 2

    await wait_for(dead)
    assert await redis.xlen(channels.stream_key(channels.ENTITY_CREATED)) == 0


async def test_a_backfill_replays_more_events_than_the_replay_lag_bound(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    """The calculation engine's backfill reading a real replay: the database pauses a replay
    while the target stream's readers lag by more than `replay_max_lag` entries, so the
    subscriber's reading must count as progress. Read without a consumer group, the lag was
    the stream's length, which only grows: any replay longer than the bound stalled, and the
    backfill failed for want of data (then was abandoned)."""
    await start_service(replay_page_rows=2, replay_max_lag=4)
    history = [
        entity_event(
            publisher,
            "created",
            f"o-{i}",
            1,
            occurred_at=T0 + timedelta(seconds=i),
            attributes={"amount": i, "region": "eu"},
        )
        for i in range(20)
    ]
    await publisher.publish_events(history)

    async def stored() -> bool:
        return await count(pg, "SELECT count(*) FROM entity_events") == 20

    await wait_for(stored)
    job = plan(ORDERS_COUNT, T0 + timedelta(minutes=1), timedelta(minutes=5))
    manager = _backfills(redis, idle_timeout_s=3.0, heartbeat_s=0.5)
    work = computation(job)
    fed: list[Any] = []
    add = work.add
    work.add = lambda event: (fed.append(event), add(event))[1]  # type: ignore[method-assign]
    await asyncio.wait_for(manager.replay(job, work), timeout=20)
    assert sorted(e.entity_id for e in fed) == sorted(f"o-{i}" for i in range(20))
    assert work.events == 20


async def test_a_restarted_engine_ends_and_deletes_the_replay_of_a_backfill_it_died_in(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    """An engine killed mid-backfill neither unsubscribes nor deletes its replay stream (the
    database may not delete it). Nothing else ever did: each such crash left a stream of up to
    `replay_max_lag` entries, plus the end marker, in Redis for good. The next life of the
    engine stops and deletes them."""
    await start_service(
        replay_page_rows=2, replay_max_lag=4, subscription_timeout=timedelta(seconds=1.5)
    )
    await _store_orders(publisher, pg, 20)
    # what the killed engine left: its subscription, and its stream with a group on it
    dead_id = f"{owner_tag('calc-a')}-{uuid.uuid4()}"
    dead = f"{REPLAY_CHANNEL_PREFIX}{dead_id}"
    key = channels.stream_key(dead)
    await redis.xgroup_create(key, "calculation_engine", id="0", mkstream=True)
    await subscribe(publisher, dead_id, channel=dead)

    async def paused() -> bool:
        return len(await replayed(redis, dead)) >= 4

    await wait_for(paused)

    manager = _backfills(redis, owner="calc-a")
    # the replay of another KPI set's engine, running: not ours to end
    other = channels.stream_key(f"{REPLAY_CHANNEL_PREFIX}{owner_tag('calc-b')}-{uuid.uuid4()}")
    await redis.xgroup_create(other, "calculation_engine", id="0", mkstream=True)
    manager.leftover_recheck_s = 2.0
    runner = asyncio.create_task(manager.run())
    try:
        await asyncio.sleep(3.5)  # past the subscription's timeout, had it not been ended
        assert not await redis.exists(key)
        assert await redis.hget(f"ae:db:sub:{dead_id}", "status") == b"cancelled"
        assert await redis.exists(other)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner


async def _one_event_stored(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection
) -> None:
    await start_service()
    await publisher.publish_events(
        [entity_event(publisher, "created", "o-1", 1, occurred_at=T0 + timedelta(seconds=1))]
    )

    async def stored() -> bool:
        return await count(pg, "SELECT count(*) FROM entity_events") == 1

    await wait_for(stored)


async def test_a_subscription_cannot_make_the_database_write_outside_the_replay_channels(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    """Only `stream.replay.*` may be named (the StreamSubscribe schema, and the only streams
    the database service's Redis user may append to). Any other name outside a short deny
    list was accepted: the database wrote stored events into a stream of the subscriber's
    choosing (under its ACL user the publish failed forever instead, and the subscription was
    never ended, taking a replay slot for good)."""
    await _one_event_stored(start_service, publisher, pg)
    for i, target in enumerate(["observability.alerts", "metadata.lookupx", "ae:db:subs"]):
        await subscribe(publisher, f"evil{i}", channel=target)

    async def dead() -> bool:
        return await redis.xlen(channels.dead_letter_key(channels.STREAM_SUBSCRIBE)) == 3

    await wait_for(dead)
    await _replayed_to_the_end(redis, await subscribe(publisher, "fine"))
    for target in ["observability.alerts", "metadata.lookupx", "ae:db:subs"]:
        assert not await redis.exists(channels.stream_key(target))
    assert not await redis.smembers("ae:db:subs")


async def test_a_subscription_id_cannot_name_another_subscriptions_keys(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    """Subscription ids are `[A-Za-z0-9_.-]` (the StreamSubscribe schema). With `:` allowed,
    a heartbeat for `s9:lease` wrote a hash at `ae:db:sub:s9:lease`, the lease key of `s9`,
    whose replay then could never take its lease (WRONGTYPE), and stopped every other replay
    of the instance with it."""
    await _one_event_stored(start_service, publisher, pg)
    await publisher.publish(channels.STREAM_HEARTBEAT, {"subscription_id": "s9:lease"})

    async def dead() -> bool:
        return await redis.xlen(channels.dead_letter_key(channels.STREAM_HEARTBEAT)) == 1

    await wait_for(dead)
    events = await _replayed_to_the_end(redis, await subscribe(publisher, "s9"))
    assert events[-1]["payload"]["count"] == 1


async def test_a_heartbeat_or_unsubscribe_for_a_subscription_it_does_not_know_is_counted(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    """`stream.heartbeat` and `stream.unsubscribe` are events (no reply): one naming a
    subscription the database does not know (never subscribed, or its state expired) was
    ignored without a trace. It is counted, by channel, and a heartbeat for one that has ended
    (timed out) too; an unsubscribe after the end is the subscriber's normal cleanup, not."""
    runtime = await start_service(subscription_timeout=timedelta(seconds=1))
    await publisher.publish_events(
        [entity_event(publisher, "created", "o-1", 1, occurred_at=T0 + timedelta(seconds=1))]
    )

    async def stored() -> bool:
        return await count(pg, "SELECT count(*) FROM entity_events") == 1

    await wait_for(stored)

    def ignored(channel: str, reason: str) -> float:
        value = runtime.metrics.registry.get_sample_value(
            "analytics_db_subscription_controls_ignored_total",
            {"channel": channel, "reason": reason},
        )
        return value or 0.0

    await publisher.publish(channels.STREAM_HEARTBEAT, {"subscription_id": "ghost"})
    await publisher.publish(channels.STREAM_UNSUBSCRIBE, {"subscription_id": "ghost2"})

    async def counted() -> bool:
        return (
            ignored(channels.STREAM_HEARTBEAT, "unknown") == 1
            and ignored(channels.STREAM_UNSUBSCRIBE, "unknown") == 1
        )

    await wait_for(counted, timeout=5)
    # a heartbeat to a live subscription is not counted; after its end (done) it is
    channel = await subscribe(publisher, "known")
    await publisher.publish(channels.STREAM_HEARTBEAT, {"subscription_id": "known"})
    await _replayed_to_the_end(redis, channel)
    await asyncio.sleep(0.3)
    assert ignored(channels.STREAM_HEARTBEAT, "unknown") == 1
    assert ignored(channels.STREAM_HEARTBEAT, "ended") == 0
    await publisher.publish(channels.STREAM_HEARTBEAT, {"subscription_id": "known"})
    await publisher.publish(channels.STREAM_UNSUBSCRIBE, {"subscription_id": "known"})

    async def ended() -> bool:
        return ignored(channels.STREAM_HEARTBEAT, "ended") == 1

    await wait_for(ended, timeout=5)
    await asyncio.sleep(0.3)
    assert ignored(channels.STREAM_UNSUBSCRIBE, "ended") == 0
    assert ignored(channels.STREAM_UNSUBSCRIBE, "unknown") == 1


async def test_a_backfill_whose_subscription_timed_out_fails_rather_than_completes(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    """The database ends a subscription without heartbeats with an end marker saying
    `reason: timeout` after only part of the history. The backfill took any end marker for the
    end of its history: it completed with the results of what it had read, and published them
    as final. It fails instead (and is retried with a new subscription)."""
    await start_service(
        replay_page_rows=2, replay_max_lag=4, subscription_timeout=timedelta(seconds=1)
    )
    await _store_orders(publisher, pg, 20)
    job = plan(ORDERS_COUNT, T0 + timedelta(minutes=1), timedelta(minutes=5))
    # heartbeats never in time: the database times the subscription out
    manager = _backfills(redis, idle_timeout_s=10.0, heartbeat_s=60.0)
    work = computation(job)
    # a subscriber that does not read (its group lags): the replay pauses at the lag bound
    real_xreadgroup = redis.xreadgroup

    async def slow_xreadgroup(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(2.0)
        return await real_xreadgroup(*args, **kwargs)

    redis.xreadgroup = slow_xreadgroup  # type: ignore[method-assign]
    try:
        with pytest.raises(BackfillFailed, match="timeout"):
            await asyncio.wait_for(manager.replay(job, work), timeout=20)
    finally:
        del redis.xreadgroup
    assert work.events < 20


async def test_a_backfill_with_no_result_tells_the_database_where_its_version_begins(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    """Version 2 of `orders_count` counts only orders in a region none of them is in: its
    backfill recomputes the history and finds no window. No result carries `version_since`,
    so the engine tells the database itself (`record_kpi_version`): version 1's results from
    the backfill's `since` on leave the history (they were left there for good before), and
    the job counts as done only once the database has it. Refused, the attempt fails (and is
    retried), it does not complete."""
    await start_service()
    await _store_orders(publisher, pg, 150)  # T0 .. T0 + 2.5 min
    old = [
        {
            "kpi_code": "orders_count",
            "value": 60.0,
            "window_start": (T0 + timedelta(minutes=m)).isoformat(),
            "window_end": (T0 + timedelta(minutes=m + 1)).isoformat(),
            "dimensions": {},
            "sample_count": 60,
            "definition_version": 1,
            "computed_at": (T0 + timedelta(minutes=m + 1)).isoformat(),
        }
        for m in range(3)
    ]
    engine = EventPublisher(redis, source="calculation_engine", stream_maxlen=10_000)
    await engine.publish_many([(channels.KPI_CALCULATED, r) for r in old])

    async def stored() -> bool:
        return await count(pg, "SELECT count(*) FROM kpi_results") == 3

    await wait_for(stored)
    client = RequestReplyClient(
        redis, service="calculation_engine", instance="t", default_timeout=15
    )
    recorded: list[tuple[str, int, datetime]] = []

    async def record_version(code: str, version: int, since: datetime) -> None:
        recorded.append((code, version, since))
        await client.request(
            channels.DATABASE_COMMAND,
            "record_kpi_version",
            {"kpi_code": code, "definition_version": version, "since": since.isoformat()},
        )

    async def refuse(code: str, version: int, since: datetime) -> None:
        raise RequestTimeout("database.command: no reply")

    nowhere = VersionedKPIDefinition.model_validate(
        {**ORDERS_COUNT.model_dump(mode="json"), "version": 2, "filter": "region == 'nowhere'"}
    )

    async def history() -> list[tuple[int, int]]:
        reply = await client.request(
            channels.DATABASE_QUERY,
            "kpi_history",
            {"kpi_code": "orders_count", "start": T0.isoformat(), "end": "2024-03-02"},
        )
        return [
            (
                int((datetime.fromisoformat(r["window_start"]) - T0).total_seconds() // 60),
                r["definition_version"],
            )
            for r in reply["rows"]
        ]

    try:
        # a cut 2 minutes in, horizon 1 minute: the backfill reaches back to minute 1
        cut = T0 + timedelta(minutes=2)
        refused = _backfills(redis, horizon=timedelta(minutes=1), record_version=refuse)
        job = refused.schedule(nowhere, cut)
        await refused._attempt(job)
        assert (job.done, job.attempts) == (False, 1)
        assert await history() == [(0, 1), (1, 1), (2, 1)]

        manager = _backfills(redis, horizon=timedelta(minutes=1), record_version=record_version)
        job = manager.schedule(nowhere, cut)
        assert job.since == T0 + timedelta(minutes=1)
        await manager._attempt(job)
        assert job.done and not job.failed
        assert recorded == [("orders_count", 2, job.since)]
        assert await history() == [(0, 1)]
    finally:
        await client.close()
