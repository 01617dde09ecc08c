"""Peak memory of a backfill's computation: the replay fed as it arrives (what the engine
does) against the whole replay held and sorted by publication time (the baseline: what it did
before), over the same synthetic replay.

Run: `.venv/bin/python bench/backfill_memory_bench.py [--events 360000] [--late-every 1000]`

The replay is an hour of order events in the database's order (`occurred_at`), each published
within 2 s of occurring and one in `--late-every` published 5 minutes late; a 1-minute tumbling
sum KPI with 10 s of allowed lateness, backfilled over that hour. Prints, for each way, the peak
Python memory (tracemalloc), the CPU seconds and the results, which must be equal.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from analytics_engine.calculation.backfill import BackfillJob, computation, plan
from analytics_engine.calculation.events import EntityEvent
from analytics_engine.kpi import KPIEngine, KPIResult, VersionedKPIDefinition

T0 = datetime(2024, 1, 1, tzinfo=UTC)
KPI = VersionedKPIDefinition.model_validate(
    {
        "code": "revenue",
        "display_name": "Revenue",
        "entity_type": "order",
        "aggregation": "sum",
        "field": "amount",
        "group_by": ["region"],
        "window": {"type": "tumbling", "size": "1m", "allowed_lateness": "10s"},
        "version": 1,
    }
)


def replay(n: int, late_every: int) -> Iterator[EntityEvent]:
    for i in range(n):
        occurred = T0 + timedelta(seconds=i * 3600 / n)
        delay = 300.0 if i % late_every == 0 else (i % 7) * 0.3
        yield EntityEvent(
            f"00000000-0000-4000-8000-{i:012d}",
            "created",
            "order",
            f"o{i}",
            1,
            occurred,
            occurred + timedelta(seconds=delay),
            {"amount": i % 100, "region": ("eu", "us", "apac")[i % 3]},
        )


def streamed(job: BackfillJob, events: Iterator[EntityEvent]) -> list[KPIResult]:
    work = computation(job)
    for event in events:
        work.add(event)
    return work.finish()


def sorted_whole(job: BackfillJob, events: Iterator[EntityEvent]) -> list[KPIResult]:
    held = list(events)
    engine = KPIEngine(clock=lambda: T0, idle_close_grace=timedelta(0), dedupe_capacity=len(held))
    engine.set_definitions([job.definition])
    held.sort(key=lambda e: (e.published_at, e.occurred_at, e.event_id))
    for event in held:
        engine.process(event)
    engine.advance(job.until + timedelta(days=3650))
    return [r for r in engine.drain_results() if job.since <= r.window_start < job.cut]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=360_000)
    parser.add_argument("--late-every", type=int, default=1000)
    args = parser.parse_args()
    job = plan(KPI, T0 + timedelta(hours=1), timedelta(hours=1))
    outcomes = {}
    for name, way in (("baseline: held and sorted", sorted_whole), ("fed as replayed", streamed)):
        tracemalloc.start()
        cpu = time.process_time()
        results = way(job, replay(args.events, args.late_every))
        cpu = time.process_time() - cpu
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        outcomes[name] = {(r.window_start, tuple(r.dimensions.items())): r.value for r in results}
        print(
            f"{name:28} peak {peak / 1e6:7.1f} MB  CPU {cpu:6.2f} s (under tracemalloc)  "
            f"{len(results)} results, {sum(r.sample_count for r in results)} events counted"
        )
    base, new = outcomes.values()
    print("results equal" if base == new else "RESULTS DIFFER")
    if base != new:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
