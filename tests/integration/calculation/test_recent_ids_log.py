"""The engine's dedupe ring stored as it grows, against a real Redis: each checkpoint writes
only the ids that are new, drops the chunks that left the ring, and a restart gets the ring
back exactly."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from redis.asyncio import Redis

from analytics_engine.calculation.checkpoint_store import CorruptCheckpoint, delete_strays
from analytics_engine.calculation.recent_ids_log import (
    MAX_ID_BYTES,
    RecentIdsLog,
    RingManifest,
    RingWrite,
    chunk_key,
)
from analytics_engine.kpi import EntityEventView, KPIEngine

pytestmark = pytest.mark.asyncio

KEY = "ae:calc:checkpoint"
PART_BYTES = 10 * MAX_ID_BYTES  # chunks of 10 ids
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def engine(capacity: int) -> KPIEngine:
    return KPIEngine(clock=lambda: T0, dedupe_capacity=capacity)


def feed(e: KPIEngine, ids: range) -> None:
    for i in ids:
        e.process(EntityEventView(f"id-{i}", "created", "order", f"o{i}", 1, T0, T0, {}))


async def checkpoint(redis: Redis, log: RecentIdsLog, e: KPIEngine) -> RingWrite:
    write = log.plan(e)
    pipe = redis.pipeline(transaction=True)
    log.add_to_pipeline(pipe, write)
    await pipe.execute()
    log.written(write)
    return write


async def test_each_checkpoint_writes_what_is_new_and_drops_what_left(redis: Redis) -> None:
    e, log = engine(100), RecentIdsLog(redis, KEY, part_bytes=PART_BYTES)
    feed(e, range(30))
    first = await checkpoint(redis, log, e)
    assert [c[2] for c, _ in first.new] == [10, 10, 10] and not first.dropped

    feed(e, range(30, 55))
    second = await checkpoint(redis, log, e)
    assert [c[1:] for c, _ in second.new] == [(30, 10), (40, 10), (50, 5)]  # the new 25 only
    assert not second.dropped and len(second.manifest.chunks) == 6

    feed(e, range(55, 140))  # the ring now holds 40..139: the chunks of 0..39 left it
    third = await checkpoint(redis, log, e)
    assert [c[1] for c in third.dropped] == [0, 10, 20, 30]
    assert not await redis.exists(*(chunk_key(KEY, c[0]) for c in third.dropped))
    manifest = RingManifest.from_json(third.manifest.to_json())
    assert (manifest.start, manifest.end, manifest.chunks[0][1]) == (40, 140, 40)

    # a restart: a new log and engine get the ring back from the manifest alone
    restarted = engine(100)
    restarted.restore_recent(
        await RecentIdsLog(redis, KEY, part_bytes=PART_BYTES).load(manifest), manifest.end
    )
    assert restarted.recent_ids() == e.recent_ids() == [f"id-{i}" for i in range(40, 140)]
    assert (restarted.recent_start, restarted.recent_end) == (40, 140)
    feed(restarted, range(135, 145))  # 135..139 are known
    assert restarted.stats().duplicates == 5


async def test_a_ring_that_moved_past_everything_stored_starts_from_its_oldest_id(
    redis: Redis,
) -> None:
    e, log = engine(20), RecentIdsLog(redis, KEY, part_bytes=PART_BYTES)
    feed(e, range(15))
    await checkpoint(redis, log, e)
    feed(e, range(15, 100))  # 85 more: the ring is 80..99
    write = await checkpoint(redis, log, e)
    assert [c[1:] for c in write.manifest.chunks] == [(80, 10), (90, 10)]
    assert await log.load(write.manifest) == [f"id-{i}" for i in range(80, 100)]


async def test_a_missing_chunk_is_an_error_not_a_shorter_ring(redis: Redis) -> None:
    """The engine then starts its ring empty (`processor.load_checkpoint`); the log replaces
    the chunks it could not use at the next checkpoint."""
    e, log = engine(100), RecentIdsLog(redis, KEY, part_bytes=PART_BYTES)
    feed(e, range(25))
    write = await checkpoint(redis, log, e)
    await redis.delete(chunk_key(KEY, write.manifest.chunks[1][0]))
    restarted = RecentIdsLog(redis, KEY, part_bytes=PART_BYTES)
    with pytest.raises(CorruptCheckpoint, match="missing"):
        await restarted.load(write.manifest)
    fresh = engine(100)
    fresh.restore_recent([], write.manifest.end)
    feed(fresh, range(25, 27))
    after = await checkpoint(redis, restarted, fresh)
    assert [c[1:] for c in after.manifest.chunks] == [(25, 2)]
    assert await redis.keys(f"{KEY}:ids:*") == [
        chunk_key(KEY, after.manifest.chunks[0][0]).encode()
    ]


async def test_at_a_low_rate_the_ring_stays_a_few_chunks(redis: Redis) -> None:
    """One new id per checkpoint: each is appended to the last chunk until that one is full,
    so the ring stays `capacity / chunk size + 1` chunks however many checkpoints ran."""
    e, log = engine(30), RecentIdsLog(redis, KEY, part_bytes=PART_BYTES)
    for i in range(95):
        feed(e, range(i, i + 1))
        write = await checkpoint(redis, log, e)
        assert len(write.manifest.chunks) <= 4
        assert sum(len(orjson.loads(data)) for _, data in write.new) <= 10
    assert len(await redis.keys(f"{KEY}:ids:*")) == len(write.manifest.chunks)
    loaded = await RecentIdsLog(redis, KEY, part_bytes=PART_BYTES).load(write.manifest)
    assert loaded == e.recent_ids() == [f"id-{i}" for i in range(65, 95)]


async def test_chunks_lost_by_redis_are_noticed_and_the_ring_stored_anew(redis: Redis) -> None:
    """Redis may lose its last second of writes in a crash while the engine lives on: the next
    checkpoint must not list chunks that are gone."""
    e, log = engine(100), RecentIdsLog(redis, KEY, part_bytes=PART_BYTES)
    feed(e, range(35))
    first = await checkpoint(redis, log, e)
    lost = first.manifest.chunks[1]
    await redis.delete(chunk_key(KEY, lost[0]))
    feed(e, range(35, 40))
    await log.check_stored()
    write = await checkpoint(redis, log, e)
    assert sum(c[2] for c, _ in write.new) == 40  # the whole ring, written anew
    assert len(await redis.keys(f"{KEY}:ids:*")) == len(write.manifest.chunks)  # no leftovers
    loaded = await RecentIdsLog(redis, KEY, part_bytes=PART_BYTES).load(write.manifest)
    assert loaded == e.recent_ids()


async def test_the_stored_ring_names_its_chunks_and_nothing_else(redis: Redis) -> None:
    """What the engine keeps at start (`processor._drop_strays`): the chunks the stored ring
    lists; a chunk no checkpoint lists (left by one deleted by hand) goes."""
    e, log = engine(100), RecentIdsLog(redis, KEY, part_bytes=PART_BYTES)
    feed(e, range(25))
    write = await checkpoint(redis, log, e)
    await redis.set(chunk_key(KEY, 999), b'["id-x"]')  # listed by no checkpoint
    restarted = RecentIdsLog(redis, KEY, part_bytes=PART_BYTES)
    await restarted.load(write.manifest)
    listed = {chunk_key(KEY, c[0]) for c in write.manifest.chunks}
    assert restarted.stored_keys() == log.stored_keys() == listed
    assert await delete_strays(redis, f"{KEY}:", restarted.stored_keys()) == 1
    assert {k.decode() for k in await redis.keys(f"{KEY}:*")} == listed
    # without a checkpoint (deleted by hand) every chunk is a stray
    assert RecentIdsLog(redis, KEY, part_bytes=PART_BYTES).stored_keys() == set()
