"""The archival ledger against a real Redis: lookups and records of many fingerprints, in more
than one command, and ledgers written by its earlier versions (the same hash layout)."""

from __future__ import annotations

import hashlib

from redis.asyncio import Redis

from analytics_engine.archival.layout import FINGERPRINT_BYTES, seen_key
from analytics_engine.archival.ledger import Ledger


def fp(i: int) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=FINGERPRINT_BYTES).digest()


async def test_record_then_lookup_across_slices_and_partitions(redis: Redis) -> None:
    ledger = Ledger(redis, ttl_s=3600)
    a, b = ("revenue", "2024-03-01"), ("revenue", "2024-03-02")
    written = [fp(i) for i in range(12_500)]  # more than one command (10,000 fields each)
    pipe = redis.pipeline(transaction=True)
    ledger.record(pipe, a, written)
    ledger.record(pipe, b, [fp(-1)])
    ledger.record(pipe, b, [])
    await pipe.execute()

    asked = [fp(i) for i in range(12_000, 24_100)]
    found = await ledger.archived({a: asked, b: [fp(-1), fp(-2)], ("x", "2024-01-01"): []})
    assert found == {fp(i) for i in range(12_000, 12_500)} | {fp(-1)}
    assert await redis.hlen(seen_key(*a)) == 12_500
    assert await redis.hget(seen_key(*a), fp(7)) == b"1"
    assert 0 < await redis.ttl(seen_key(*a)) <= 3600


async def test_a_ledger_written_by_plain_hset_is_read_and_extended(redis: Redis) -> None:
    ledger = Ledger(redis, ttl_s=60)
    part = ("orders", "2024-03-01")
    await redis.hset(seen_key(*part), mapping={fp(1): b"1", fp(2): b"1"})
    assert await ledger.archived({part: [fp(1), fp(3)]}) == {fp(1)}
    pipe = redis.pipeline(transaction=True)
    ledger.record(pipe, part, [fp(3)])
    await pipe.execute()
    assert await redis.hmget(seen_key(*part), [fp(1), fp(2), fp(3), fp(4)]) == [
        b"1",
        b"1",
        b"1",
        None,
    ]
