"""The event bus against a real Redis: seed-literal pub/sub, durable delivery, dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import orjson
import pytest
from redis.asyncio import Redis

from analytics_engine.core import channels
from analytics_engine.core.bus import (
    DeadLetters,
    Delivery,
    DeliveryBatch,
    DurableConsumer,
    EventPublisher,
    read_group,
)
from analytics_engine.core.errors import TransientError
from analytics_engine.core.redis import connect

pytestmark = pytest.mark.asyncio


def consumer(
    redis: Redis,
    group: str,
    handler: Callable[[Sequence[Delivery]], Awaitable[None]],
    *,
    name: str = "c1",
    chans: Sequence[str] = (channels.ENTITY_CREATED,),
    **kw: object,
) -> DurableConsumer:
    return DurableConsumer(
        redis,
        channels=chans,
        group=group,
        consumer=name,
        handler=handler,
        dead_letters=DeadLetters(redis, service=group),
        block_ms=100,
        **kw,  # type: ignore[arg-type]
    )


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def pending(redis: Redis, stream: str, group: str = "database_service") -> int:
    return int((await redis.xpending(stream, group))["pending"])


def _flat(reply: object) -> list[tuple[bytes, tuple[bytes, dict[bytes, bytes]]]]:
    """redis-py's parsed XREADGROUP reply, flattened as the bus works with it."""
    return [
        (key, (entry_id, fields or {}))
        for key, items in (reply or [])  # type: ignore[attr-defined]
        for entry_id, fields in items
    ]


async def test_read_group_returns_what_redis_py_parses_from_the_same_reads(redis: Redis) -> None:
    """`read_group` skips redis-py's reply conversion: pinned to it, for new entries of two
    streams, a multi-field entry, this consumer's pending entries and one trimmed meanwhile."""
    keys = [f"ae:stream:test.read.{n}".encode() for n in ("a", "b")]
    for key in keys:
        for group in ("raw", "parsed"):
            await redis.xgroup_create(key, group, id="0", mkstream=True)
    for i in range(5):
        await redis.xadd(keys[0], {"m": f"a{i}"})
        await redis.xadd(keys[1], {"m": f"b{i}"})
    await redis.xadd(keys[1], {"m": "two", "x": "fields"})
    new = dict.fromkeys(keys, b">")
    raw = await read_group(redis, "raw", "c", new, count=4, block_ms=100)
    parsed = _flat(await redis.xreadgroup("parsed", "c", new, count=4, block=100))
    assert raw == parsed
    assert [key for key, _ in raw] == [keys[0]] * 4 + [keys[1]] * 4
    rest = await read_group(redis, "raw", "c", new, count=10, noack=True)
    assert rest == _flat(await redis.xreadgroup("parsed", "c", new, count=10, noack=True))
    assert rest[-1][1][1] == {b"m": b"two", b"x": b"fields"}
    # the first pending entry of stream a is trimmed away: its fields come back empty
    await redis.xdel(keys[0], raw[0][1][0])
    own = dict.fromkeys(keys, b"0")
    pending_raw = await read_group(redis, "raw", "c", own, count=10)
    assert pending_raw == _flat(await redis.xreadgroup("parsed", "c", own, count=10))
    assert pending_raw[0] == (keys[0], (raw[0][1][0], {}))
    assert [entry for _, entry in pending_raw[1:]] == [entry for _, entry in raw[1:]]
    assert await read_group(redis, "raw", "c", new, count=10) == []


async def test_a_capped_channel_keeps_its_stream_short_and_the_others_keep_the_default(
    redis: Redis,
) -> None:
    """`archival.events` carries whole batches: its stream is capped far below
    `BUS_STREAM_MAXLEN` (approximately: Redis trims whole nodes of up to 100 entries)."""
    cap = channels.channel_spec(channels.ARCHIVAL_EVENTS).maxlen
    assert cap is not None
    publisher = EventPublisher(redis, source="database_service", stream_maxlen=10_000)
    n = cap + 400
    await publisher.publish_many(
        item
        for i in range(n)
        for item in ((channels.ARCHIVAL_EVENTS, {"i": i}), (channels.ENTITY_CREATED, {"i": i}))
    )
    assert cap <= await redis.xlen(channels.stream_key(channels.ARCHIVAL_EVENTS)) <= cap + 100
    assert await redis.xlen(channels.stream_key(channels.ENTITY_CREATED)) == n
    # a default below the cap wins
    await redis.delete(channels.stream_key(channels.ARCHIVAL_EVENTS))
    small = EventPublisher(redis, source="database_service", stream_maxlen=cap // 4)
    await small.publish_many((channels.ARCHIVAL_EVENTS, {"i": i}) for i in range(cap + 400))
    assert await redis.xlen(channels.stream_key(channels.ARCHIVAL_EVENTS)) <= cap // 4 + 100


async def test_every_event_is_published_on_its_pubsub_channel_exactly_as_documented(
    redis: Redis,
) -> None:
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe("kpi.calculated.*")
    await pubsub.subscribe(channels.ENTITY_CREATED)
    publisher = EventPublisher(redis, source="data_simulator", stream_maxlen=10_000)
    event = await publisher.publish(channels.ENTITY_CREATED, {"entity_id": "o-1"})
    await publisher.publish(channels.kpi_channel("revenue"), {"value": 1.5})
    seen = []
    for _ in range(50):
        message = await pubsub.get_message(timeout=0.2)
        if message:
            seen.append(message)
        if len(seen) == 2:
            break
    await pubsub.aclose()
    by_channel = {m["channel"]: orjson.loads(m["data"]) for m in seen}
    created = by_channel[channels.ENTITY_CREATED.encode()]
    assert set(created) == {"event_id", "event_type", "source", "timestamp", "payload"}
    assert created["event_id"] == event.event_id
    assert created["event_type"] == channels.ENTITY_CREATED
    assert created["source"] == "data_simulator"
    assert created["payload"] == {"entity_id": "o-1"}
    assert by_channel[b"kpi.calculated.revenue"]["payload"] == {"value": 1.5}
    # per-KPI channels are live-only: no stream is written for them
    assert not await redis.exists(channels.stream_key("kpi.calculated.revenue"))


async def test_each_subscribing_service_gets_every_event_and_replicas_share_them(
    redis: Redis,
) -> None:
    publisher = EventPublisher(redis, source="sim", stream_maxlen=10_000)
    got: dict[str, list[str]] = {"db-a": [], "db-b": [], "calc": []}

    def collect(name: str) -> Callable[[Sequence[Delivery]], Awaitable[None]]:
        async def handle(batch: Sequence[Delivery]) -> None:
            got[name].extend(d.event.event_id for d in batch)

        return handle

    consumers = [
        consumer(redis, "database_service", collect("db-a"), name="a", batch_size=7),
        consumer(redis, "database_service", collect("db-b"), name="b", batch_size=7),
        consumer(redis, "calculation_engine", collect("calc")),
    ]
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    sent = [
        e.event_id
        for e in await publisher.publish_many(
            (channels.ENTITY_CREATED, {"i": i}) for i in range(300)
        )
    ]
    await wait_for(lambda: len(got["db-a"]) + len(got["db-b"]) == 300 and len(got["calc"]) == 300)
    for c in consumers:
        c.stop()
    await asyncio.gather(*tasks)
    assert sorted(got["db-a"] + got["db-b"]) == sorted(sent)
    assert not set(got["db-a"]) & set(got["db-b"])
    assert got["db-a"] and got["db-b"], "both replicas should have taken part"
    assert got["calc"] == sent  # one consumer sees the stream in publish order
    pending = await redis.xpending(channels.stream_key(channels.ENTITY_CREATED), "database_service")
    assert pending["pending"] == 0


async def test_events_published_while_a_consumer_is_down_arrive_after_it_restarts(
    redis: Redis,
) -> None:
    publisher = EventPublisher(redis, source="sim", stream_maxlen=10_000)
    got: list[int] = []

    async def handle(batch: Sequence[Delivery]) -> None:
        got.extend(d.event.payload["i"] for d in batch)

    first = consumer(redis, "database_service", handle)
    task = asyncio.create_task(first.run())
    await publisher.publish_many((channels.ENTITY_CREATED, {"i": i}) for i in range(10))
    await wait_for(lambda: len(got) == 10)
    first.stop()
    await task
    await publisher.publish_many((channels.ENTITY_CREATED, {"i": i}) for i in range(10, 50))
    again = consumer(redis, "database_service", handle)
    task = asyncio.create_task(again.run())
    await wait_for(lambda: len(got) == 50)
    again.stop()
    await task
    assert got == list(range(50))


@pytest.mark.parametrize(
    ("lazy", "read_ahead"),
    [(False, False), (True, False), (False, True)],
    ids=["events", "lazy_events", "read_ahead"],
)
async def test_unacknowledged_events_of_a_crashed_consumer_are_redelivered(
    redis: Redis, lazy: bool, read_ahead: bool
) -> None:
    """Whatever a consumer held when it crashed (the batch in hand, and with `read_ahead` the
    next one too) is pending, and its restart re-reads it before anything new."""
    publisher = EventPublisher(redis, source="sim", stream_maxlen=10_000)
    crash_once = asyncio.Event()
    got: list[int] = []
    options: dict[str, object] = {"lazy_events": lazy, "read_ahead": read_ahead, "batch_size": 5}

    async def crashing(batch: Sequence[Delivery]) -> None:
        crash_once.set()
        await asyncio.sleep(3600)  # "crash": the task is cancelled while holding the batch

    await publisher.publish_many((channels.ENTITY_CREATED, {"i": i}) for i in range(20))
    doomed = consumer(redis, "database_service", crashing, name="worker-1", **options)
    task = asyncio.create_task(doomed.run())
    await crash_once.wait()
    stream = channels.stream_key(channels.ENTITY_CREATED)
    held = 10 if read_ahead else 5  # with read_ahead: the batch in hand and the next one
    for _ in range(100):
        if await pending(redis, stream) == held:
            break
        await asyncio.sleep(0.02)
    assert await pending(redis, stream) == held
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def handle(batch: Sequence[Delivery]) -> None:
        got.extend(d.event.payload["i"] for d in batch)

    # the same consumer name after a restart re-reads its own pending entries first
    restarted = consumer(redis, "database_service", handle, name="worker-1", **options)
    task = asyncio.create_task(restarted.run())
    await wait_for(lambda: len(got) == 20)
    restarted.stop()
    await task
    assert sorted(got) == list(range(20))
    assert await pending(redis, stream) == 0


async def test_held_entries_are_acknowledged_by_id_with_the_handlers_checkpoint(
    redis: Redis,
) -> None:
    """A handler that keeps only entry ids (not deliveries) acknowledges them later, in one
    transaction with its own commands."""
    publisher = EventPublisher(redis, source="sim", stream_maxlen=10_000)
    held: dict[str, list[bytes]] = {}

    async def hold(batch: Sequence[Delivery]) -> None:
        for d in batch:
            held.setdefault(d.channel, []).append(d.id)

    await publisher.publish_many((channels.ENTITY_CREATED, {"i": i}) for i in range(7))
    holder = consumer(redis, "archival_service", hold, auto_ack=False)
    task = asyncio.create_task(holder.run())
    await wait_for(lambda: sum(map(len, held.values())) == 7)
    stream = channels.stream_key(channels.ENTITY_CREATED)
    assert (await redis.xpending(stream, "archival_service"))["pending"] == 7
    await holder.ack_ids(held, also=lambda pipe: pipe.set("held-checkpoint", "7"))
    holder.stop()
    await task
    assert (await redis.xpending(stream, "archival_service"))["pending"] == 0
    assert await redis.get("held-checkpoint") == b"7"


async def test_a_peer_claims_events_abandoned_by_a_dead_replica(redis: Redis) -> None:
    publisher = EventPublisher(redis, source="sim", stream_maxlen=10_000)
    held = asyncio.Event()

    async def hang(batch: Sequence[Delivery]) -> None:
        held.set()
        await asyncio.sleep(3600)

    await publisher.publish_many((channels.ENTITY_CREATED, {"i": i}) for i in range(5))
    dead = consumer(redis, "database_service", hang, name="dead", claim_idle_ms=300)
    dead_task = asyncio.create_task(dead.run())
    await held.wait()
    dead_task.cancel()
    got: list[int] = []

    async def handle(batch: Sequence[Delivery]) -> None:
        got.extend(d.event.payload["i"] for d in batch)

    peer = consumer(redis, "database_service", handle, name="peer", claim_idle_ms=300)
    peer_task = asyncio.create_task(peer.run())
    await wait_for(lambda: len(got) == 5)
    peer.stop()
    await peer_task
    assert sorted(got) == list(range(5))


@pytest.mark.parametrize("lazy", [False, True], ids=["events", "lazy_events"])
async def test_malformed_and_poison_events_go_to_dead_letters_and_good_ones_keep_flowing(
    redis: Redis, lazy: bool
) -> None:
    publisher = EventPublisher(redis, source="sim", stream_maxlen=10_000)
    key = channels.stream_key(channels.ENTITY_CREATED)
    await redis.xadd(key, {b"m": b"{not json"})
    await redis.xadd(key, {b"m": orjson.dumps({"event_type": "x"})})  # missing fields
    await publisher.publish(channels.ENTITY_CREATED, {"i": -1})  # poison: handler always fails
    await publisher.publish_many((channels.ENTITY_CREATED, {"i": i}) for i in range(10))
    got: list[int] = []
    kinds: set[type] = set()

    async def handle(batch: Sequence[Delivery]) -> None:
        # a lazy consumer's batches carry the payloads; the bus isolates the poison event
        # through deliveries built on demand
        kinds.add(type(batch))
        payloads = batch.payloads if isinstance(batch, DeliveryBatch) else None
        for n, d in enumerate(batch):
            assert payloads is None or payloads[n] == d.event.payload
            if d.event.payload["i"] < 0:
                raise ValueError("cannot store a negative i")
        got.extend(d.event.payload["i"] for d in batch)

    c = consumer(redis, "database_service", handle, max_deliveries=3, lazy_events=lazy)
    task = asyncio.create_task(c.run())
    await wait_for(lambda: len(got) == 10)
    dlq = channels.dead_letter_key(channels.ENTITY_CREATED)
    for _ in range(200):
        if await redis.xlen(dlq) == 3:
            break
        await asyncio.sleep(0.05)
    c.stop()
    await task
    entries = await redis.xrange(dlq)
    reasons = [fields[b"reason"].decode() for _, fields in entries]
    assert len(entries) == 3
    assert any("malformed event" in r for r in reasons)
    assert any("cannot store a negative i" in r and "3 times" in r for r in reasons)
    assert entries[0][1][b"original"] == b"{not json"
    assert sorted(got) == list(range(10))
    assert (DeliveryBatch in kinds) == lazy
    pending = await redis.xpending(key, "database_service")
    assert pending["pending"] == 0


async def test_transient_errors_are_retried_without_dead_lettering(redis: Redis) -> None:
    publisher = EventPublisher(redis, source="sim", stream_maxlen=10_000)
    await publisher.publish_many((channels.ENTITY_CREATED, {"i": i}) for i in range(5))
    failures = 0
    got: list[int] = []

    async def flaky(batch: Sequence[Delivery]) -> None:
        nonlocal failures
        if failures < 8:  # more failures than max_deliveries: an outage, not a bad event
            failures += 1
            raise TransientError("database unavailable")
        got.extend(d.event.payload["i"] for d in batch)

    c = consumer(redis, "database_service", flaky, max_deliveries=2)
    task = asyncio.create_task(c.run())
    await wait_for(lambda: len(got) == 5)
    c.stop()
    await task
    assert got == list(range(5))
    assert await redis.xlen(channels.dead_letter_key(channels.ENTITY_CREATED)) == 0


@pytest.mark.parametrize("linger_ms", [0, 300])
async def test_linger_tops_up_a_short_batch_once(redis: Redis, linger_ms: int) -> None:
    """With `linger_ms`, events arriving shortly after a short read join its batch; without it
    the first read is handed over at once."""
    publisher = EventPublisher(redis, source="sim", stream_maxlen=10_000)
    batches: list[list[int]] = []

    async def handle(deliveries: Sequence[Delivery]) -> None:
        batches.append([d.event.payload["n"] for d in deliveries])

    c = consumer(redis, f"linger-{linger_ms}", handle, batch_size=10, linger_ms=linger_ms)
    task = asyncio.create_task(c.run())
    await asyncio.wait_for(c.ready.wait(), 5)
    await publisher.publish(channels.ENTITY_CREATED, {"n": 0})
    await asyncio.sleep(0.1)  # inside the linger: the consumer has read event 0 and waits
    await publisher.publish_many((channels.ENTITY_CREATED, {"n": n}) for n in (1, 2))
    await wait_for(lambda: sum(map(len, batches)) == 3)
    c.stop()
    await task
    assert batches == ([[0, 1, 2]] if linger_ms else [[0], [1, 2]])


async def test_a_checkpointed_consumer_leaves_nothing_pending_and_rewinds_to_its_position(
    redis: Redis,
) -> None:
    """`checkpointed`: reads leave no pending entries; `rewind` re-reads what follows a
    position (what a restart after a checkpoint does) and drops leftover pending entries."""
    publisher = EventPublisher(redis, source="sim", stream_maxlen=10_000)
    key = channels.stream_key(channels.ENTITY_CREATED)
    await publisher.publish_many((channels.ENTITY_CREATED, {"n": n}) for n in range(10))
    ids = [entry_id for entry_id, _ in await redis.xrange(key)]
    # a reader of the previous kind left entries 0-4 pending in the group
    await redis.xgroup_create(key, "calculation_engine", id="0")
    await redis.xreadgroup("calculation_engine", "old", {key: ">"}, count=5)
    got: list[int] = []

    async def handle(deliveries: Sequence[Delivery]) -> None:
        got.extend(d.event.payload["n"] for d in deliveries)

    c = consumer(redis, "calculation_engine", handle, checkpointed=True)
    await c.rewind({channels.ENTITY_CREATED: ids[2].decode()})  # a checkpoint covered 0-2
    assert (await redis.xpending(key, "calculation_engine"))["pending"] == 0
    task = asyncio.create_task(c.run())
    await wait_for(lambda: len(got) == 7)
    await publisher.publish(channels.ENTITY_CREATED, {"n": 10})
    await wait_for(lambda: len(got) == 8)
    c.stop()
    await task
    assert got == list(range(3, 11))
    assert (await redis.xpending(key, "calculation_engine"))["pending"] == 0


async def test_a_checkpointed_consumer_reads_again_what_a_lost_reply_skipped(
    redis: Redis, redis_url: str
) -> None:
    """A read whose reply is lost (the connection dropped) moves the group past entries the
    consumer never received; after reconnecting it reads on from what its handler has."""
    publisher = EventPublisher(redis, source="sim", stream_maxlen=10_000)
    key = channels.stream_key(channels.ENTITY_CREATED)
    reader = connect(redis_url, retries=0)  # as the services' stream client
    reader.connection_pool.connection_kwargs["client_name"] = "checkpointed-reader"
    got: list[int] = []

    async def handle(deliveries: Sequence[Delivery]) -> None:
        got.extend(d.event.payload["n"] for d in deliveries)
        if got[-1] == 2:
            # while the consumer is busy here: 3-5 arrive and a read whose reply never
            # reaches it takes them, then its connection drops
            await publisher.publish_many((channels.ENTITY_CREATED, {"n": n}) for n in (3, 4, 5))
            await redis.xreadgroup("calculation_engine", "c1", {key: ">"}, noack=True)
            for client in await redis.client_list():
                if client["name"] == "checkpointed-reader":
                    await redis.client_kill_filter(_id=client["id"])

    c = consumer(reader, "calculation_engine", handle, checkpointed=True)
    await c.rewind({})
    task = asyncio.create_task(c.run())
    await asyncio.wait_for(c.ready.wait(), 5)
    await publisher.publish_many((channels.ENTITY_CREATED, {"n": n}) for n in range(3))
    await wait_for(lambda: len(got) >= 6)
    await publisher.publish(channels.ENTITY_CREATED, {"n": 6})
    await wait_for(lambda: len(got) == 7)
    c.stop()
    await task
    await reader.aclose()
    assert got == list(range(7))


async def test_a_read_ahead_consumer_delivers_every_entry_once_in_order(redis: Redis) -> None:
    publisher = EventPublisher(redis, source="sim", stream_maxlen=10_000)
    got: list[int] = []
    batches = 0

    async def slow(batch: Sequence[Delivery]) -> None:
        nonlocal batches
        batches += 1
        got.extend(d.event.payload["i"] for d in batch)
        await asyncio.sleep(0.01)  # the next read is under way meanwhile

    await publisher.publish_many((channels.ENTITY_CREATED, {"i": i}) for i in range(50))
    c = consumer(redis, "database_service", slow, batch_size=5, read_ahead=True)
    task = asyncio.create_task(c.run())
    await wait_for(lambda: len(got) == 50)
    await publisher.publish_many((channels.ENTITY_CREATED, {"i": i}) for i in range(50, 53))
    await wait_for(lambda: len(got) == 53)
    c.stop()
    await task
    assert got == list(range(53))
    assert batches >= 11
    stream = channels.stream_key(channels.ENTITY_CREATED)
    assert (await redis.xpending(stream, "database_service"))["pending"] == 0


async def test_a_stopping_read_ahead_consumer_hands_over_the_batch_it_read_ahead(
    redis: Redis,
) -> None:
    publisher = EventPublisher(redis, source="sim", stream_maxlen=10_000)
    got: list[int] = []
    c: DurableConsumer

    async def stop_at_first(batch: Sequence[Delivery]) -> None:
        got.extend(d.event.payload["i"] for d in batch)
        if len(got) == 5:
            c.stop()
            await asyncio.sleep(0.2)  # the read ahead arrives meanwhile

    await publisher.publish_many((channels.ENTITY_CREATED, {"i": i}) for i in range(20))
    c = consumer(redis, "database_service", stop_at_first, batch_size=5, read_ahead=True)
    await c.run()
    assert got == list(range(10))  # the batch in hand and the one read ahead, nothing more
    stream = channels.stream_key(channels.ENTITY_CREATED)
    assert (await redis.xpending(stream, "database_service"))["pending"] == 0
