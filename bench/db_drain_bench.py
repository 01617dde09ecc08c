"""The database service's entity-event drain alone: real Redis and PostgreSQL, the service's
own consumer and writer in this process, no other service running.

Run: `.venv/bin/python bench/db_drain_bench.py [--events 200000] [--batch 2000] [--writers 2]
[--rounds 3]`

Each round publishes `--events` simulator events into the entity streams (new event ids,
entities continuing from the previous round), then starts the database service's entity
consumers (`SimulationDataConsumer` on `DurableConsumer`s configured as `database.service`
does) and times the drain until the group's lag and pending are 0. Prints events/s and CPU us
per event of this process (the service's Python), PostgreSQL (all backends) and Redis, and
checks every event is stored exactly once. A quicker, quieter loop than
`pipeline_bench.py --parts c` (no other services), for A/B of the writer and consumer.

Baseline, in the same round: the raw floor of any drain on this machine. The same events, in
streams of their own, are read by as many raw XREADGROUP loops as there are writers, each batch
COPied as (entry id, bytes) into a plain table in one transaction and then XACKed: reading,
storing durably and acknowledging, with no parsing, validation, deduplication or entity state.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from prometheus_client import CollectorRegistry

from _stack import cpu_seconds, group_state
from analytics_engine.core import channels, eventloop
from analytics_engine.core.bus import DeadLetters, DurableConsumer
from analytics_engine.core.bus.streams import FIELD, read_group
from analytics_engine.core.heap import tune_gc
from analytics_engine.core.redis import connect
from analytics_engine.core.settings import BaseServiceSettings
from analytics_engine.database import service as database_service
from analytics_engine.database.db import create_pool
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.migrate import migrate
from analytics_engine.database.partitions import PartitionManager
from analytics_engine.database.roles import ensure_writer_role
from analytics_engine.database.simulation_data_consumer import SimulationDataConsumer
from analytics_engine.database.writer import STAGING_SETUP, EntityEventWriter
from analytics_engine.localstack import PostgresServer, RedisServer
from pipeline_bench import generate, publish

GROUP = "database"
FLOOR_GROUP = "floor"
FLOOR_SUFFIX = ":floor"  # the floor's own streams: the service's group never sees them


async def raw_floor(
    redis_url: str,
    dsn: str,
    pids: dict[str, int],
    items: list[tuple[str, bytes]],
    *,
    workers: int,
    batch: int,
) -> tuple[float, dict[str, float]]:
    """(events/s, CPU us per event by process) of the raw drain (module docstring) of `items`,
    published first."""
    redis = connect(redis_url)
    keys = [channels.stream_key(c) + FLOOR_SUFFIX for c in channels.ENTITY_CHANNELS]
    for key in keys:
        await redis.delete(key)
        await redis.xgroup_create(key, FLOOR_GROUP, id="0", mkstream=True)
    await publish(redis, [(c + FLOOR_SUFFIX, data) for c, data in items])
    pool = await create_pool(dsn, max_size=workers)
    async with pool.acquire() as conn:
        await conn.execute("DROP TABLE IF EXISTS floor_events")
        await conn.execute("CREATE TABLE floor_events (entry_id text, data bytea)")
    n = len(items)
    done = 0
    streams = {key.encode(): b">" for key in keys}

    async def drain(worker: int) -> None:
        nonlocal done
        while done < n:
            entries = await read_group(
                redis, FLOOR_GROUP, f"f{worker}", streams, count=batch, block_ms=100
            )
            if not entries:
                continue
            records = [(entry_id.decode(), fields[FIELD]) for _, (entry_id, fields) in entries]
            async with pool.acquire() as conn, conn.transaction():
                await conn.copy_records_to_table(
                    "floor_events", records=records, columns=("entry_id", "data")
                )
            by_key: dict[bytes, list[bytes]] = {}
            for key, (entry_id, _) in entries:
                by_key.setdefault(key, []).append(entry_id)
            pipe = redis.pipeline(transaction=True)
            for key, ids in by_key.items():
                pipe.xack(key, FLOOR_GROUP, *ids)
            await pipe.execute()
            done += len(entries)

    cpu0 = cpu_seconds(pids)
    own0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(drain(i) for i in range(workers)))
    wall = time.perf_counter() - t0
    cpu1 = cpu_seconds(pids)
    per_event = {k: 1e6 * (cpu1[k] - cpu0[k]) / n for k in pids}
    per_event["database"] = 1e6 * (time.process_time() - own0) / n
    async with pool.acquire() as conn:
        stored = await conn.fetchval("SELECT count(*) FROM floor_events")
        await conn.execute("DROP TABLE floor_events")
    await pool.close()
    for key in keys:
        await redis.delete(key)
    await redis.aclose()
    if stored != n:
        raise AssertionError(f"raw floor stored {stored} of {n} events")
    return n / wall, per_event


async def one_round(
    redis_url: str, dsn: str, pids: dict[str, int], args: argparse.Namespace, round_no: int
) -> tuple[float, float, dict[str, float]]:
    """(events/s, raw floor events/s, CPU us per event by process) of one drain."""
    n = args.events
    redis = connect(redis_url)
    tag = uuid.uuid4().hex[:8]
    # new entities each round (the same ids would find every entity at its version already)
    items = [
        (channel, data.replace(b'"entity_id":"', b'"entity_id":"' + tag.encode() + b"-"))
        for channel, data in generate(n, seed=4242 + round_no, run_id=f"drain-{tag}")
    ]
    floor, floor_cpu = await raw_floor(
        redis_url, dsn, pids, items, workers=args.writers, batch=args.batch
    )
    print(
        f"  raw floor {floor:.0f} events/s; CPU us/event "
        + "  ".join(f"{k} {v:.1f}" for k, v in floor_cpu.items())
        + f"  | total {sum(floor_cpu.values()):.1f}",
        flush=True,
    )
    await publish(redis, items)
    del items  # a service holds no backlog in memory
    tune_gc(args.gc_threshold)  # as the service's runtime does after startup
    pool = await create_pool(dsn, max_size=args.writers + 2, setup_sql=STAGING_SETUP)
    async with pool.acquire() as conn:
        before = await conn.fetchval("SELECT count(*) FROM entity_events")
    stream_redis = connect(redis_url, retries=0)
    registry = CollectorRegistry()
    metrics = DatabaseMetrics(registry)
    dead = DeadLetters(stream_redis, service="database")
    partitions = PartitionManager(enabled=True)
    writer = EntityEventWriter(pool, partitions, metrics)
    consumers: list[DurableConsumer] = []
    for i in range(args.writers):
        handler = SimulationDataConsumer(writer, dead, metrics)
        consumer = DurableConsumer(
            stream_redis,
            channels=channels.ENTITY_CHANNELS,
            group=GROUP,
            consumer=f"bench-w{i}",
            handler=handler,
            dead_letters=dead,
            batch_size=args.batch,
            auto_ack=False,
            linger_ms=args.linger_ms,
            lazy_events=True,
            read_ahead=args.read_ahead,
        )
        handler.bind(consumer)
        consumers.append(consumer)
    cpu0 = cpu_seconds(pids)
    own0 = time.process_time()
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(c.run()) for c in consumers]
    while True:  # polled: Redis tells no one when a group is drained
        if (await group_state(redis, channels.ENTITY_CHANNELS, GROUP)).drained:
            break
        await asyncio.sleep(0.02)
    wall = time.perf_counter() - t0
    cpu1 = cpu_seconds(pids)
    own = time.process_time() - own0
    for c in consumers:
        c.stop()
    await asyncio.gather(*tasks)
    async with pool.acquire() as conn:
        stored = await conn.fetchval("SELECT count(*) FROM entity_events") - before
    await pool.close()
    await redis.aclose()
    await stream_redis.aclose()
    if stored != n:
        raise AssertionError(f"stored {stored} of {n} events")
    write_s = sum(
        sample.value
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "analytics_db_write_duration_seconds_sum"
    )
    print(f"  wall {wall:.2f}s, in writer.write (summed over writers) {write_s:.2f}s", flush=True)
    per_event = {k: 1e6 * (cpu1[k] - cpu0[k]) / n for k in pids}
    per_event["database"] = 1e6 * own / n  # the servers are this process's children
    return n / wall, floor, per_event


async def bench(redis_url: str, dsn: str, pids: dict[str, int], args: argparse.Namespace) -> None:
    async with (await create_pool(dsn, max_size=1)).acquire() as conn:
        await migrate(conn, timescale="off")
        await PartitionManager(enabled=True).ensure_ahead(conn)  # as the service on start
    # the group must exist before the backlog is published (the service's start id is "0")
    redis = connect(redis_url)
    for channel in channels.ENTITY_CHANNELS:
        await redis.xgroup_create(channels.stream_key(channel), GROUP, id="0", mkstream=True)
    await redis.aclose()
    rates: list[float] = []
    floors: list[float] = []
    cpus: list[dict[str, float]] = []
    for r in range(args.rounds):
        rate, floor, cpu = await one_round(redis_url, dsn, pids, args, r)
        rates.append(rate)
        floors.append(floor)
        cpus.append(cpu)
        print(
            f"round {r + 1}: {rate:8.0f} events/s (raw floor {floor:.0f},"
            f" ratio {rate / floor:.2f});"
            " CPU us/event "
            + "  ".join(f"{k} {v:.1f}" for k, v in cpu.items())
            + f"  | total {sum(cpu.values()):.1f}",
            flush=True,
        )
    med = {k: statistics.median(c[k] for c in cpus) for k in pids}
    rate, floor = statistics.median(rates), statistics.median(floors)
    print(
        f"median: {rate:.0f} events/s, raw floor {floor:.0f} (ratio {rate / floor:.2f});"
        " CPU us/event "
        + "  ".join(f"{k} {v:.1f}" for k, v in med.items())
        + f"  | total {sum(med.values()):.1f}"
    )


class _ShowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = getattr(record, "error", None)
        if error:
            record.msg = f"{record.msg} ({error})"
        return True


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().handlers[0].addFilter(_ShowError())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = database_service.Settings.model_fields
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=defaults["write_batch"].default)
    parser.add_argument("--writers", type=int, default=defaults["writers"].default)
    parser.add_argument("--linger-ms", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--read-ahead",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the consumers read the next batch while the handler works (as the service)",
    )
    parser.add_argument(
        "--gc-threshold", type=int, default=BaseServiceSettings.model_fields["gc_threshold"].default
    )
    parser.add_argument(
        "--pg-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a PostgreSQL server setting for this run (repeatable), e.g. shared_buffers=256MB",
    )
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="db-drain-bench-"))
    pg = PostgresServer(base / "postgres")
    pg.settings.update(item.split("=", 1) for item in args.pg_setting)
    rd = RedisServer(base / "redis")
    pg.start()
    rd.start()
    try:
        dsn = asyncio.run(ensure_writer_role(pg.dsn))
        assert pg.pid is not None and rd.pid is not None
        pids = {"database": os.getpid(), "postgres": pg.pid, "redis": rd.pid}
        eventloop.run(bench(rd.url, dsn, pids, args))
    finally:
        rd.stop()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
