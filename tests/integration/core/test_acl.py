"""Per-service Redis ACL users against a real Redis 7: each service can do its job and no more."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from acl_users import url
from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, ResponseError

from analytics_engine.archival.compactor import CompactionLock, LockLost
from analytics_engine.archival.layout import (
    compaction_lock_key,
    compactions_key,
    intents_key,
    seen_key,
)
from analytics_engine.archival.ledger import Intent, Ledger
from analytics_engine.calculation.backfill import (
    DATABASE_GROUP,
    database_progress,
    unstored,
)
from analytics_engine.calculation.checkpoint_store import CheckpointStore, delete_strays, part_key
from analytics_engine.calculation.recent_ids_log import chunk_key
from analytics_engine.calculation.service import query_slots_key
from analytics_engine.core import channels
from analytics_engine.core.acl import REPLAY, SERVICE_ACCESS
from analytics_engine.core.bus import (
    FIELD,
    PUBLISH_FUNCTION,
    DeadLetters,
    Delivery,
    DurableConsumer,
    EventPublisher,
)
from analytics_engine.core.envelopes import Request
from analytics_engine.core.redis import connect
from analytics_engine.core.request_reply import RequestReplyClient, RequestReplyServer
from analytics_engine.database.subscriptions import SUBSCRIPTIONS_KEY, lease_key, state_key
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


# -- key management: only on the keys a service owns ----------------------------------------------

ADMIN = "redis://admin:admin-pw@127.0.0.1:{port}/0"
REPLAY_KEY = channels.stream_key(f"{channels.REPLAY_PREFIX}sub-1")
# The one exception: a backfill's replay stream, made for the engine alone, deleted once read.
DELETES_ONCE_READ = {"calculation_engine": [channels.stream_key(REPLAY)]}


def _stream_keys_of_the_platform() -> list[str]:
    """Every stream the channel table has (a replay stream for the pattern), every dead-letter
    stream and every retention hold."""
    named = {
        c.replace("*", "sub-1")
        for a in SERVICE_ACCESS.values()
        for c in (*a.publishes, *a.consumes, *a.serves)
    }
    durable = sorted(c for c in named if channels.channel_spec(c).durable)
    return [
        *(channels.stream_key(c) for c in durable),
        *(channels.dead_letter_key(c) for c in sorted(named)),
        *(channels.stream_hold_key(c) for c in durable),
    ]


def _key_management(key: str, own: str) -> list[tuple[str, ...]]:
    """Commands that delete, rename, expire or overwrite `key` whatever its type."""
    return [
        ("DEL", key),
        ("UNLINK", key),
        ("RENAME", key, own),
        ("RENAMENX", key, own),
        ("RENAME", own, key),
        ("EXPIRE", key, "1"),
        ("PEXPIRE", key, "1"),
        ("EXPIREAT", key, "1"),
        ("PERSIST", key),
        ("SET", key, "x"),
        ("GETDEL", key),
        ("COPY", own, key, "REPLACE"),
        ("MOVE", key, "1"),
        ("SUNIONSTORE", key, own),
        ("HSET", key, "f", "v"),
    ]


async def _dryrun(admin: Redis, user: str, command: Sequence[str]) -> str:
    reply = await admin.execute_command("ACL", "DRYRUN", user, *command)
    return reply.decode() if isinstance(reply, bytes) else str(reply)


async def test_no_service_may_delete_rename_expire_or_overwrite_streams_it_does_not_own(
    acl_redis: RedisServer,
) -> None:
    """The reviewer's finding: `calculation_engine DEL ae:stream:simulation.entity.created`,
    `... RENAME ... ae:calc:stolen`, `database_service DEL ae:stream:kpi.calculated` were
    allowed. Now no service may touch the streams it reads or writes (nor dead letters, nor
    retention holds) but through the stream commands; the one exception is the replay stream a
    backfill asked for, which the engine deletes once read."""
    admin = connect(ADMIN.format(port=acl_redis.port))
    allowed: list[tuple[str, tuple[str, ...]]] = []
    for service, access in SERVICE_ACCESS.items():
        own = f"{access.state_keys[0].rstrip('*')}stolen" if access.state_keys else "ae:x"
        deletable = DELETES_ONCE_READ.get(service, [])
        for key in _stream_keys_of_the_platform():
            for command in _key_management(key, own):
                if command[0] == "DEL" and any(fnmatch.fnmatchcase(key, p) for p in deletable):
                    continue
                if command[0] == "HSET" and key.startswith(channels.stream_hold_key("")):
                    continue  # the engine's checkpoint position (below)
                if await _dryrun(admin, service, command) == "OK":
                    allowed.append((service, command))
    assert allowed == []
    # a hold is a hash the rewinding reader sets its own field of, nothing more
    hold = channels.stream_hold_key(channels.ENTITY_CREATED)
    for service in SERVICE_ACCESS:
        verdict = await _dryrun(admin, service, ("HSET", hold, service, "1-0"))
        assert (verdict == "OK") == (service == "calculation_engine"), (service, verdict)
    await admin.aclose()


async def test_consumers_cannot_delete_nor_append_to_what_they_read_even_through_lua(
    acl_redis: RedisServer,
) -> None:
    admin = connect(ADMIN.format(port=acl_redis.port))
    producer = connect(url(acl_redis, "data_simulator"))
    await EventPublisher(producer, source="data_simulator", stream_maxlen=10_000).publish_many(
        (channels.ENTITY_CREATED, {"i": i}) for i in range(3)
    )
    key = channels.stream_key(channels.ENTITY_CREATED)
    length = await admin.xlen(key)  # (the Redis is the module's: earlier tests published too)
    calc = connect(url(acl_redis, "calculation_engine"))
    database = connect(url(acl_redis, "database_service"))
    for reader in (calc, database):
        await reader.xrange(key)  # it reads the stream...
        with pytest.raises(NoPermissionError):  # ... but may not remove it
            await reader.delete(key)
        with pytest.raises(NoPermissionError):
            await reader.rename(key, "ae:calc:stolen")
        with pytest.raises(NoPermissionError):
            await reader.expire(key, 1)
        with pytest.raises(NoPermissionError):
            await reader.set(key, b"x")
        with pytest.raises(NoPermissionError):  # no Lua of its own
            await reader.eval("return redis.call('DEL', KEYS[1])", 1, key)
        # the publish function runs with the caller's permissions: no XADD on what it reads
        with pytest.raises(ResponseError, match=r"(?i)permission|can't access"):
            await reader.fcall(PUBLISH_FUNCTION, 1, key, FIELD, 100, 0, 1, "x", b"{}")
    with pytest.raises(NoPermissionError):
        await database.delete(channels.stream_key(channels.KPI_CALCULATED))
    with pytest.raises(NoPermissionError):
        await calc.delete(channels.dead_letter_key(channels.ENTITY_CREATED))
    assert await admin.xlen(key) == length >= 3 and await admin.ttl(key) == -1
    for client in (admin, producer, calc, database):
        await client.aclose()


def _commands_the_services_send() -> dict[str, list[tuple[str, ...]]]:
    """What each service sends on which keys (grep of services/analytics_engine), beyond the
    publishing, consuming and request/reply the other tests here run for real."""
    entity = channels.stream_key(channels.ENTITY_CREATED)
    tick = channels.stream_key(channels.SIMULATION_TICK)
    checkpoint = "ae:calc:checkpoint"
    claim = channels.request_claim_key("c-1")
    claim_it = ("SET", claim, "x", "NX", "PX", "120000")
    sub = state_key("sub-1")
    lease = lease_key("sub-1")
    seen = seen_key("orders_count", "2024-01-01")
    calc_hold = channels.stream_hold_key(channels.ENTITY_CREATED)
    return {
        "calculation_engine": [
            # checkpoint (one value or a manifest and parts) and its dedupe ring chunks
            ("GET", checkpoint),
            ("SET", checkpoint, "x"),
            ("SET", part_key(checkpoint, 0), "x"),
            ("MGET", part_key(checkpoint, 0), part_key(checkpoint, 1)),
            ("DEL", part_key(checkpoint, 2), part_key(checkpoint, 3)),
            ("SET", chunk_key(checkpoint, 7), "x"),
            ("EXISTS", chunk_key(checkpoint, 7), chunk_key(checkpoint, 8)),
            ("MGET", chunk_key(checkpoint, 7)),
            ("DEL", chunk_key(checkpoint, 7)),
            # the sweep of keys no checkpoint lists
            ("SCAN", "0", "MATCH", f"{checkpoint}:*", "COUNT", "1000"),
            ("DEL", f"{checkpoint}:part:9", f"{checkpoint}:ids:9"),
            # the query KPIs' last slots, beside the checkpoint
            ("HGETALL", query_slots_key(checkpoint)),
            ("HSET", query_slots_key(checkpoint), "orders_per_minute", "{}"),
            # retention hold and rewind
            ("HSET", calc_hold, "calculation_engine", "1-0"),
            ("XGROUP", "SETID", entity, "calculation_engine", "0"),
            ("TIME",),
            ("XREVRANGE", entity, "+", "-", "COUNT", "1"),
            # a due backfill first reads how far the database has stored the entity events
            *(
                command
                for stored in (entity, channels.stream_key(channels.ENTITY_UPDATED))
                for command in (
                    ("XINFO", "STREAM", stored),
                    ("XINFO", "GROUPS", stored),
                    ("XPENDING", stored, DATABASE_GROUP),
                )
            ),
            # the replay streams an earlier life left (killed mid-backfill) are swept
            ("SCAN", "0", "MATCH", f"{REPLAY_KEY}*", "COUNT", "1000"),
            # a backfill reads its replay stream through a group, then deletes it
            ("XGROUP", "CREATE", REPLAY_KEY, "calculation_engine", "0", "MKSTREAM"),
            (
                "XREADGROUP",
                "GROUP",
                "calculation_engine",
                "calculation_engine",
                "COUNT",
                "1000",
                "BLOCK",
                "500",
                "NOACK",
                "STREAMS",
                REPLAY_KEY,
                ">",
            ),
            ("DEL", REPLAY_KEY),
            claim_it,
        ],
        "database_service": [
            ("HSETNX", sub, "spec", "{}"),
            ("HSET", sub, "heartbeat", "1"),
            ("HGETALL", sub),
            ("EXPIRE", sub, "604800"),
            ("SADD", SUBSCRIPTIONS_KEY, "sub-1"),
            ("SREM", SUBSCRIPTIONS_KEY, "sub-1"),
            ("SMEMBERS", SUBSCRIPTIONS_KEY),
            ("SET", lease, "me", "NX", "PX", "10000"),
            ("GET", lease),
            ("PEXPIRE", lease, "10000"),
            ("WATCH", lease),
            ("DEL", lease),
            ("XINFO", "GROUPS", REPLAY_KEY),
            ("XLEN", REPLAY_KEY),
            claim_it,
        ],
        "archival_service": [
            ("HMGET", seen, "fp1", "fp2"),
            ("HSET", seen, "fp1", "1"),
            ("EXPIRE", seen, "86400"),
            ("HSET", intents_key(), "batch-1", "{}"),
            ("HDEL", intents_key(), "batch-1"),
            ("HGETALL", intents_key()),
            ("TIME",),  # the clock that dates and judges intents (Ledger.now)
            # lake compaction: its lock (renewed and released through WATCH/MULTI) and intents
            ("SET", compaction_lock_key(), "token", "NX", "PX", "600000"),
            ("WATCH", compaction_lock_key()),
            ("GET", compaction_lock_key()),
            ("PEXPIRE", compaction_lock_key(), "600000"),
            ("DEL", compaction_lock_key()),
            ("HSET", compactions_key(), "n-1", "{}"),
            ("HDEL", compactions_key(), "n-1"),
            ("HGETALL", compactions_key()),
        ],
        "observability_service": [
            ("SCAN", "0", "MATCH", channels.stream_key("*"), "COUNT", "500"),
            ("SCAN", "0", "MATCH", channels.dead_letter_key("*"), "COUNT", "500"),
            ("XINFO", "STREAM", channels.stream_key(channels.KPI_CALCULATED)),
            ("XLEN", channels.dead_letter_key(channels.KPI_CALCULATED)),
            ("XLEN", entity),
            ("XINFO", "GROUPS", entity),
            ("XPENDING", entity, "database_service"),
            ("HGETALL", calc_hold),
            ("XTRIM", entity, "MINID", "~", "1-0"),
            ("XREVRANGE", tick, "+", "-", "COUNT", "10"),
            ("TIME",),
        ],
        "data_simulator": [claim_it],
        "metadata_service": [claim_it],
        "api_gateway": [claim_it],
        "cli": [claim_it],
    }


async def test_every_command_the_services_send_on_their_keys_stays_allowed(
    acl_redis: RedisServer,
) -> None:
    admin = connect(ADMIN.format(port=acl_redis.port))
    refused = [
        (service, command, verdict)
        for service, commands in _commands_the_services_send().items()
        for command in commands
        if (verdict := await _dryrun(admin, service, command)) != "OK"
    ]
    assert refused == []
    await admin.aclose()


async def test_the_engine_keeps_its_checkpoint_and_deletes_its_replay_stream_as_its_user(
    acl_redis: RedisServer,
) -> None:
    """Real code paths: the checkpoint in parts and the sweep of stray keys (SCAN + DEL), the
    retention hold, and a backfill's replay stream (written by the database service, read and
    deleted by the engine)."""
    admin = connect(ADMIN.format(port=acl_redis.port))
    calc = connect(url(acl_redis, "calculation_engine"))
    database = connect(url(acl_redis, "database_service"))
    store = CheckpointStore(calc, "ae:calc:acl-test", part_bytes=4)
    pipe = calc.pipeline(transaction=True)
    parts = store.add_to_pipeline(pipe, b"0123456789")
    pipe.hset(channels.stream_hold_key(channels.ENTITY_UPDATED), "calculation_engine", "1-0")
    await pipe.execute()
    store.written(parts)
    assert parts == 3 and await store.load() == b"0123456789"
    await calc.set("ae:calc:acl-test:part:7", b"stray")
    assert await delete_strays(calc, "ae:calc:acl-test:", store.stored_keys()) == 1

    replay = f"{channels.REPLAY_PREFIX}sub-acl"
    assert fnmatch.fnmatchcase(replay, REPLAY)
    await EventPublisher(database, source="database_service", stream_maxlen=1000).publish(
        replay, {"subscription_id": "sub-acl", "done": True, "count": 0}
    )
    key = channels.stream_key(replay)
    await calc.xgroup_create(key, "calculation_engine", id="0")
    read = await calc.xreadgroup(
        "calculation_engine", "calculation_engine", {key: ">"}, count=10, noack=True
    )
    assert len(read) == 1
    with pytest.raises(NoPermissionError):
        await database.delete(key)  # its producer does not delete it: its reader does
    assert await calc.delete(key) == 1
    assert not await admin.exists(key)
    for client in (admin, calc, database):
        await client.aclose()


async def test_the_archiver_keeps_its_ledger_as_its_user(acl_redis: RedisServer) -> None:
    archival = connect(url(acl_redis, "archival_service"))
    ledger = Ledger(archival, ttl_s=3600)
    intent = Intent(batch="b-1", owner="a-0", created_at=1.0, objects=())
    await ledger.write_intent(intent)
    assert [i.batch for i in await ledger.intents()] == ["b-1"]
    await ledger.settle(intent, {("orders_count", "2024-01-01"): [b"fp-1"]})
    assert await ledger.archived({("orders_count", "2024-01-01"): [b"fp-1", b"fp-2"]}) == {b"fp-1"}
    assert await ledger.intents() == []
    with pytest.raises(NoPermissionError):  # what it reads is not its own
        await archival.delete(channels.stream_key(channels.ARCHIVE_KPI_RESULTS))
    await archival.aclose()


async def test_the_archiver_takes_and_releases_its_compaction_lock_as_its_user(
    acl_redis: RedisServer,
) -> None:
    archival = connect(url(acl_redis, "archival_service"))
    mine = CompactionLock(archival, owner="a-0", ttl_s=60)
    peer = CompactionLock(archival, owner="a-1", ttl_s=60)
    assert await mine.acquire()
    assert not await peer.acquire()
    await mine.renew()
    with pytest.raises(LockLost):
        await peer.renew()
    await peer.release()  # not its lock: nothing happens
    assert await archival.exists(compaction_lock_key())
    await mine.release()
    assert not await archival.exists(compaction_lock_key())
    assert await peer.acquire()
    await archival.aclose()


async def test_the_engine_reads_how_far_the_database_has_stored_as_its_user(
    acl_redis: RedisServer,
) -> None:
    """A due backfill's readiness check (one MULTI: XINFO STREAM, XINFO GROUPS, XPENDING on the
    aggregated entity streams) under the engine's credentials, as the database consumes."""
    admin = connect(ADMIN.format(port=acl_redis.port))
    producer = connect(url(acl_redis, "data_simulator"))
    calc = connect(url(acl_redis, "calculation_engine"))
    database = connect(url(acl_redis, "database_service"))
    publisher = EventPublisher(producer, source="data_simulator", stream_maxlen=10_000)
    await publisher.publish_many((channels.ENTITY_CREATED, {"i": i}) for i in range(3))
    key = channels.stream_key(channels.ENTITY_CREATED)
    # earlier tests here share the server: the database group starts afresh on `created`, and
    # has stored everything on `updated`
    await admin.xgroup_destroy(key, DATABASE_GROUP)
    await database.xgroup_create(key, DATABASE_GROUP, "0")
    updated = channels.stream_key(channels.ENTITY_UPDATED)
    with contextlib.suppress(ResponseError):  # no such key when run alone
        await admin.xgroup_destroy(updated, DATABASE_GROUP)
    await admin.xgroup_create(updated, DATABASE_GROUP, "$", mkstream=True)
    progress = await database_progress(calc)
    assert progress[channels.ENTITY_UPDATED].oldest_pending is None
    created = progress[channels.ENTITY_CREATED]
    assert created.last_delivered == (0, 0) and created.oldest_pending is None
    assert created.last_generated is not None
    bound = (created.last_generated[0] + 1, 0)
    assert unstored(progress, bound) is not None  # nothing read yet
    reply = await database.xreadgroup(DATABASE_GROUP, "db-1", {key: ">"}, count=100_000)
    ids = [entry_id for entry_id, _ in reply[0][1]]
    progress = await database_progress(calc)
    assert progress[channels.ENTITY_CREATED].oldest_pending is not None
    assert "not yet stored" in (unstored(progress, bound) or "")
    await database.xack(key, DATABASE_GROUP, *ids)
    assert unstored(await database_progress(calc), bound) is None
    for client in (admin, producer, calc, database):
        await client.aclose()


async def test_only_a_service_s_own_user_may_listen_on_its_reply_channels(
    acl_redis: RedisServer,
) -> None:
    """What `DATABASE_EXECUTE_QUERY_CALLERS` rests on: a caller sending `execute_query` with
    another service's `reply_to` cannot read the answer. Only the responders (which publish
    every reply, and channel rules do not tell publishing from listening) and the admin may
    listen on every reply channel; none of them may send `database.query`."""
    admin = connect(ADMIN.format(port=acl_redis.port))
    responders = {s for s, access in SERVICE_ACCESS.items() if access.serves}
    for service, access in SERVICE_ACCESS.items():
        for owner in SERVICE_ACCESS:
            verdict = await _dryrun(admin, service, ("SUBSCRIBE", f"reply.{owner}.x"))
            may = service == owner or service in responders
            assert (verdict == "OK") == may, (service, owner, verdict)
        if service in responders:
            assert channels.DATABASE_QUERY not in access.requests
    await admin.aclose()
