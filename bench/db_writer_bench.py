"""The database service's entity-event writer alone against a real PostgreSQL, with a raw COPY
baseline measured in the same run.

Run: `.venv/bin/python bench/db_writer_bench.py [--events 100000] [--batch 4000] [--rounds 2]`

The events are the simulator's own (as in `pipeline_bench.py --parts c`), parsed once up front;
the parse cost (core `parse_event` + `core.storable.parse_entity_event`) is printed per event. Then:

- writer: `EntityEventWriter.write` over the events in `--batch` batches, serially, on one
  pooled connection: wall, Python CPU and the PostgreSQL backend's CPU per event;
- phases: the same again (fresh event ids) through a connection proxy that times every statement
  the writer sends (labelled by the writer's SQL constant, or by its first words), with the
  backend's CPU per statement read from `/proc/<pid>/schedstat` (nanoseconds);
- baseline: asyncpg binary COPY of the same rows into a plain table without indexes.

CPU is what counts on this shared machine; wall figures are printed for reference. Each round
writes new event ids into the same (growing) tables; the median over `--rounds` is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from analytics_engine.core.envelopes import parse_event
from analytics_engine.core.storable import EntityEventRow, parse_entity_event
from analytics_engine.database import writer as writer_module
from analytics_engine.database.db import create_pool
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.migrate import migrate
from analytics_engine.database.partitions import PartitionManager
from analytics_engine.database.roles import ensure_writer_role
from analytics_engine.database.writer import STAGING_SETUP, EntityEventWriter
from analytics_engine.localstack import PostgresServer
from pipeline_bench import generate

_EVENT_COLUMNS = EntityEventRow._fields


def backend_cpu_ns(pid: int) -> int:
    """CPU nanoseconds a process has run (first field of `/proc/<pid>/schedstat`)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def _sql_names() -> dict[str, str]:
    """The writer module's SQL constants by their text (labels for the phase table)."""
    return {
        value.strip(): name
        for name, value in vars(writer_module).items()
        if name.isupper() and isinstance(value, str) and len(value) > 40
    }


class Phases:
    """Wall seconds, backend CPU ns and calls per statement label."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.order: list[str] = []

    @asynccontextmanager
    async def timed(self, label: str) -> AsyncIterator[None]:
        if label not in self.wall:
            self.order.append(label)
        cpu0, t0 = backend_cpu_ns(self.pid), time.perf_counter()
        try:
            yield
        finally:
            self.wall[label] += time.perf_counter() - t0
            self.cpu[label] += backend_cpu_ns(self.pid) - cpu0
            self.calls[label] += 1


class _TimedTransaction:
    def __init__(self, inner: Any, phases: Phases, depth: list[int]) -> None:
        self._inner, self._phases, self._depth = inner, phases, depth

    async def __aenter__(self) -> None:
        label = "BEGIN" if self._depth[0] == 0 else "SAVEPOINT"
        async with self._phases.timed(label):
            await self._inner.__aenter__()
        self._depth[0] += 1

    async def __aexit__(self, *exc: Any) -> Any:
        self._depth[0] -= 1
        ok = exc[0] is None
        if self._depth[0] == 0:
            label = "COMMIT" if ok else "ROLLBACK"
        else:
            label = "RELEASE SAVEPOINT" if ok else "ROLLBACK TO SAVEPOINT"
        async with self._phases.timed(label):
            return await self._inner.__aexit__(*exc)


class TimedConnection:
    """An asyncpg connection whose statements are timed into `phases`."""

    def __init__(self, conn: Any, phases: Phases) -> None:
        self._conn, self._phases, self._depth = conn, phases, [0]
        self._names = _sql_names()

    def _label(self, sql: str, args: Sequence[Any]) -> str:
        name = self._names.get(sql.strip(), " ".join(sql.split()[:4]))
        return f"{name} {args}" if args else name

    def transaction(self) -> _TimedTransaction:
        return _TimedTransaction(self._conn.transaction(), self._phases, self._depth)

    async def copy_records_to_table(self, table: str, **kwargs: Any) -> Any:
        async with self._phases.timed(f"COPY {table}"):
            return await self._conn.copy_records_to_table(table, **kwargs)

    async def execute(self, sql: str, *args: Any) -> Any:
        async with self._phases.timed(self._label(sql, args)):
            return await self._conn.execute(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self._phases.timed(self._label(sql, args)):
            return await self._conn.fetchval(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> Any:
        async with self._phases.timed(self._label(sql, args)):
            return await self._conn.fetch(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class TimedPool:
    """A pool of one timed connection (what `EntityEventWriter` acquires)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        yield self._conn


def fresh_ids(rows: Sequence[EntityEventRow]) -> list[EntityEventRow]:
    """The same events under new event ids and of new entities (each round stores new events
    and creates its entities, as a drain after an outage does, rather than finding every
    entity at the same version already)."""
    tag = uuid.uuid4().hex[:8]
    return [
        row._replace(event_id=str(uuid.uuid4()), entity_id=f"{tag}-{row.entity_id}") for row in rows
    ]


def batches(rows: Sequence[EntityEventRow], size: int) -> list[Sequence[EntityEventRow]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


async def run_writer(
    writer: EntityEventWriter, rows: Sequence[EntityEventRow], size: int, pid: int
) -> tuple[float, float, float]:
    """(wall, Python CPU, backend CPU) seconds to write `rows` serially."""
    cpu0, py0, t0 = backend_cpu_ns(pid), time.process_time(), time.perf_counter()
    for batch in batches(rows, size):
        await writer.write(batch)
    wall, py = time.perf_counter() - t0, time.process_time() - py0
    return wall, py, (backend_cpu_ns(pid) - cpu0) / 1e9


async def run_copy(conn: Any, rows: Sequence[EntityEventRow], pid: int) -> tuple[float, float]:
    """(wall, backend CPU) seconds of one binary COPY of `rows` into a plain table."""
    await conn.execute(
        "DROP TABLE IF EXISTS bench_copy;"
        " CREATE TABLE bench_copy (LIKE entity_events INCLUDING DEFAULTS)"
    )
    cpu0, t0 = backend_cpu_ns(pid), time.perf_counter()
    await conn.copy_records_to_table("bench_copy", records=rows, columns=_EVENT_COLUMNS)
    wall = time.perf_counter() - t0
    cpu = (backend_cpu_ns(pid) - cpu0) / 1e9
    await conn.execute("DROP TABLE bench_copy")
    return wall, cpu


def us(seconds: float, n: int) -> str:
    return f"{1e6 * seconds / n:6.1f}"


async def bench(dsn: str, args: argparse.Namespace) -> None:
    n, size = args.events, args.batch
    pool = await create_pool(dsn, max_size=1, setup_sql=STAGING_SETUP)
    async with pool.acquire() as conn:
        await migrate(conn, timescale=args.timescale)
        pid = conn.get_server_pid()
    items = generate(n, seed=4242, run_id="db-writer-bench")
    t0 = time.process_time()
    rows = [parse_entity_event(channel, parse_event(data)) for channel, data in items]
    parse_s = time.process_time() - t0
    print(f"parse (parse_event + parse_entity_event): {us(parse_s, n)} us/event")
    metrics = DatabaseMetrics(CollectorRegistry())
    writer = EntityEventWriter(pool, PartitionManager(enabled=True), metrics)
    await writer.write(rows[:size])  # warm-up: partitions, prepared statements
    results: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    phase_runs: list[Phases] = []
    for _ in range(args.rounds):
        results["writer"].append(await run_writer(writer, fresh_ids(rows), size, pid))
        async with pool.acquire() as conn:
            phases = Phases(pid)
            timed = EntityEventWriter(
                TimedPool(TimedConnection(conn, phases)), PartitionManager(enabled=True), metrics
            )
            for batch in batches(fresh_ids(rows), size):
                await timed.write(batch)
            phase_runs.append(phases)
            wall, cpu = await run_copy(conn, rows, pid)
            results["copy"].append((wall, 0.0, cpu))
    await pool.close()

    def med(name: str, i: int) -> float:
        return statistics.median(r[i] for r in results[name])

    print(f"\n{n} events, batches of {size}, median of {args.rounds} rounds (us/event):")
    print(f"{'':34} {'wall':>7} {'python':>7} {'postgres':>8}")
    for name, label in (("writer", "writer.write (serial)"), ("copy", "raw COPY, plain table")):
        print(
            f"{label:34} {us(med(name, 0), n):>7} {us(med(name, 1), n):>7} {us(med(name, 2), n):>8}"
        )
    print(f"  writer: {n / med('writer', 0):.0f} events/s serial; COPY {n / med('copy', 0):.0f}/s")
    print(f"\nphases per {size}-event batch (median of rounds): wall ms, postgres CPU ms, us/event")
    nb = len(batches(rows, size))
    first = phase_runs[0]
    for label in first.order:
        wall = statistics.median(p.wall[label] for p in phase_runs)
        cpu = statistics.median(p.cpu[label] for p in phase_runs) / 1e9
        calls = statistics.median(p.calls[label] for p in phase_runs)
        print(
            f"  {label[:40]:40} {1e3 * wall / nb:7.2f} {1e3 * cpu / nb:7.2f}"
            f" {us(cpu, n)}  ({calls:.0f} calls)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timescale", choices=("auto", "on", "off"), default="off")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="db-writer-bench-"))
    pg = PostgresServer(base)
    pg.start()
    try:
        dsn = asyncio.run(ensure_writer_role(pg.dsn))
        asyncio.run(bench(dsn, args))
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
