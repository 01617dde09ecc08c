"""Stream retention by consumption on a real Redis, run as the platform's own ACL users: the
observability service trims, readers keep what they still need."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from acl_users import url
from redis.exceptions import NoPermissionError

from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher, read_group
from analytics_engine.core.redis import connect
from analytics_engine.core.retention import trim_consumed
from analytics_engine.localstack import RedisServer

pytestmark = pytest.mark.asyncio

DB, CALC = "database_service", "calculation_engine"


async def test_an_entity_stream_keeps_what_its_slowest_reader_still_needs(
    acl_redis: RedisServer,
) -> None:
    key = channels.stream_key(channels.ENTITY_CREATED)
    hold = channels.stream_hold_key(channels.ENTITY_CREATED)
    simulator = connect(url(acl_redis, "data_simulator"))
    database = connect(url(acl_redis, DB))
    calculation = connect(url(acl_redis, CALC))
    observability = connect(url(acl_redis, "observability_service"))
    publisher = EventPublisher(simulator, source="data_simulator", stream_maxlen=100_000)
    await publisher.publish_many((channels.ENTITY_CREATED, {"i": i}) for i in range(600))
    ids = [entry_id for entry_id, _ in await observability.xrange(key)]
    assert len(ids) == 600

    # no group yet: nothing may go (the services may start after the simulator)
    assert await trim_consumed(observability, channels.ENTITY_CREATED) == 0
    await database.xgroup_create(key, DB, id="0")
    await calculation.xgroup_create(key, CALC, id="0")
    # the database service has 300 delivered and 200 of them acknowledged
    read = await read_group(database, DB, "db-1", {key.encode(): b">"}, count=300)
    await database.xack(key, DB, *[entry_id for _, (entry_id, _) in read[:200]])
    # the calculation engine has read everything (no acknowledgements) ...
    await read_group(calculation, CALC, "calc-1", {key.encode(): b">"}, count=600, noack=True)
    # ... but without a checkpoint it would rewind to the start: nothing may go
    assert await trim_consumed(observability, channels.ENTITY_CREATED) == 0

    await calculation.hset(hold, CALC, ids[400])
    removed = await trim_consumed(observability, channels.ENTITY_CREATED)
    kept = [entry_id for entry_id, _ in await observability.xrange(key)]
    assert 0 < removed <= 200 and kept == ids[removed:]  # below the oldest pending (#200) only

    await database.xack(key, DB, *[entry_id for _, (entry_id, _) in read[200:]])
    await read_group(database, DB, "db-1", {key.encode(): b">"}, count=300)
    await database.xack(key, DB, *ids[300:])
    removed += await trim_consumed(observability, channels.ENTITY_CREATED)
    kept = [entry_id for entry_id, _ in await observability.xrange(key)]
    assert 200 < removed <= 400 and kept == ids[removed:]  # now below the checkpoint (#400)

    # least privilege: only the observability service trims, only the engine moves its hold
    with pytest.raises(NoPermissionError):
        await database.xtrim(key, minid=ids[-1])
    with pytest.raises(NoPermissionError):
        await observability.xadd(key, {b"m": b"{}"})
    with pytest.raises(NoPermissionError):
        await observability.hset(hold, CALC, ids[-1])
    with pytest.raises(NoPermissionError):
        await calculation.hset(channels.stream_hold_key(channels.ENTITY_DEACTIVATED), CALC, "1-0")
    for client in (simulator, database, calculation, observability):
        await client.aclose()


async def test_a_long_consumed_run_is_trimmed_in_one_pass(acl_redis: RedisServer) -> None:
    """Redis removes at most ~10,000 entries per approximate XTRIM: a busy stream's consumed
    entries (here 40,000) all go in one pass, not 10,000 per trimming interval."""
    key = channels.stream_key(channels.ARCHIVE_KPI_RESULTS)
    database = connect(url(acl_redis, DB))
    archival = connect(url(acl_redis, "archival_service"))
    observability = connect(url(acl_redis, "observability_service"))
    publisher = EventPublisher(database, source=DB, stream_maxlen=100_000)
    for _ in range(8):
        await publisher.publish_many((channels.ARCHIVE_KPI_RESULTS, {"i": i}) for i in range(5000))
    await archival.xgroup_create(key, "archival_service", id="0")
    read = await read_group(archival, "archival_service", "a-1", {key.encode(): b">"}, count=40_000)
    await archival.xack(key, "archival_service", *[entry_id for _, (entry_id, _) in read])
    removed = await trim_consumed(observability, channels.ARCHIVE_KPI_RESULTS)
    assert removed > 39_000
    assert await observability.xlen(key) == 40_000 - removed
    for client in (database, archival, observability):
        await client.aclose()


async def test_readers_not_deployed_and_groups_nobody_declared_hold_nothing(
    acl_redis: RedisServer,
) -> None:
    """`metadata.changed` is read by the simulator and the engine: with the simulator not
    deployed (`OBSERVABILITY_ABSENT_READERS`), the engine's group alone decides; an ad hoc group
    (here an operator's, as admin) never holds entries back."""
    channel = channels.METADATA_CHANGED
    key = channels.stream_key(channel)
    metadata = connect(url(acl_redis, "metadata_service"))
    calculation = connect(url(acl_redis, CALC))
    observability = connect(url(acl_redis, "observability_service"))
    admin = connect(f"redis://admin:admin-pw@127.0.0.1:{acl_redis.port}/0")
    publisher = EventPublisher(metadata, source="metadata_service", stream_maxlen=100_000)
    await publisher.publish_many((channel, {"i": i}) for i in range(1000))
    await calculation.xgroup_create(key, CALC, id="0")
    await admin.xgroup_create(key, "ad-hoc", id="0")
    read = await read_group(calculation, CALC, "c-1", {key.encode(): b">"}, count=1000)
    await calculation.xack(key, CALC, *[entry_id for _, (entry_id, _) in read])

    assert await trim_consumed(observability, channel) == 0  # the simulator has no group
    removed = await trim_consumed(observability, channel, absent={"data_simulator"})
    assert removed >= 900 and await observability.xlen(key) == 1000 - removed
    for client in (metadata, calculation, observability, admin):
        await client.aclose()


class _AcksRightAfterInfo:
    """The observability service's client, with the reader acknowledging its last pending
    entries between the trimmer's XINFO GROUPS and its XPENDING (a race that recurs at every
    batch a reader acknowledges while the trimmer looks)."""

    def __init__(self, client: Any, ack: Callable[[], Awaitable[None]]) -> None:
        self._client = client
        self._ack = ack

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def xinfo_groups(self, key: str) -> Any:
        infos = await self._client.xinfo_groups(key)
        await self._ack()
        return infos


async def test_pending_entries_acknowledged_while_the_trimmer_looks(
    acl_redis: RedisServer,
) -> None:
    """XINFO GROUPS counted pending entries, all acknowledged by the XPENDING that follows: the
    trim goes on below what was delivered (not a crash, nor an invalid id sent to Redis)."""
    channel = channels.ENTITY_UPDATED
    key = channels.stream_key(channel)
    simulator = connect(url(acl_redis, "data_simulator"))
    database = connect(url(acl_redis, DB))
    calculation = connect(url(acl_redis, CALC))
    observability = connect(url(acl_redis, "observability_service"))
    publisher = EventPublisher(simulator, source="data_simulator", stream_maxlen=100_000)
    await publisher.publish_many((channel, {"i": i}) for i in range(600))
    ids = [entry_id for entry_id, _ in await observability.xrange(key)]
    await database.xgroup_create(key, DB, id="0")
    await calculation.xgroup_create(key, CALC, id="0")
    read = await read_group(database, DB, "db-1", {key.encode(): b">"}, count=400)
    await calculation.hset(channels.stream_hold_key(channel), CALC, ids[500])

    async def ack() -> None:
        await database.xack(key, DB, *[entry_id for _, (entry_id, _) in read])

    removed = await trim_consumed(_AcksRightAfterInfo(observability, ack), channel)
    kept = [entry_id for entry_id, _ in await observability.xrange(key)]
    assert 0 < removed <= 399 and kept == ids[removed:]  # below the last delivered (#399)
    for client in (simulator, database, calculation, observability):
        await client.aclose()
