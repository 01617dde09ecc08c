"""Backpressure on a real Redis, run as the platform's own ACL users: a full stream makes its
publisher wait until the readers consume and retention trims; nothing unread is dropped."""

from __future__ import annotations

import asyncio

import pytest
from acl_users import url

from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher, read_group
from analytics_engine.core.metrics import CoreMetrics
from analytics_engine.core.redis import connect
from analytics_engine.core.retention import trim_consumed
from analytics_engine.localstack import RedisServer

pytestmark = pytest.mark.asyncio

DB, CALC = "database_service", "calculation_engine"
CAP = 1000  # the smallest `BUS_STREAM_MAXLEN` allowed


async def test_a_full_stream_makes_its_publisher_wait_and_drops_nothing(
    acl_redis: RedisServer,
) -> None:
    channel = channels.ENTITY_UPDATED
    key = channels.stream_key(channel)
    simulator = connect(url(acl_redis, "data_simulator"))
    database = connect(url(acl_redis, DB))
    calculation = connect(url(acl_redis, CALC))
    observability = connect(url(acl_redis, "observability_service"))
    metrics = CoreMetrics()
    publisher = EventPublisher(
        simulator, source="data_simulator", stream_maxlen=CAP, metrics=metrics
    )
    await database.xgroup_create(key, DB, id="0", mkstream=True)
    await calculation.xgroup_create(key, CALC, id="0")

    await publisher.publish_many((channel, {"i": i}) for i in range(CAP - 1))  # room: returns
    more = asyncio.create_task(
        publisher.publish_many((channel, {"i": i}) for i in range(CAP - 1, CAP + 199))
    )
    await asyncio.sleep(0.5)
    assert not more.done(), "the batch that filled the stream returns only once it has room"
    assert publisher.waiting_for == [channel]
    assert await observability.xlen(key) == CAP + 199  # appended, and nothing dropped for it
    # the readers consumed nothing yet: retention may not make room
    assert await trim_consumed(observability, channel) == 0
    await asyncio.sleep(0.3)
    assert not more.done()

    # the database service reads and acknowledges everything, the engine checkpoints it all
    read = await read_group(database, DB, "db-1", {key.encode(): b">"}, count=10 * CAP)
    ids = [entry_id for _, (entry_id, _) in read]
    await database.xack(key, DB, *ids)
    await calculation.hset(channels.stream_hold_key(channel), CALC, ids[-1])
    assert await trim_consumed(observability, channel) > 0
    await asyncio.wait_for(more, timeout=5)
    assert publisher.waiting_for == []

    payloads = [fields[b"m"] for _, (_, fields) in read]
    assert len(payloads) == CAP + 199
    assert [int(p.split(b'"i":')[1].rstrip(b"}")) for p in payloads] == list(range(CAP + 199))
    waited = metrics.registry.get_sample_value(
        "analytics_bus_publish_wait_seconds_total", {"channel": channel}
    )
    assert waited is not None and waited > 0.5
    for client in (simulator, database, calculation, observability):
        await client.aclose()


async def test_a_caller_s_transaction_waits_for_room_after_publishing(
    acl_redis: RedisServer,
) -> None:
    """Publishing inside a caller's MULTI (with its acknowledgements) cannot wait there: the
    caller waits after it (`wait_for_room`)."""
    channel = channels.ARCHIVE_KPI_RESULTS
    key = channels.stream_key(channel)
    database = connect(url(acl_redis, DB))
    archival = connect(url(acl_redis, "archival_service"))
    observability = connect(url(acl_redis, "observability_service"))
    publisher = EventPublisher(database, source=DB, stream_maxlen=CAP)
    await archival.xgroup_create(key, "archival_service", id="0", mkstream=True)
    events = [publisher.make_event(channel, {"i": i}) for i in range(CAP + 5)]
    async with database.pipeline(transaction=True) as pipe:
        publisher.add_to_pipeline(pipe, events)
        await pipe.execute()
    assert await database.xlen(key) == CAP + 5  # in the transaction: appended in full
    waiting = asyncio.create_task(publisher.wait_for_room([channel]))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    read = await read_group(archival, "archival_service", "a-1", {key.encode(): b">"}, count=CAP)
    await archival.xack(key, "archival_service", *[entry_id for _, (entry_id, _) in read])
    await trim_consumed(observability, channel)
    await asyncio.wait_for(waiting, timeout=5)
    for client in (database, archival, observability):
        await client.aclose()


async def test_streams_whose_producer_guarantees_delivery_are_trimmed_and_never_wait(
    acl_redis: RedisServer,
) -> None:
    database = connect(url(acl_redis, DB))
    publisher = EventPublisher(database, source=DB, stream_maxlen=CAP)
    replay = f"{channels.REPLAY_PREFIX}calculation_engine.test"
    for channel, n in ((channels.ARCHIVAL_EVENTS, 500), (replay, 3 * CAP)):
        await asyncio.wait_for(
            publisher.publish_many((channel, {"i": i}) for i in range(n)), timeout=5
        )
        assert await database.xlen(channels.stream_key(channel)) < n
    await asyncio.wait_for(publisher.wait_for_room([channels.ARCHIVAL_EVENTS, replay]), 1)
    await database.aclose()


async def test_a_stopping_service_does_not_wait(acl_redis: RedisServer) -> None:
    """Shutting down, a service finishes its work (a last checkpoint) instead of waiting for
    readers that may not come back: what it published stays published."""
    channel = channels.ENTITY_DEACTIVATED
    simulator = connect(url(acl_redis, "data_simulator"))
    database = connect(url(acl_redis, DB))
    await database.xgroup_create(channels.stream_key(channel), DB, id="0", mkstream=True)
    stopping = asyncio.Event()
    publisher = EventPublisher(
        simulator, source="data_simulator", stream_maxlen=CAP, stopping=stopping
    )
    blocked = asyncio.create_task(publisher.publish_many((channel, {"i": i}) for i in range(CAP)))
    await asyncio.sleep(0.3)
    assert not blocked.done() and publisher.waiting_for == [channel]
    stopping.set()
    await asyncio.wait_for(blocked, timeout=1)
    await asyncio.wait_for(publisher.wait_for_room([channel]), timeout=1)  # full, but stopping
    assert await database.xlen(channels.stream_key(channel)) == CAP
    for client in (simulator, database):
        await client.aclose()
