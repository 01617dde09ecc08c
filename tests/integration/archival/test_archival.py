"""Archival Service against real Redis and S3 (SeaweedFS): layout, read-back with pyarrow and
DuckDB, redelivery, a crash between PUT and XACK, and an S3 outage."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from redis.asyncio import Redis

from analytics_engine.archival.kpi_results import ArchivalHooks
from analytics_engine.archival.lake_sql import connect_duckdb
from analytics_engine.archival.layout import intents_key
from analytics_engine.archival.service import SERVICE, Settings, create
from analytics_engine.archival.tables import from_parquet
from analytics_engine.core.bus import EventPublisher
from analytics_engine.core.channels import (
    ARCHIVAL_CONFIRMED,
    ARCHIVAL_EVENTS,
    ARCHIVE_KPI_RESULTS,
    dead_letter_key,
    stream_key,
)
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.localstack import S3Server

Start = Callable[[ServiceRuntime], Awaitable[ServiceRuntime]]
BASE = datetime(2024, 3, 1, 23, 50, tzinfo=UTC)


def env_of(redis_url: str, s3: Any, bucket: str) -> dict[str, Any]:
    return {
        "REDIS_URL": redis_url,
        "S3_ENDPOINT_URL": s3.endpoint_url,
        "S3_BUCKET": bucket,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_REGION": s3.region,
        "ARCHIVAL_PORT": 0,
        "ARCHIVAL_FLUSH_INTERVAL": "200ms",
        "SERVICE_INSTANCE_ID": "archival-test-1",
        "BUS_CLAIM_IDLE_MS": 5000,
    }


def make_settings(redis_url: str, s3: Any, bucket: str, **extra: Any) -> Settings:
    values = {**env_of(redis_url, s3, bucket), **extra}
    return Settings(**values)


def result(i: int, *, code: str = "orders_count", value: float | None = None) -> dict[str, Any]:
    """A KPI result; windows of one minute crossing midnight, so two date partitions."""
    start = BASE + timedelta(minutes=i % 20)
    return {
        "kpi_code": code,
        "value": float(i) if value is None else value,
        "window_start": start.isoformat(),
        "window_end": (start + timedelta(minutes=1)).isoformat(),
        "dimensions": {"region": ["eu", "us", None][i % 3], "shard": i // 20},
        "sample_count": i + 1,
        "definition_version": 2,
        "computed_at": (start + timedelta(minutes=1, seconds=5)).isoformat(),
    }


@pytest.fixture
async def publisher(redis: Redis) -> EventPublisher:
    return EventPublisher(redis, source="database_service", stream_maxlen=100_000)


async def publish(
    publisher: EventPublisher, channel: str, payloads: Sequence[dict[str, Any]]
) -> None:
    for offset in range(0, len(payloads), 500):
        await publisher.publish_many((channel, p) for p in payloads[offset : offset + 500])


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def lake_keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    client = s3.client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(keys)


def lake_table(s3: Any, bucket: str, prefix: str) -> pa.Table:
    client = s3.client()
    tables = [
        from_parquet(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        for key in lake_keys(s3, bucket, prefix)
    ]
    return pa.concat_tables(tables) if tables else pa.table({})


def lake_rows(s3: Any, bucket: str) -> int:
    return lake_table(s3, bucket, "kpi_results/").num_rows


async def pending(redis: Redis, channel: str) -> int:
    info = await redis.xpending(stream_key(channel), SERVICE)
    return int(info["pending"])


async def settled(redis: Redis, channel: str) -> bool:
    """Every published entry was delivered to the group and acknowledged."""
    groups = await redis.xinfo_groups(stream_key(channel))
    group = next((g for g in groups if g["name"] in (SERVICE, SERVICE.encode())), None)
    return group is not None and group["lag"] == 0 and group["pending"] == 0


@dataclass
class Harness:
    redis_url: str
    redis: Redis
    publisher: EventPublisher
    s3: Any
    bucket: str

    def settings(self, **extra: Any) -> Settings:
        return make_settings(self.redis_url, self.s3, self.bucket, **extra)

    def rows(self) -> int:
        return lake_rows(self.s3, self.bucket)

    def table(self, prefix: str) -> pa.Table:
        return lake_table(self.s3, self.bucket, prefix)

    def keys(self, prefix: str) -> list[str]:
        return lake_keys(self.s3, self.bucket, prefix)

    def duckdb(self) -> Any:
        return connect_duckdb(
            endpoint_url=self.s3.endpoint_url,
            access_key=self.s3.access_key,
            secret_key=self.s3.secret_key,
            region=self.s3.region,
        )


@pytest.fixture
def h(
    redis_url: str, redis: Redis, publisher: EventPublisher, s3_server: Any, s3_bucket: str
) -> Harness:
    return Harness(redis_url, redis, publisher, s3_server, s3_bucket)


async def test_kpi_results_land_partitioned_and_read_back(running: Start, h: Harness) -> None:
    await running(create(h.settings()))
    payloads = [result(i) for i in range(120)] + [result(i, code="revenue") for i in range(30)]
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, payloads)
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS))

    keys = h.keys("kpi_results/")
    partitions = {k.rsplit("/", 1)[0] for k in keys}
    assert partitions == {
        "kpi_results/kpi_code=orders_count/date=2024-03-01",
        "kpi_results/kpi_code=orders_count/date=2024-03-02",
        "kpi_results/kpi_code=revenue/date=2024-03-01",
        "kpi_results/kpi_code=revenue/date=2024-03-02",
    }
    assert all(k.endswith(".parquet") for k in keys)

    table = h.table("kpi_results/")
    assert table.num_rows == 150
    assert table.schema.field("window_start").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("value").type == pa.float64()
    assert table.schema.field("sample_count").type == pa.int64()
    assert table.schema.field("definition_version").type == pa.int32()
    row = next(r for r in table.to_pylist() if r["kpi_code"] == "orders_count" and r["value"] == 4)
    assert row["dims_key"] == '{"region":"us","shard":0}'
    assert dict(row["dimensions"]) == {"region": "us", "shard": "0"}
    assert row["window_start"] == BASE + timedelta(minutes=4)
    assert row["sample_count"] == 5

    con = h.duckdb()
    rows = con.execute(
        f"SELECT kpi_code, CAST(date AS VARCHAR), count(*), count(DISTINCT value) "
        f"FROM read_parquet('s3://{h.bucket}/kpi_results/**/*.parquet', hive_partitioning=true)"
        f" GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    # minutes 0..9 of each 20 fall on 03-01 (23:50..23:59), 10..19 on 03-02
    assert rows == [
        ("orders_count", "2024-03-01", 60, 60),
        ("orders_count", "2024-03-02", 60, 60),
        ("revenue", "2024-03-01", 20, 20),
        ("revenue", "2024-03-02", 10, 10),
    ]
    assert await h.redis.hlen(intents_key()) == 0


async def test_redelivered_results_are_archived_once(running: Start, h: Harness) -> None:
    await running(create(h.settings()))
    payloads = [result(i) for i in range(200)]
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, payloads)
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS))
    assert h.rows() == 200

    # The database forwards the same results again (new envelopes, same payloads), plus one
    # duplicate inside a single batch and one result whose value changed (a new fact).
    again = [*payloads, payloads[0], result(7, value=99.5)]
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, again)
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS))
    await asyncio.sleep(0.5)
    table = h.table("kpi_results/")
    assert table.num_rows == 201
    keyed = {(r["window_start"], r["dims_key"], r["value"]) for r in table.to_pylist()}
    assert len(keyed) == 201


async def test_event_batches_are_written_once_and_confirmed(running: Start, h: Harness) -> None:
    await running(create(h.settings()))
    rows = [
        {
            "event_id": f"e-{i}",
            "event_kind": "created" if i % 2 else "updated",
            "entity_type": "order",
            "entity_id": f"o-{i % 7}",
            "version": i,
            "occurred_at": (BASE + timedelta(seconds=i)).isoformat(),
            "published_at": (BASE + timedelta(seconds=i, milliseconds=5)).isoformat(),
            "attributes": {"amount": i * 1.5, "region": "eu"},
            "reason": None,
            "source": "data_simulator",
        }
        for i in range(500)
    ]
    batch = {"batch_id": "b-17", "entity_type": "order", "date": "2024-03-01", "rows": rows}
    await publish(h.publisher, ARCHIVAL_EVENTS, [batch])
    await eventually(lambda: settled(h.redis, ARCHIVAL_EVENTS))

    key = "entity_events/entity_type=order/date=2024-03-01/batch-b-17.parquet"
    assert h.keys("entity_events/") == [key]
    confirmations = await h.redis.xrange(stream_key(ARCHIVAL_CONFIRMED))
    assert len(confirmations) == 1
    confirmed = orjson.loads(confirmations[0][1][b"m"])
    assert confirmed["payload"] == {"batch_id": "b-17", "object_key": key, "row_count": 500}
    assert confirmed["source"] == SERVICE

    table = h.table("entity_events/")
    assert table.num_rows == 500
    first = table.to_pylist()[3]
    assert first["event_id"] == "e-3"
    assert orjson.loads(first["attributes"]) == {"amount": 4.5, "region": "eu"}
    assert first["occurred_at"] == BASE + timedelta(seconds=3)

    # The database re-sends the batch (it missed the confirmation): same object, no duplicates.
    await publish(h.publisher, ARCHIVAL_EVENTS, [batch])
    await eventually(lambda: settled(h.redis, ARCHIVAL_EVENTS))
    assert h.keys("entity_events/") == [key]
    assert h.table("entity_events/").num_rows == 500
    assert len(await h.redis.xrange(stream_key(ARCHIVAL_CONFIRMED))) == 2

    con = h.duckdb()
    counted = con.execute(
        f"SELECT entity_type, count(*), count(DISTINCT event_id), "
        f"sum(CAST(json_extract(attributes, '$.amount') AS DOUBLE)) "
        f"FROM read_parquet('s3://{h.bucket}/entity_events/**/*.parquet', "
        f"hive_partitioning=true) GROUP BY ALL"
    ).fetchall()
    assert counted == [("order", 500, 500, sum(i * 1.5 for i in range(500)))]


async def test_unarchivable_payloads_are_dead_lettered(running: Start, h: Harness) -> None:
    await running(create(h.settings()))
    bad = {**result(1), "window_start": "yesterday"}
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, [result(0), bad, result(2)])
    await publish(h.publisher, ARCHIVAL_EVENTS, [{"batch_id": "x", "rows": []}])
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS))
    await eventually(lambda: settled(h.redis, ARCHIVAL_EVENTS))
    assert h.rows() == 2
    assert await h.redis.xlen(dead_letter_key(ARCHIVE_KPI_RESULTS)) == 1
    assert await h.redis.xlen(dead_letter_key(ARCHIVAL_EVENTS)) == 1


CHILD = Path(__file__).with_name("crash_child.py")


@pytest.mark.parametrize("moment", ["after_put", "before_put"])
async def test_crash_mid_flush_then_restart_archives_exactly_once(
    moment: str, running: Start, h: Harness
) -> None:
    """The process is SIGKILLed after writing the intent (before_put) or the object (after_put)
    but before acknowledging; a restarted instance settles the intent and archives every
    result exactly once."""
    payloads = [result(i) for i in range(300)]
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, payloads)
    env = {
        **os.environ,
        **{k: str(v) for k, v in env_of(h.redis_url, h.s3, h.bucket).items()},
        "ARCHIVAL_BATCH_ROWS": "300",
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        moment,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await asyncio.wait_for(child.wait(), 60) == -signal.SIGKILL
    assert await pending(h.redis, ARCHIVE_KPI_RESULTS) == 300
    assert await h.redis.hlen(intents_key()) == 1
    assert h.rows() == (300 if moment == "after_put" else 0)

    await running(create(h.settings(ARCHIVAL_BATCH_ROWS=300)))
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS))
    table = h.table("kpi_results/")
    assert table.num_rows == 300
    assert len({(r["window_start"], r["dims_key"]) for r in table.to_pylist()}) == 300
    assert await h.redis.hlen(intents_key()) == 0
    assert await h.redis.exists(dead_letter_key(ARCHIVE_KPI_RESULTS)) == 0


async def test_s3_outage_loses_nothing_and_dead_letters_nothing(running: Start, h: Harness) -> None:
    if not isinstance(h.s3, S3Server):
        pytest.skip("needs the private S3 server to stop and start it")
    await running(create(h.settings(ARCHIVAL_BATCH_ROWS=100)))
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, [result(i) for i in range(50)])
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS))
    h.s3.stop()
    try:
        await publish(h.publisher, ARCHIVE_KPI_RESULTS, [result(i) for i in range(50, 400)])
        batch = {"batch_id": "b-1", "entity_type": "order", "date": "2024-03-01", "rows": []}
        await publish(h.publisher, ARCHIVAL_EVENTS, [batch])
        await asyncio.sleep(4)
        assert await pending(h.redis, ARCHIVE_KPI_RESULTS) > 0
    finally:
        h.s3.start()
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS), timeout=30)
    await eventually(lambda: settled(h.redis, ARCHIVAL_EVENTS), timeout=30)
    table = h.table("kpi_results/")
    assert table.num_rows == 400
    assert len({(r["window_start"], r["dims_key"]) for r in table.to_pylist()}) == 400
    assert await h.redis.exists(dead_letter_key(ARCHIVE_KPI_RESULTS)) == 0
    assert await h.redis.exists(dead_letter_key(ARCHIVAL_EVENTS)) == 0
    assert len(await h.redis.xrange(stream_key(ARCHIVAL_CONFIRMED))) == 1


async def test_reading_goes_on_during_a_flush_and_only_durable_entries_are_acknowledged(
    running: Start, h: Harness
) -> None:
    """A flush runs behind the consumer: while its PUT is held, the next results are read and
    parsed, and nothing is acknowledged until the objects are written."""
    gate = asyncio.Event()
    held_keys: list[Sequence[str]] = []

    async def before_put(keys: Sequence[str]) -> None:
        held_keys.append(keys)
        if len(held_keys) == 2:  # the first flush runs in the handler (recovery), hold the 2nd
            await gate.wait()

    runtime = create(
        h.settings(ARCHIVAL_BATCH_ROWS=100, ARCHIVAL_READ_BATCH=50, ARCHIVAL_FLUSH_INTERVAL="2s"),
        hooks=ArchivalHooks(before_put=before_put),
    )
    await running(runtime)
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, [result(i) for i in range(100)])
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS))
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, [result(i) for i in range(100, 250)])

    async def read_past_the_held_flush() -> bool:
        groups = await h.redis.xinfo_groups(stream_key(ARCHIVE_KPI_RESULTS))
        group = next(g for g in groups if g["name"] in (SERVICE, SERVICE.encode()))
        return len(held_keys) == 2 and group["lag"] == 0

    await eventually(read_past_the_held_flush)
    assert await pending(h.redis, ARCHIVE_KPI_RESULTS) == 150  # read, none acknowledged
    assert h.rows() == 100
    gate.set()
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS))
    table = h.table("kpi_results/")
    assert table.num_rows == 250
    assert len({(r["window_start"], r["dims_key"], r["value"]) for r in table.to_pylist()}) == 250


async def _replica_a_held_before_its_put(running: Start, h: Harness) -> asyncio.Event:
    """Replica `archival-a` flushing 100 results, held between its intent and its PUT until
    the returned event is set."""
    gate = asyncio.Event()
    a_holding = asyncio.Event()

    async def hold_a(keys: Sequence[str]) -> None:
        a_holding.set()
        await gate.wait()

    a = create(
        h.settings(SERVICE_INSTANCE_ID="archival-a", ARCHIVAL_BATCH_ROWS=100),
        hooks=ArchivalHooks(before_put=hold_a),
    )
    await running(a)
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, [result(i) for i in range(100)])
    await asyncio.wait_for(a_holding.wait(), 20)
    return gate


async def test_a_replica_leaves_a_peer_s_flush_in_progress_alone(
    running: Start, h: Harness
) -> None:
    """Replica B starts (its first flush resolves every intent) while replica A is between
    writing its intent and its PUT: B must keep A's intent, or what A then writes would be
    unknown to the ledger should A die before acknowledging (re-delivered, written twice)."""
    gate = await _replica_a_held_before_its_put(running, h)

    async def intents() -> dict[str, str]:
        raw = await h.redis.hgetall(intents_key())
        return {k.decode(): orjson.loads(v)["owner"] for k, v in raw.items()}

    [(a_batch, owner)] = (await intents()).items()
    assert owner == "archival-a"
    # A's next read is already waiting (read-ahead): let it take one, so B gets what follows
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, [result(100)])

    async def all_read() -> bool:
        groups = await h.redis.xinfo_groups(stream_key(ARCHIVE_KPI_RESULTS))
        return next(g for g in groups if g["name"] in (SERVICE, SERVICE.encode()))["lag"] == 0

    await eventually(all_read)

    b = create(h.settings(SERVICE_INSTANCE_ID="archival-b", ARCHIVAL_BATCH_ROWS=100))
    await running(b)
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, [result(i) for i in range(101, 151)])
    await eventually(lambda: asyncio.sleep(0, h.rows() == 50))  # B's flush, A still held
    assert (await intents()).get(a_batch) == "archival-a"

    gate.set()
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS))
    assert await intents() == {}
    table = h.table("kpi_results/")
    assert sorted(table.column("value").to_pylist()) == [float(i) for i in range(151)]


async def test_a_backlog_s_tail_is_written_once_nothing_more_comes(
    running: Start, h: Harness
) -> None:
    """The end of a backlog does not wait a flush interval: a quarter batch or more in hand is
    flushed once the stream goes quiet. A trickle below that still waits for the interval (few,
    larger files)."""
    runtime = create(
        h.settings(ARCHIVAL_BATCH_ROWS=400, ARCHIVAL_READ_BATCH=50, ARCHIVAL_FLUSH_INTERVAL="60s")
    )
    await running(runtime)
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, [result(i) for i in range(150)])
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS), timeout=10)
    assert h.rows() == 150
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, [result(i) for i in range(150, 170)])
    await asyncio.sleep(1.5)
    assert await pending(h.redis, ARCHIVE_KPI_RESULTS) == 20  # held for the interval
    assert h.rows() == 150


async def test_a_slow_s3_put_neither_dead_letters_nor_acknowledges_what_it_holds(
    running: Start, h: Harness
) -> None:
    """A flush whose PUT hangs (a slow S3) for many `BUS_CLAIM_IDLE_MS`: the entries it holds
    must stay fresh. Left idle, the consumer claimed them as abandoned, every time counting a
    delivery, until after `BUS_MAX_DELIVERIES` it dead-lettered and acknowledged them while
    the flush still held them only in memory (a crash then lost them from the lake)."""
    gate = asyncio.Event()
    puts: list[Sequence[str]] = []

    async def before_put(keys: Sequence[str]) -> None:
        puts.append(keys)
        if len(puts) == 2:  # the first flush runs in the handler (recovery): hold the 2nd
            await gate.wait()

    runtime = create(
        h.settings(
            ARCHIVAL_BATCH_ROWS=100,
            ARCHIVAL_READ_BATCH=50,
            BUS_CLAIM_IDLE_MS=600,
            BUS_MAX_DELIVERIES=3,
        ),
        hooks=ArchivalHooks(before_put=before_put),
    )
    await running(runtime)
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, [result(i) for i in range(100)])
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS))
    await publish(h.publisher, ARCHIVE_KPI_RESULTS, [result(i) for i in range(100, 200)])
    await eventually(lambda: asyncio.sleep(0, len(puts) == 2))
    await asyncio.sleep(6)  # ten claim periods with the PUT hanging
    assert await h.redis.exists(dead_letter_key(ARCHIVE_KPI_RESULTS)) == 0
    assert await pending(h.redis, ARCHIVE_KPI_RESULTS) == 100
    gate.set()
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS))
    assert h.table("kpi_results/").num_rows == 200
    assert await h.redis.exists(dead_letter_key(ARCHIVE_KPI_RESULTS)) == 0


async def test_a_replica_whose_clock_runs_ahead_leaves_a_peer_s_fresh_intent_alone(
    running: Start, h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether a peer's intent is stale (its owner gone) was judged by comparing the owner's
    wall clock, written into the intent, with the reader's: replica B whose clock ran ahead
    by more than `BUS_CLAIM_IDLE_MS` dropped replica A's intent while A was between it and its
    PUT, and had A died before acknowledging, what it wrote was unknown to the ledger
    (re-delivered, written twice). One clock, Redis's, dates and judges intents."""
    gate = await _replica_a_held_before_its_put(running, h)
    [a_batch] = [k.decode() for k in await h.redis.hkeys(intents_key())]

    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + 60)  # B's clock: a minute ahead
    b = create(h.settings(SERVICE_INSTANCE_ID="archival-b", ARCHIVAL_BATCH_ROWS=100))
    await running(b)  # resolves stale intents at start
    await asyncio.sleep(0.5)
    assert await h.redis.hexists(intents_key(), a_batch)
    monkeypatch.setattr(time, "time", wall)

    gate.set()
    await eventually(lambda: settled(h.redis, ARCHIVE_KPI_RESULTS))
    assert await h.redis.hlen(intents_key()) == 0
    assert h.rows() == 100


async def test_an_empty_re_send_never_replaces_an_archived_batch(
    running: Start, h: Harness
) -> None:
    """A database service before the fix of its re-send race could re-send a batch it had just
    seen confirmed, with its rows already deleted: an empty batch under the same id, whose PUT
    replaced the archived object with an empty file. A batch without rows writes nothing."""
    await running(create(h.settings()))
    rows = [
        {
            "event_id": f"e-{i}",
            "event_kind": "created",
            "entity_type": "order",
            "entity_id": f"o-{i}",
            "version": 1,
            "occurred_at": (BASE + timedelta(seconds=i)).isoformat(),
            "published_at": (BASE + timedelta(seconds=i)).isoformat(),
            "attributes": {"i": i},
            "reason": None,
            "source": "data_simulator",
        }
        for i in range(20)
    ]
    batch = {"batch_id": "b-1", "entity_type": "order", "date": "2024-03-01", "rows": rows}
    await publish(h.publisher, ARCHIVAL_EVENTS, [batch])
    await eventually(lambda: settled(h.redis, ARCHIVAL_EVENTS))
    await publish(h.publisher, ARCHIVAL_EVENTS, [{**batch, "rows": []}])
    await eventually(lambda: settled(h.redis, ARCHIVAL_EVENTS))
    assert len(await h.redis.xrange(stream_key(ARCHIVAL_CONFIRMED))) == 2
    assert h.table("entity_events/").num_rows == 20
