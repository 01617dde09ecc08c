"""Per-service Redis ACL users against a real Redis 7: each service can do its job and no more."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from acl_users import url
from redis.exceptions import NoPermissionError

from analytics_engine.core import channels
from analytics_engine.core.acl import SERVICE_ACCESS
from analytics_engine.core.bus import DeadLetters, Delivery, DurableConsumer, EventPublisher
from analytics_engine.core.envelopes import Request
from analytics_engine.core.redis import connect
from analytics_engine.core.request_reply import RequestReplyClient, RequestReplyServer
from analytics_engine.localstack import RedisServer

pytestmark = pytest.mark.asyncio


async def test_the_default_user_is_disabled(acl_redis: RedisServer) -> None:
    client = connect(f"redis://127.0.0.1:{acl_redis.port}/0")
    with pytest.raises(Exception, match=r"(?i)auth|NOPERM|permission"):
        await client.ping()
    await client.aclose()


async def test_the_simulator_publishes_entity_events_but_cannot_forge_a_kpi_result(
    acl_redis: RedisServer,
) -> None:
    redis = connect(url(acl_redis, "data_simulator"))
    publisher = EventPublisher(redis, source="data_simulator", stream_maxlen=10_000)
    await publisher.publish(channels.ENTITY_CREATED, {"entity_id": "o-1"})
    with pytest.raises(NoPermissionError):
        await publisher.publish(channels.KPI_CALCULATED, {"kpi_code": "x"})
    with pytest.raises(NoPermissionError):
        await redis.publish(channels.kpi_channel("revenue"), b"{}")
    with pytest.raises(NoPermissionError):  # nor read what others consume
        await redis.xrange(channels.stream_key(channels.ENTITY_CREATED))
    with pytest.raises(NoPermissionError):
        await redis.flushall()
    await redis.aclose()


async def test_consumers_read_their_streams_but_cannot_append_to_them(
    acl_redis: RedisServer,
) -> None:
    producer = connect(url(acl_redis, "data_simulator"))
    await EventPublisher(producer, source="data_simulator", stream_maxlen=10_000).publish_many(
        (channels.ENTITY_UPDATED, {"i": i}) for i in range(5)
    )
    redis = connect(url(acl_redis, "calculation_engine"))
    got: list[int] = []

    async def handle(batch: Sequence[Delivery]) -> None:
        got.extend(d.event.payload["i"] for d in batch)

    consumer = DurableConsumer(
        redis,
        channels=[channels.ENTITY_UPDATED],
        group="calculation_engine",
        consumer="c1",
        handler=handle,
        dead_letters=DeadLetters(redis, service="calculation_engine"),
        block_ms=100,
    )
    task = asyncio.create_task(consumer.run())
    for _ in range(100):
        if len(got) == 5:
            break
        await asyncio.sleep(0.05)
    consumer.stop()
    await task
    assert got == list(range(5))
    with pytest.raises(NoPermissionError):
        await redis.xadd(channels.stream_key(channels.ENTITY_UPDATED), {b"m": b"{}"})
    # it may publish its own results
    await EventPublisher(redis, source="calculation_engine", stream_maxlen=1000).publish(
        channels.KPI_CALCULATED, {"kpi_code": "x"}
    )
    await redis.aclose()
    await producer.aclose()


async def test_request_reply_works_between_the_right_users_only(acl_redis: RedisServer) -> None:
    server_redis = connect(url(acl_redis, "database_service"))

    async def echo(req: Request) -> Mapping[str, Any]:
        return {"ok": req.payload.get("q")}

    server = RequestReplyServer(
        server_redis,
        channel=channels.DATABASE_QUERY,
        source="database_service",
        instance="d1",
        handlers={"execute_query": echo},
        dead_letters=DeadLetters(server_redis, service="database_service"),
    )
    await server.start()
    client_redis = connect(url(acl_redis, "calculation_engine"))
    client = RequestReplyClient(client_redis, service="calculation_engine", instance="c1")
    assert await client.request(channels.DATABASE_QUERY, "execute_query", {"q": 1}) == {"ok": 1}
    # the simulator has no business with the database
    sim = connect(url(acl_redis, "data_simulator"))
    with pytest.raises(NoPermissionError):
        await sim.publish(channels.DATABASE_QUERY, b"{}")
    await client.close()
    await server.stop()
    for r in (server_redis, client_redis, sim):
        await r.aclose()


async def test_every_service_can_publish_its_heartbeat(acl_redis: RedisServer) -> None:
    for service in SERVICE_ACCESS:
        redis = connect(url(acl_redis, service))
        publisher = EventPublisher(redis, source=service, stream_maxlen=1000)
        await publisher.publish(channels.SERVICE_HEARTBEAT, {"service": service})
        await redis.aclose()
