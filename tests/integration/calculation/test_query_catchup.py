"""A `bind_window` query KPI runs the slots it missed: a runner stopped for some slots and started
again (a new runner on the same Redis) runs exactly those, oldest first, each with its own window
bound; a run the database service fails is retried before the slots after it, never skipped.

The database service is a stand-in answering `execute_query` on `database.query` (the real one is
covered by tests/integration/database/test_query_kpi_window.py); the runner's clock is the `now`
each test hands to `tick`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from analytics_engine.calculation.queries import QueryRunner
from analytics_engine.calculation.query_slots import SlotMark
from analytics_engine.calculation.service import Settings, query_slots_key
from analytics_engine.core import channels
from analytics_engine.core.bus import DeadLetters
from analytics_engine.core.envelopes import Request
from analytics_engine.core.errors import HandlerError
from analytics_engine.core.request_reply import RequestReplyClient, RequestReplyServer
from analytics_engine.kpi import KPIResult, VersionedKPIDefinition
from analytics_engine.kpi.engine import iso_utc
from analytics_engine.kpi.windows import to_micros

pytestmark = pytest.mark.asyncio

KEY = query_slots_key(Settings().checkpoint_key)
SLOT = timedelta(seconds=10)
DELAY = timedelta(seconds=2)
T0 = datetime.fromisoformat("2026-03-01T12:00:00+00:00")  # a slot boundary
SQL = (
    "SELECT count(*) FROM entity_events"
    " WHERE entity_type = $1 AND occurred_at >= $2 AND occurred_at < $3"
)


def definition(version: int = 1) -> VersionedKPIDefinition:
    return VersionedKPIDefinition.model_validate(
        {
            "code": "orders_per_slot",
            "display_name": "Orders per slot",
            "entity_type": "order",
            "query": {
                "sql": SQL,
                "params": ["order"],
                "schedule": "10s",
                "bind_window": True,
                "delay": "2s",
            },
            "version": version,
        }
    )


def slot(k: int) -> tuple[str, str]:
    """The k-th slot after T0, as the runner binds it."""
    return iso_utc(T0 + k * SLOT), iso_utc(T0 + (k + 1) * SLOT)


@dataclass
class Database:
    """Answers each run with 1 and records the window it bound; fails the runs of the windows in
    `fail` once each."""

    asked: list[tuple[str, ...]] = field(default_factory=list)
    fail: set[tuple[str, ...]] = field(default_factory=set)

    async def execute_query(self, request: Request) -> dict[str, Any]:
        window = tuple(request.payload["params"][1:])  # after params ["order"]
        self.asked.append(window)
        if window in self.fail:
            self.fail.discard(window)
            raise HandlerError("the database is unreachable", code="unavailable")
        return {"columns": [{"name": "count"}], "rows": [[1]], "row_count": 1, "truncated": False}


@pytest.fixture
async def database(redis: Redis) -> AsyncIterator[Database]:
    db = Database()
    server = RequestReplyServer(
        redis,
        channel=channels.DATABASE_QUERY,
        source="database_stand_in",
        instance="t",
        handlers={"execute_query": db.execute_query},
        dead_letters=DeadLetters(redis, service="database_stand_in"),
    )
    await server.start()
    yield db
    await server.stop(grace=0)


@pytest.fixture
async def client(redis: Redis) -> AsyncIterator[RequestReplyClient]:
    rr = RequestReplyClient(redis, service="calculation_engine", instance="q1")
    yield rr
    await rr.close()


class Engine:
    """One start of the engine's query runner: its results, in the order handed over."""

    def __init__(self, redis: Redis, client: RequestReplyClient, **over: Any) -> None:
        self.results: list[KPIResult] = []
        self.runner = QueryRunner(
            lambda: client, on_results=self._collect, redis=redis, key=KEY, timeout_s=5, **over
        )

    async def _collect(self, results: list[KPIResult]) -> None:
        self.results.extend(results)

    async def start(self, *definitions: VersionedKPIDefinition) -> Engine:
        await self.runner.load()
        self.runner.set_definitions(definitions)
        return self

    async def tick(self, now: datetime) -> None:
        self.runner.tick(now)
        await self.runner.settle()

    def windows(self) -> list[tuple[str, str]]:
        return [(iso_utc(r.window_start), iso_utc(r.window_end)) for r in self.results]


async def mark(redis: Redis) -> SlotMark | None:
    raw = await redis.hget(KEY, "orders_per_slot")
    return None if raw is None else SlotMark.decode(raw)


async def test_a_restarted_runner_runs_exactly_the_missed_slots_and_retries_a_failed_one(
    redis: Redis, database: Database, client: RequestReplyClient
) -> None:
    first = await Engine(redis, client).start(definition())
    await first.tick(T0 + DELAY + timedelta(seconds=1))  # first sight: from the next slot on
    assert database.asked == [] and await mark(redis) == SlotMark(1, to_micros(T0))
    await first.tick(T0 + SLOT + DELAY - timedelta(milliseconds=1))  # slot 0 still in its grace
    assert database.asked == []
    await first.tick(T0 + SLOT + DELAY)
    assert first.windows() == [slot(0)]
    assert await mark(redis) == SlotMark(1, to_micros(T0 + SLOT))

    # stopped through slots 1..5; slot 3's first run fails when it comes back
    database.asked.clear()
    database.fail.add(slot(3))
    now = T0 + 6 * SLOT + DELAY + timedelta(seconds=3)
    second = await Engine(redis, client).start(definition())
    second.runner.tick(now)  # ticks while its slots run start none of them again
    await second.tick(now)
    assert database.asked == [slot(1), slot(2), slot(3)]  # oldest first, stopped at the failure
    assert second.windows() == [slot(1), slot(2)]
    assert await mark(redis) == SlotMark(1, to_micros(T0 + 3 * SLOT))  # not past slot 3

    # retried 5 s after the tick that finds the run failed, not on every tick
    for later in (1, 3, 5.9):
        await second.tick(now + timedelta(seconds=later))
    assert len(database.asked) == 3
    await second.tick(now + timedelta(seconds=6))  # slot 3 again, then the ones after it
    assert database.asked[3:] == [slot(3), slot(4), slot(5)]
    assert second.windows() == [slot(1), slot(2), slot(3), slot(4), slot(5)]
    for result in second.results:
        assert result.value == 1.0 and result.definition_version == 1
    assert await mark(redis) == SlotMark(1, to_micros(T0 + 6 * SLOT))

    # started again at once: nothing missed, nothing run twice
    third = await Engine(redis, client).start(definition())
    await third.tick(now + timedelta(seconds=6.5))
    assert third.results == [] and len(database.asked) == 6


async def test_the_cap_keeps_the_newest_slots_and_a_new_version_starts_afresh(
    redis: Redis, database: Database, client: RequestReplyClient
) -> None:
    await redis.hset(KEY, "orders_per_slot", SlotMark(1, to_micros(T0)).encode())
    later = T0 + 10 * SLOT + DELAY  # slots 0..9 missed
    capped = await Engine(redis, client, catchup_slots=3).start(definition())
    await capped.tick(later)
    assert capped.windows() == [slot(7), slot(8), slot(9)]
    assert await mark(redis) == SlotMark(1, to_micros(T0 + 10 * SLOT))

    # version 2 (a changed definition) does not run version 1's missed slots
    changed = await Engine(redis, client).start(definition(version=2))
    await changed.tick(later + 5 * SLOT)
    assert changed.results == []
    assert await mark(redis) == SlotMark(2, to_micros(T0 + 15 * SLOT))
    await changed.tick(later + 6 * SLOT)
    assert changed.windows() == [slot(15)]
    assert [r.definition_version for r in changed.results] == [2]


async def test_a_query_without_bind_window_runs_no_missed_slot(
    redis: Redis, database: Database, client: RequestReplyClient
) -> None:
    """It reads the database as it is at the run: a late run would not describe its slot."""
    spec = definition().model_dump(mode="json")
    spec["query"] |= {"sql": "SELECT count(*) FROM entities WHERE kind = $1", "bind_window": False}
    plain = VersionedKPIDefinition.model_validate(spec)
    await redis.hset(KEY, "orders_per_slot", SlotMark(1, to_micros(T0)).encode())
    engine = await Engine(redis, client).start(plain)
    await engine.tick(T0 + 5 * SLOT + DELAY)  # first sight: nothing, whatever is stored
    assert engine.results == []
    await engine.tick(T0 + 8 * SLOT + DELAY)  # late (a blocked loop): only the newest slot
    assert engine.windows() == [slot(7)]
    assert await mark(redis) == SlotMark(1, to_micros(T0))  # nothing recorded for it
