"""Where PostgreSQL's CPU goes when the database service stores entity events: the backend CPU
of each statement of the writer's transaction, per event, on one connection.

Run: `.venv/bin/python bench/db_statement_cost.py [--events 200000] [--batch 2000]`

Generates simulator events, parses them as the service does, and writes them in batches exactly
as `EntityEventWriter.write` does (binary COPY into the staging table, `INSERT ... SELECT` into
`entity_events`, the version-guarded upserts of `entities`), reading the backend's CPU time
(/proc) around each statement, and the WAL bytes each batch writes. Baseline (same run): a
binary COPY of the same rows into a plain table without indexes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from pathlib import Path

from analytics_engine.core.envelopes import parse_event
from analytics_engine.core.storable import parse_entity_event
from analytics_engine.database import writer
from analytics_engine.database.db import create_pool
from analytics_engine.database.migrate import migrate
from analytics_engine.database.partitions import PartitionManager
from analytics_engine.database.roles import ensure_writer_role
from analytics_engine.localstack import PostgresServer
from pipeline_bench import generate


def backend_cpu(pid: int) -> float:
    """User + system CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(dsn: str, events: int, batch: int) -> None:
    async with (await create_pool(dsn, max_size=1)).acquire() as conn:
        await migrate(conn, timescale="off")
        await PartitionManager(enabled=True).ensure_ahead(conn)
        await conn.execute(  # the staging table's columns, as a plain table
            "CREATE TABLE baseline (event_id uuid, event_kind text, entity_type text,"
            " entity_id text, version bigint, occurred_us bigint, published_us bigint,"
            " attributes jsonb, reason text, source text, fold_step smallint, first_seen_us bigint)"
        )
    rows = [
        parse_entity_event(ch, parse_event(d)) for ch, d in generate(events, seed=1, run_id="c")
    ]
    pool = await create_pool(dsn, max_size=1, setup_sql=writer.STAGING_SETUP)
    spent = {"copy to staging": 0.0, "insert entity_events": 0.0, "upsert entities": 0.0}
    baseline = wal = 0.0
    async with pool.acquire() as conn:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await PartitionManager(enabled=True).ensure(conn, {r.occurred_at.date() for r in rows})
        for start in range(0, len(rows), batch):
            records, second_step = writer.stage_records(rows[start : start + batch])
            lsn = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
            async with conn.transaction():
                t0 = backend_cpu(pid)
                await conn.copy_records_to_table(
                    writer.EVENT_STAGE, records=records, columns=writer._STAGE_COLUMNS
                )
                t1 = backend_cpu(pid)
                await conn.execute(writer.INSERT_NEW_EVENTS)
                t2 = backend_cpu(pid)
                await conn.execute(writer.UPSERT_ENTITIES, 1)
                if second_step:
                    await conn.execute(writer.UPSERT_ENTITIES, 2)
                t3 = backend_cpu(pid)
            wal += float(
                await conn.fetchval("SELECT pg_current_wal_insert_lsn() - $1::pg_lsn", lsn)
            )
            spent["copy to staging"] += t1 - t0
            spent["insert entity_events"] += t2 - t1
            spent["upsert entities"] += t3 - t2
            t4 = backend_cpu(pid)
            await conn.copy_records_to_table("baseline", records=records)
            baseline += backend_cpu(pid) - t4
    await pool.close()
    n = len(rows)
    for name, seconds in spent.items():
        print(f"{name:22} {1e6 * seconds / n:6.2f} us/event")
    print(f"{'total':22} {1e6 * sum(spent.values()) / n:6.2f} us/event, WAL {wal / n:.0f} B/event")
    print(f"{'baseline: plain COPY':22} {1e6 * baseline / n:6.2f} us/event")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="db-statement-cost-"))
    pg = PostgresServer(base / "postgres")
    pg.start()
    try:
        dsn = asyncio.run(ensure_writer_role(pg.dsn))
        asyncio.run(measure(dsn, args.events, args.batch))
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
