"""Publishing through the admin's Redis function, on a real Redis 7: services may call it
(FCALL) and run no Lua of their own; a Redis without it is an outage, not a crash nor a loss."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence

import pytest
from acl_users import url
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

from analytics_engine.core import channels
from analytics_engine.core.acl import SERVICE_ACCESS
from analytics_engine.core.bus import (
    FIELD,
    LIBRARY,
    LIBRARY_CODE,
    PUBLISH_FUNCTION,
    REDIS_ERRORS,
    DeadLetters,
    Delivery,
    DurableConsumer,
    EventPublisher,
    FunctionMissing,
)
from analytics_engine.core.redis import connect
from analytics_engine.localstack import RedisServer

pytestmark = pytest.mark.asyncio

ADMIN = "redis://admin:admin-pw@127.0.0.1:{port}/0"
BUSY = "while true do end"


async def _dryrun(admin: Redis, user: str, *command: object) -> str:
    reply = await admin.execute_command("ACL", "DRYRUN", user, *command)
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _scripting(key: str) -> list[tuple[object, ...]]:
    """Every way to run or load Lua, or to remove the functions everyone calls."""
    return [
        ("EVAL", BUSY, 0),
        ("EVAL", "return redis.call('DEL', KEYS[1])", 1, key),
        ("EVAL_RO", "return 1", 0),
        ("EVALSHA", "a" * 40, 0),
        ("EVALSHA_RO", "a" * 40, 0),
        ("SCRIPT", "LOAD", BUSY),
        ("SCRIPT", "EXISTS", "a" * 40),
        ("SCRIPT", "FLUSH"),
        ("SCRIPT", "KILL"),
        ("FUNCTION", "LOAD", "REPLACE", LIBRARY_CODE),
        ("FUNCTION", "DELETE", LIBRARY),
        ("FUNCTION", "FLUSH"),
        ("FUNCTION", "LIST"),
        ("FUNCTION", "DUMP"),
        ("FUNCTION", "RESTORE", "x"),
        ("FUNCTION", "KILL"),
        ("FCALL_RO", PUBLISH_FUNCTION, 0, FIELD),
    ]


async def test_no_service_may_run_or_load_lua_but_each_may_call_the_publish_function(
    acl_redis: RedisServer,
) -> None:
    admin = connect(ADMIN.format(port=acl_redis.port))
    key = channels.stream_key(channels.ENTITY_CREATED)
    allowed = [
        (service, command[:2])
        for service in SERVICE_ACCESS
        for command in _scripting(key)
        if await _dryrun(admin, service, *command) == "OK"
    ]
    assert allowed == []
    for service in SERVICE_ACCESS:  # heartbeats: no stream
        assert await _dryrun(admin, service, "FCALL", PUBLISH_FUNCTION, 0, FIELD) == "OK"
    # the streams a service produces, and only those, are keys it may declare to the function
    verdict = await _dryrun(admin, "data_simulator", "FCALL", PUBLISH_FUNCTION, 1, key, FIELD)
    assert verdict == "OK"
    kpi = channels.stream_key(channels.KPI_CALCULATED)
    verdict = await _dryrun(admin, "data_simulator", "FCALL", PUBLISH_FUNCTION, 1, kpi, FIELD)
    assert verdict != "OK" and kpi in verdict
    await admin.aclose()


async def test_a_service_is_refused_lua_for_real_and_still_publishes(
    acl_redis: RedisServer,
) -> None:
    admin = connect(ADMIN.format(port=acl_redis.port))
    simulator = connect(url(acl_redis, "data_simulator"))
    key = channels.stream_key(channels.ENTITY_CREATED)
    with pytest.raises(NoPermissionError):
        await simulator.eval(BUSY, 0)  # would freeze Redis for everyone
    with pytest.raises(NoPermissionError):
        await simulator.evalsha("a" * 40, 0)
    with pytest.raises(NoPermissionError):
        await simulator.script_load(BUSY)
    with pytest.raises(NoPermissionError):
        await simulator.function_load(LIBRARY_CODE.replace(LIBRARY, "mine"), replace=True)
    with pytest.raises(NoPermissionError):
        await simulator.function_delete(LIBRARY)
    with pytest.raises(NoPermissionError):
        await simulator.function_flush()
    assert await admin.fcall(PUBLISH_FUNCTION, 0, FIELD) == []  # still there
    before = await admin.xlen(key)
    publisher = EventPublisher(simulator, source="data_simulator", stream_maxlen=10_000)
    await publisher.publish_many((channels.ENTITY_CREATED, {"i": i}) for i in range(3))
    assert await admin.xlen(key) == before + 3
    # nor may a service publish, through the function, where its ACL does not let it append
    with pytest.raises(NoPermissionError):
        await publisher.publish(channels.KPI_CALCULATED, {"kpi_code": "x"})
    for client in (admin, simulator):
        await client.aclose()


# -- the function missing: Redis restarted on an empty volume, before its loader ran ----------


@pytest.fixture
def no_function(redis_url: str) -> Iterator[str]:
    """`redis_url` on a Redis that lost the publish function; loaded again afterwards."""
    import redis

    with redis.Redis.from_url(redis_url) as client:
        client.function_delete(LIBRARY)
    try:
        yield redis_url
    finally:
        with redis.Redis.from_url(redis_url) as client:
            client.function_load(LIBRARY_CODE, replace=True)


async def test_publishing_without_the_function_is_a_transient_error_naming_the_fix(
    no_function: str, caplog: pytest.LogCaptureFixture
) -> None:
    redis = connect(no_function)
    publisher = EventPublisher(redis, source="data_simulator", stream_maxlen=10_000)
    key = channels.stream_key(channels.ENTITY_CREATED)
    with caplog.at_level(logging.ERROR), pytest.raises(FunctionMissing) as raised:
        await publisher.publish(channels.ENTITY_CREATED, {"i": 1})
    assert isinstance(raised.value, REDIS_ERRORS)  # every caller's outage handling
    assert "FUNCTION LOAD REPLACE" in str(raised.value)
    assert [r for r in caplog.records if PUBLISH_FUNCTION in str(r.__dict__.get("fix"))]
    assert await redis.xlen(key) == 0

    # in a transaction, the commands beside it (an acknowledgement) must not run without it
    pipe = redis.pipeline(transaction=True)
    publisher.add_to_pipeline(pipe, [publisher.make_event(channels.ENTITY_CREATED, {"i": 2})])
    pipe.set("ae:test:acked", b"1")
    with pytest.raises(FunctionMissing):
        await pipe.execute()
    assert not await redis.exists("ae:test:acked") and await redis.xlen(key) == 0

    await redis.function_load(LIBRARY_CODE)  # the loader ran: publishing resumes
    await publisher.publish(channels.ENTITY_CREATED, {"i": 3})
    pipe = redis.pipeline(transaction=True)
    publisher.add_to_pipeline(pipe, [publisher.make_event(channels.ENTITY_CREATED, {"i": 4})])
    pipe.set("ae:test:acked", b"1")
    await pipe.execute()
    assert await redis.exists("ae:test:acked") and await redis.xlen(key) == 2
    await redis.aclose()


async def test_a_consumer_publishing_without_the_function_waits_and_loses_nothing(
    no_function: str,
) -> None:
    """A handler that publishes its results and acknowledges in one MULTI (as the database
    service forwards results): no crash, no dead letter, nothing acknowledged unpublished;
    once the function is loaded the same event goes through."""
    redis = connect(no_function)
    stream_redis = connect(no_function, retries=0)
    source, target = channels.ENTITY_CREATED, channels.KPI_CALCULATED
    publisher = EventPublisher(redis, source="database_service", stream_maxlen=10_000)
    consumer: DurableConsumer | None = None
    calls = 0

    async def forward(batch: Sequence[Delivery]) -> None:
        nonlocal calls
        calls += 1
        events = [publisher.make_event(target, {"of": d.event.event_id}) for d in batch]
        assert consumer is not None
        await consumer.ack(batch, also=lambda pipe: publisher.add_to_pipeline(pipe, events))

    consumer = DurableConsumer(
        stream_redis,
        channels=[source],
        group="forwarder",
        consumer="f-1",
        handler=forward,
        dead_letters=DeadLetters(redis, service="database_service"),
        block_ms=50,
        auto_ack=False,
    )
    task = asyncio.create_task(consumer.run())
    await asyncio.wait_for(consumer.ready.wait(), 5)
    await redis.xadd(channels.stream_key(source), {FIELD: _event_bytes(publisher, source)})
    for _ in range(100):
        if calls >= 2:
            break
        await asyncio.sleep(0.05)
    assert calls >= 2, "the handler is retried"
    assert not task.done()
    assert await redis.xlen(channels.stream_key(target)) == 0
    pending = await redis.xpending(channels.stream_key(source), "forwarder")
    assert pending["pending"] == 1  # not acknowledged without its result
    assert await redis.xlen(channels.dead_letter_key(source)) == 0

    await redis.function_load(LIBRARY_CODE)
    for _ in range(200):  # the consumer backs off up to 5 s between attempts
        if await redis.xlen(channels.stream_key(target)) == 1:
            break
        await asyncio.sleep(0.05)
    assert await redis.xlen(channels.stream_key(target)) == 1
    pending = await redis.xpending(channels.stream_key(source), "forwarder")
    assert pending["pending"] == 0
    assert await redis.xlen(channels.dead_letter_key(source)) == 0
    consumer.stop()
    await asyncio.wait_for(task, 5)
    for client in (redis, stream_redis):
        await client.aclose()


def _event_bytes(publisher: EventPublisher, channel: str) -> bytes:
    from analytics_engine.core.bus import encode_event

    return encode_event(publisher.make_event(channel, {"i": 1}))


async def test_the_redis_functions_command_loads_the_library_as_admin_only(
    acl_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from analytics_engine.cli import main

    admin = connect(ADMIN.format(port=acl_redis.port))
    await admin.function_delete(LIBRARY)
    try:
        monkeypatch.setenv("REDIS_ADMIN_URL", url(acl_redis, "data_simulator"))
        assert main(["redis-functions"]) == 1  # a service's user may not load it
        assert "permission" in capsys.readouterr().err.lower()
        assert await admin.function_list() == []
        monkeypatch.setenv("REDIS_ADMIN_URL", ADMIN.format(port=acl_redis.port))
        assert main(["redis-functions"]) == 0
        assert main(["redis-functions"]) == 0  # idempotent
    finally:
        await admin.function_load(LIBRARY_CODE, replace=True)
    assert await admin.fcall(PUBLISH_FUNCTION, 0, FIELD) == []
    await admin.aclose()
