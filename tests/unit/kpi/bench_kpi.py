"""Throughput of the KPI hot paths (not a test; run: .venv/bin/python tests/unit/kpi/bench_kpi.py).

Prints filter evaluations/s and engine events/s for 5 KPIs on one entity type.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta

from analytics_engine.kpi import (
    EntityEventView,
    KPIEngine,
    VersionedKPIDefinition,
    compile_filter,
)

BASE = datetime(2024, 1, 1, tzinfo=UTC)


def definitions() -> list[VersionedKPIDefinition]:
    common = {"entity_type": "order", "display_name": "x", "version": 1}
    specs = [
        {
            "code": "revenue",
            "aggregation": "sum",
            "field": "amount",
            "filter": "status == 'completed' && amount > 0",
            "group_by": ["region"],
            "window": {"type": "tumbling", "size": "60s", "allowed_lateness": "10s"},
        },
        {"code": "orders", "aggregation": "count", "window": {"type": "tumbling", "size": "10s"}},
        {
            "code": "avg_basket",
            "aggregation": "avg",
            "field": "amount",
            "filter": "event == 'created'",
            "group_by": ["region", "channel"],
            "window": {"type": "sliding", "size": "60s", "slide": "20s"},
        },
        {
            "code": "max_amount",
            "aggregation": "max",
            "field": "amount",
            "window": {"type": "tumbling", "size": "30s", "allowed_lateness": "5s"},
        },
        {
            "code": "customers",
            "aggregation": "count_distinct",
            "field": "customer_id",
            "filter": "region in ['eu', 'us'] || amount >= 100.5",
            "window": {"type": "tumbling", "size": "60s"},
        },
    ]
    return [VersionedKPIDefinition.model_validate({**common, **s}) for s in specs]


def events(n: int) -> list[EntityEventView]:
    rng = random.Random(1)
    out = []
    for i in range(n):
        occurred = BASE + timedelta(milliseconds=i * 2 + rng.randint(-500, 0))
        out.append(
            EntityEventView(
                event_id=f"e{i}",
                event_kind=rng.choice(["created", "updated"]),
                entity_type="order",
                entity_id=f"o{rng.randint(0, 5000)}",
                version=rng.randint(1, 5),
                occurred_at=occurred,
                published_at=BASE + timedelta(milliseconds=i * 2),
                attributes={
                    "amount": round(rng.uniform(-5, 300), 2),
                    "status": rng.choice(["completed", "pending", "cancelled"]),
                    "region": rng.choice(["eu", "us", "apac"]),
                    "channel": rng.choice(["web", "app"]),
                    "customer_id": f"c{rng.randint(0, 2000)}",
                },
            )
        )
    return out


def main() -> None:
    flt = compile_filter("status == 'completed' && amount > 0")
    act = {"status": "completed", "amount": 12.5, "region": "eu"}
    n = 500_000
    start = time.perf_counter()
    for _ in range(n):
        flt.matches(act)
    print(
        f"filter: {n / (time.perf_counter() - start):,.0f} evaluations/s "
        f"(status == 'completed' && amount > 0)"
    )

    evs = events(200_000)
    engine = KPIEngine(clock=lambda: BASE)
    engine.set_definitions(definitions())
    start = time.perf_counter()
    for ev in evs:
        engine.process(ev)
    elapsed = time.perf_counter() - start
    results = engine.drain_results()
    print(
        f"engine: {len(evs) / elapsed:,.0f} events/s with 5 KPIs "
        f"({len(results)} results, {engine.stats().open_windows} open windows)"
    )


if __name__ == "__main__":
    main()
