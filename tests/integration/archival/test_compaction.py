"""Lake compaction against real Redis and S3 (SeaweedFS): small files of old `kpi_results/`
partitions become one object with exactly the same rows; young partitions, `entity_events/`
and objects of open flush intents are left alone; a crash between the merged object's PUT and
the deletions is resolved to one copy of every row; the ledger still drops redeliveries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pyarrow as pa
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from analytics_engine.archival.compaction import CompactionIntent
from analytics_engine.archival.compactor import CompactionHooks, Compactor
from analytics_engine.archival.lake_sql import connect_duckdb
from analytics_engine.archival.layout import (
    compaction_lock_key,
    compactions_key,
    entity_events_object_key,
    intents_key,
    kpi_object_key,
    new_batch_name,
)
from analytics_engine.archival.ledger import Intent, Ledger, PlannedObject
from analytics_engine.archival.metrics import CompactionMetrics
from analytics_engine.archival.s3 import ObjectStore
from analytics_engine.archival.service import SERVICE, Settings, create
from analytics_engine.archival.tables import (
    KpiRow,
    fingerprints_of,
    from_parquet,
    kpi_table,
    parse_kpi_result,
    to_parquet,
)
from analytics_engine.core.bus import EventPublisher
from analytics_engine.core.channels import ARCHIVE_KPI_RESULTS, stream_key
from analytics_engine.core.runtime import ServiceRuntime

Start = Callable[[ServiceRuntime], Awaitable[ServiceRuntime]]
OLD = datetime(2024, 3, 1, 10, 0, tzinfo=UTC)
OLD_PARTITION = "kpi_results/kpi_code=orders_count/date=2024-03-01/"


def result(i: int, *, start: datetime = OLD, code: str = "orders_count") -> dict[str, Any]:
    begin = start + timedelta(minutes=i % 30)
    return {
        "kpi_code": code,
        "value": float(i),
        "window_start": begin.isoformat(),
        "window_end": (begin + timedelta(minutes=1)).isoformat(),
        "dimensions": {"region": ["eu", "us", None][i % 3], "shard": i // 30},
        "sample_count": i + 1,
        "definition_version": 2,
        "computed_at": (begin + timedelta(minutes=1, seconds=5)).isoformat(),
    }


@dataclass
class Lake:
    s3: Any
    bucket: str
    redis_url: str
    redis: Redis
    store: ObjectStore

    def keys(self, prefix: str) -> list[str]:
        client = self.s3.client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def table(self, prefix: str) -> pa.Table:
        client = self.s3.client()
        tables = [
            from_parquet(client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
            for key in self.keys(prefix)
        ]
        return pa.concat_tables(tables)

    def fingerprints(self, prefix: str) -> list[bytes]:
        return sorted(fingerprints_of(self.table(prefix)))

    def write_files(self, rows: Sequence[KpiRow], per_file: int) -> list[str]:
        """The rows as small files of one partition each, as flushes write them."""
        client = self.s3.client()
        keys = []
        for first in range(0, len(rows), per_file):
            chunk = rows[first : first + per_file]
            key = kpi_object_key(chunk[0].kpi_code, chunk[0].day, new_batch_name())
            client.put_object(Bucket=self.bucket, Key=key, Body=to_parquet(kpi_table(chunk)))
            keys.append(key)
        return keys

    def compactor(self, **extra: Any) -> Compactor:
        options: dict[str, Any] = {
            "owner": "compactor-test",
            "interval_s": 3600.0,
            "min_age_s": 86_400.0,
            "min_files": 16,
            "max_bytes": 64 * 1024 * 1024,
            **extra,
        }
        return Compactor(
            store=self.store, redis=self.redis, ledger=Ledger(self.redis, ttl_s=3600), **options
        )

    def settings(self, **extra: Any) -> Settings:
        values: dict[str, Any] = {
            "REDIS_URL": self.redis_url,
            "S3_ENDPOINT_URL": self.s3.endpoint_url,
            "S3_BUCKET": self.bucket,
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_REGION": self.s3.region,
            "ARCHIVAL_PORT": 0,
            "ARCHIVAL_FLUSH_INTERVAL": "200ms",
            "SERVICE_INSTANCE_ID": "archival-test-1",
            "BUS_CLAIM_IDLE_MS": 5000,
            **extra,
        }
        return Settings(**values)


@pytest.fixture
async def lake(redis_url: str, redis: Redis, s3_server: Any, s3_bucket: str) -> AsyncIterator[Lake]:
    store = ObjectStore(
        endpoint_url=s3_server.endpoint_url,
        bucket=s3_bucket,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
    )
    yield Lake(s3_server, s3_bucket, redis_url, redis, store)
    store.close()


def rows_of(payloads: Sequence[dict[str, Any]]) -> list[KpiRow]:
    return [parse_kpi_result(p) for p in payloads]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_small_files_of_an_old_partition_become_one_with_the_same_rows(lake: Lake) -> None:
    old = rows_of([result(i) for i in range(200)])
    old_keys = lake.write_files(old, per_file=7)  # 29 files
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    young_keys = lake.write_files(rows_of([result(i, start=today) for i in range(40)]), 2)
    events = lake.s3.client()
    event_keys = [entity_events_object_key("order", "2024-03-01", f"b{i}") for i in range(20)]
    for key in event_keys:
        events.put_object(Bucket=lake.bucket, Key=key, Body=b"not even parquet")

    outcome = await lake.compactor().run_pass()

    assert outcome is not None
    assert (outcome.merged, outcome.files, outcome.rows) == (1, len(old_keys), 200)
    [merged] = lake.keys(OLD_PARTITION)
    assert merged.rsplit("/", 1)[1].startswith("compacted-")
    assert merged not in old_keys
    assert lake.fingerprints(OLD_PARTITION) == sorted(r.fingerprint for r in old)
    table = lake.table(OLD_PARTITION)
    starts = table.column("window_start").to_pylist()
    assert starts == sorted(starts)  # lake order
    young_prefix = young_keys[0].rsplit("/", 1)[0] + "/"
    assert lake.keys(young_prefix) == sorted(young_keys)  # too young: untouched
    assert lake.keys("entity_events/") == sorted(event_keys)
    assert await lake.redis.hlen(compactions_key()) == 0
    assert not await lake.redis.exists(compaction_lock_key())

    # DuckDB over the whole prefix: every row once, the young partition's too
    con = connect_duckdb(
        endpoint_url=lake.s3.endpoint_url,
        access_key=lake.s3.access_key,
        secret_key=lake.s3.secret_key,
        region=lake.s3.region,
    )
    counted = con.execute(
        f"SELECT CAST(date AS VARCHAR) = '2024-03-01', count(*), "
        f"count(DISTINCT (window_start, dims_key, value)), sum(sample_count) "
        f"FROM read_parquet('s3://{lake.bucket}/kpi_results/**/*.parquet', "
        f"hive_partitioning = true) GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert counted == [(False, 40, 40, sum(range(1, 41))), (True, 200, 200, sum(range(1, 201)))]

    # a second pass has nothing left to merge
    again = await lake.compactor().run_pass()
    assert again is not None and again.merged == 0
    assert lake.keys(OLD_PARTITION) == [merged]


async def test_a_big_partition_is_merged_in_several_objects(lake: Lake) -> None:
    old = rows_of([result(i) for i in range(300)])
    old_keys = lake.write_files(old, per_file=10)  # 30 files of ~4 KB
    sizes = [size for _, size in await lake.store.list_objects(OLD_PARTITION)]
    cap = sum(sizes) // 3 + max(sizes)  # three or four groups
    outcome = await lake.compactor(max_bytes=cap).run_pass()
    assert outcome is not None and outcome.files == len(old_keys)
    keys = lake.keys(OLD_PARTITION)
    assert 3 <= len(keys) <= 4 and len(keys) == outcome.merged
    assert all(k.rsplit("/", 1)[1].startswith("compacted-") for k in keys)
    assert lake.fingerprints(OLD_PARTITION) == sorted(r.fingerprint for r in old)


async def test_objects_of_an_open_flush_intent_are_not_compacted(lake: Lake) -> None:
    old = rows_of([result(i) for i in range(200)])
    keys = lake.write_files(old, per_file=10)  # 20 files
    held = keys[4:7]
    ledger = Ledger(lake.redis, ttl_s=3600)
    await ledger.write_intent(
        Intent(
            batch="crashed-flush",
            owner="archival-other",
            created_at=time.time(),
            objects=tuple(PlannedObject(k, "orders_count", "2024-03-01") for k in held),
        )
    )
    outcome = await lake.compactor().run_pass()
    assert outcome is not None and outcome.files == 17
    left = lake.keys(OLD_PARTITION)
    assert set(held) < set(left) and len(left) == 4
    assert lake.fingerprints(OLD_PARTITION) == sorted(r.fingerprint for r in old)
    # the flush intent is still resolvable: its objects are where it says
    assert all(await asyncio.gather(*(lake.store.exists(k) for k in held)))


class Crash(Exception):
    """The process dies here (the test seam raises instead)."""


async def test_a_crash_between_put_and_deletes_is_resolved_at_start(
    lake: Lake, running: Start
) -> None:
    old = rows_of([result(i) for i in range(200)])
    old_keys = lake.write_files(old, per_file=10)
    written: list[str] = []

    async def crash(new_key: str) -> None:
        written.append(new_key)
        raise Crash

    with pytest.raises(Crash):
        await lake.compactor(hooks=CompactionHooks(after_put=crash)).run_pass()
    # the merged object landed, the old ones are still there: rows twice, the intent open
    assert len(written) == 1
    assert set(lake.keys(OLD_PARTITION)) == {*old_keys, written[0]}
    assert len(lake.fingerprints(OLD_PARTITION)) == 400
    [raw] = (await lake.redis.hgetall(compactions_key())).values()
    assert orjson.loads(raw)["new_key"] == written[0]

    # a fresh instance (compaction off: only the resolution at start) finishes the merge
    await running(create(lake.settings(ARCHIVAL_COMPACTION_INTERVAL=0)))

    async def resolved() -> bool:
        return await lake.redis.hlen(compactions_key()) == 0

    await eventually(resolved)
    assert lake.keys(OLD_PARTITION) == written
    assert lake.fingerprints(OLD_PARTITION) == sorted(r.fingerprint for r in old)


async def test_an_unlanded_intent_is_dropped_when_ours_or_stale_and_kept_when_a_peer_s(
    lake: Lake,
) -> None:
    old = rows_of([result(i) for i in range(200)])
    keys = lake.write_files(old, per_file=10)
    missing = kpi_object_key("orders_count", "2024-03-01", "compacted-never")

    async def put_intent(name: str, owner: str, created_at: float, olds: Sequence[str]) -> None:
        intent = CompactionIntent(name, missing, tuple(olds), owner, created_at)
        await lake.redis.hset(compactions_key(), name, intent.encode())

    await put_intent("peer", "archival-peer", time.time(), keys[:5])
    await put_intent("ours", "compactor-test", time.time(), keys[5:10])
    outcome = await lake.compactor(min_files=10).run_pass()
    assert outcome is not None and outcome.resolved == 1
    # the peer's fresh merge may still be under way: its files stay out of this pass
    assert set(await lake.redis.hkeys(compactions_key())) == {b"peer"}
    assert outcome.files == 15
    assert set(keys[:5]) < set(lake.keys(OLD_PARTITION))

    await put_intent("peer", "archival-peer", time.time() - 3600, keys[:5])  # its owner is gone
    await lake.compactor(min_files=2).run_pass()
    assert await lake.redis.hlen(compactions_key()) == 0
    assert len(lake.keys(OLD_PARTITION)) == 1
    assert lake.fingerprints(OLD_PARTITION) == sorted(r.fingerprint for r in old)


async def test_a_peer_holding_the_lock_keeps_a_pass_from_running(lake: Lake) -> None:
    lake.write_files(rows_of([result(i) for i in range(200)]), per_file=10)
    await lake.redis.set(compaction_lock_key(), b"peer:token", px=60_000)
    assert await lake.compactor().run_pass() is None
    assert len(lake.keys(OLD_PARTITION)) == 20
    assert await lake.redis.get(compaction_lock_key()) == b"peer:token"  # not released by us


async def settled(redis: Redis) -> bool:
    groups = await redis.xinfo_groups(stream_key(ARCHIVE_KPI_RESULTS))
    group = next((g for g in groups if g["name"] in (SERVICE, SERVICE.encode())), None)
    return group is not None and group["lag"] == 0 and group["pending"] == 0


async def test_the_service_compacts_and_a_redelivered_result_is_still_dropped(
    lake: Lake, running: Start
) -> None:
    runtime = await running(
        create(
            lake.settings(
                ARCHIVAL_BATCH_ROWS=10,
                ARCHIVAL_READ_BATCH=10,
                ARCHIVAL_COMPACTION_INTERVAL="1s",
                ARCHIVAL_COMPACTION_MIN_FILES=4,
            )
        )
    )
    publisher = EventPublisher(lake.redis, source="database_service", stream_maxlen=100_000)
    payloads = [result(i) for i in range(200)]
    for first in range(0, 200, 10):  # one flush each
        await publisher.publish_many((ARCHIVE_KPI_RESULTS, p) for p in payloads[first : first + 10])
        await eventually(lambda: settled(lake.redis))

    async def compacted() -> bool:
        keys = lake.keys(OLD_PARTITION)
        return len(keys) == 1 and "/compacted-" in keys[0]

    await eventually(compacted, timeout=30)
    metric = runtime.metrics.registry.get_sample_value
    # the objects are in place before the merge that put them is counted: wait for a pass to
    # end after this (the one that merged them, or the next, a second later)
    passes = metric("analytics_archival_compaction_passes_total") or 0

    async def pass_ended() -> bool:
        return (metric("analytics_archival_compaction_passes_total") or 0) > passes

    await eventually(pass_ended, timeout=10)
    assert (metric("analytics_archival_compaction_objects_written_total") or 0) >= 1
    assert (metric("analytics_archival_compaction_files_total") or 0) >= 4
    assert (metric("analytics_archival_compaction_rows_total") or 0) >= 200
    assert (metric("analytics_archival_compaction_passes_total") or 0) >= 1
    expected = sorted(r.fingerprint for r in rows_of(payloads))
    assert lake.fingerprints(OLD_PARTITION) == expected

    # the same results again (the database forwards them twice): the ledger drops them
    await publisher.publish_many((ARCHIVE_KPI_RESULTS, p) for p in payloads)
    await eventually(lambda: settled(lake.redis))
    await asyncio.sleep(0.5)
    assert lake.fingerprints(OLD_PARTITION) == expected
    assert await lake.redis.hlen(intents_key()) == 0


async def test_s3_down_is_logged_and_counted_never_raised(lake: Lake) -> None:
    """S3 unreachable (nothing listens on the port): the start-up resolution fails, is counted,
    and the task returns normally (interval 0: no passes); the intent waits for the next try."""
    intent = CompactionIntent("n-1", "kpi_results/x/compacted-n-1.parquet", ("a",), "peer", 1.0)
    await lake.redis.hset(compactions_key(), intent.name, intent.encode())
    down = ObjectStore(
        endpoint_url="http://127.0.0.1:9",
        bucket=lake.bucket,
        access_key="x",
        secret_key="y",
        region="us-east-1",
        connect_timeout=0.5,
    )
    registry = CollectorRegistry()
    metrics = CompactionMetrics(registry)
    compactor = Compactor(
        store=down,
        redis=lake.redis,
        ledger=Ledger(lake.redis, ttl_s=3600),
        owner="compactor-test",
        interval_s=0,
        min_age_s=0,
        min_files=2,
        max_bytes=1024 * 1024,
        metrics=metrics,
    )
    try:
        await asyncio.wait_for(compactor.run(), 30)
    finally:
        down.close()
    assert registry.get_sample_value("analytics_archival_compaction_failures_total") == 1
    assert await lake.redis.hkeys(compactions_key()) == [b"n-1"]
    assert not await lake.redis.exists(compaction_lock_key())  # released after the failure


async def test_an_object_that_is_no_archive_file_does_not_stop_compaction(lake: Lake) -> None:
    """Something else wrote into the lake (a damaged object, a file of other columns): the
    other small files of its partition, and every other partition, are still merged; the
    foreign objects are left as they are. (The pass raised, and every later one again.)"""
    old = rows_of([result(i) for i in range(100)])
    keys = lake.write_files(old, per_file=5)  # 20 files
    other = rows_of([result(i, code="revenue") for i in range(60)])
    lake.write_files(other, per_file=3)  # 20 files of a partition planned after it
    client = lake.s3.client()
    junk = f"{OLD_PARTITION}000-junk.parquet"
    foreign = f"{OLD_PARTITION}001-foreign.parquet"
    client.put_object(Bucket=lake.bucket, Key=junk, Body=b"not parquet")
    client.put_object(
        Bucket=lake.bucket, Key=foreign, Body=to_parquet(pa.table({"something": [1, 2]}))
    )

    outcome = await lake.compactor().run_pass()

    assert outcome is not None
    assert (outcome.merged, outcome.files, outcome.rows) == (2, len(keys) + 20, 160)
    remaining = lake.keys(OLD_PARTITION)
    assert [k for k in remaining if "compacted-" not in k] == [junk, foreign]
    [merged] = [k for k in remaining if "compacted-" in k]
    client_body = client.get_object(Bucket=lake.bucket, Key=merged)["Body"].read()
    assert sorted(fingerprints_of(from_parquet(client_body))) == sorted(r.fingerprint for r in old)
    revenue = "kpi_results/kpi_code=revenue/date=2024-03-01/"
    [merged_revenue] = lake.keys(revenue)
    assert "compacted-" in merged_revenue
    assert lake.fingerprints(revenue) == sorted(r.fingerprint for r in other)
    assert await lake.redis.hlen(compactions_key()) == 0
