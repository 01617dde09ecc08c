"""The engine's checkpoint store against a real Redis that refuses values over 1 MB."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from analytics_engine.calculation.checkpoint_store import (
    CheckpointStore,
    CorruptCheckpoint,
    delete_strays,
    part_key,
)
from analytics_engine.core.redis import connect
from analytics_engine.localstack import RedisServer

pytestmark = pytest.mark.asyncio

KEY = "ae:calc:checkpoint"


@pytest.fixture
async def strict_redis(tmp_path: Path) -> AsyncIterator[Redis]:
    """A Redis of its own with the smallest value limit it allows (1 MB)."""
    with RedisServer(tmp_path / "redis", extra_config={"proto-max-bulk-len": "1mb"}) as server:
        client = connect(server.url)
        yield client
        await client.aclose()


async def save(redis: Redis, store: CheckpointStore, data: bytes) -> int:
    pipe = redis.pipeline(transaction=True)
    parts = store.add_to_pipeline(pipe, data)
    await pipe.execute()
    store.written(parts)
    return parts


async def test_a_checkpoint_over_redis_s_value_limit_is_stored_in_parts(
    strict_redis: Redis,
) -> None:
    big = b'{"format":1,"engine":"' + os.urandom(1_400_000).hex().encode() + b'"}'  # 2.8 MB
    with pytest.raises(Exception):  # noqa: B017 - what one SET of it does
        await strict_redis.set(KEY, big)
    store = CheckpointStore(strict_redis, KEY, part_bytes=512 * 1024)
    assert await save(strict_redis, store, big) == 6
    assert await CheckpointStore(strict_redis, KEY, part_bytes=512 * 1024).load() == big

    # a smaller checkpoint replaces it whole, and the parts it no longer needs go
    small = b'{"format":1,"engine":{}}'
    assert await save(strict_redis, store, small) == 0
    assert await strict_redis.get(KEY) == small
    assert not await strict_redis.exists(*(part_key(KEY, i) for i in range(6)))
    assert await store.load() == small

    # after a restart (a new store) stale parts are still cleaned: load learns their count
    assert await save(strict_redis, store, big) == 6
    restarted = CheckpointStore(strict_redis, KEY, part_bytes=1024 * 1024)
    assert await restarted.load() == big
    assert await save(strict_redis, restarted, big[:1_500_000]) == 2
    assert not await strict_redis.exists(*(part_key(KEY, i) for i in range(2, 6)))
    assert await restarted.load() == big[:1_500_000]


async def test_a_missing_part_is_an_error_not_a_truncated_state(strict_redis: Redis) -> None:
    store = CheckpointStore(strict_redis, KEY, part_bytes=64 * 1024)
    assert await save(strict_redis, store, b"x" * 200_000) == 4
    assert await store.load() == b"x" * 200_000
    await strict_redis.delete(part_key(KEY, 2))
    with pytest.raises(CorruptCheckpoint, match="a part of 4 is missing"):
        await store.load()
    assert await strict_redis.get(KEY) is not None


async def test_keys_under_the_checkpoint_it_does_not_list_are_deleted(
    strict_redis: Redis,
) -> None:
    """What the engine does at start (`processor._drop_strays`): parts left by a checkpoint
    deleted by hand, or beyond what the stored one lists, go; listed keys, and keys outside the
    checkpoint's, stay."""
    store = CheckpointStore(strict_redis, KEY, part_bytes=64 * 1024)
    assert await save(strict_redis, store, b"x" * 200_000) == 4
    await strict_redis.set(part_key(KEY, 9), b"left by an older checkpoint")
    await strict_redis.set(f"{KEY}x:part:0", b"another key's")  # the prefix ends at ':'
    await strict_redis.set("ae:calc:[weird]*:part:0", b"glob characters")
    restarted = CheckpointStore(strict_redis, KEY, part_bytes=64 * 1024)
    assert await restarted.load() == b"x" * 200_000
    assert restarted.stored_keys() == {part_key(KEY, i) for i in range(4)}
    assert await delete_strays(strict_redis, f"{KEY}:", restarted.stored_keys()) == 1
    assert sorted(await strict_redis.keys(f"{KEY}:*")) == sorted(
        part_key(KEY, i).encode() for i in range(4)
    )
    assert await delete_strays(strict_redis, "ae:calc:[weird]*:", ()) == 1
    assert await strict_redis.get(f"{KEY}x:part:0") == b"another key's"
    await strict_redis.delete(KEY)  # by hand
    gone = CheckpointStore(strict_redis, KEY, part_bytes=64 * 1024)
    assert await gone.load() is None
    assert await delete_strays(strict_redis, f"{KEY}:", gone.stored_keys()) == 4
    assert await strict_redis.keys(f"{KEY}:*") == []
