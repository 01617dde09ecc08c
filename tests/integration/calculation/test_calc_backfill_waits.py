"""A due backfill waits until the database service has stored every entity event up to its
end: its consumer group on the entity streams has read them and acknowledged them (a real
Redis; the database's progress is played by hand, its replay by the stand-in)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from calc_helpers import (
    KPIS,
    StandInMetadata,
    StandInReplayer,
    compare,
    history,
    published_results,
    recompute,
    wait_for,
)
from redis.asyncio import Redis

from analytics_engine.calculation.backfill import DATABASE_GROUP
from analytics_engine.calculation.service import Settings, build
from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher
from analytics_engine.core.envelopes import utcnow
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.verify.engine import pending_backfills

pytestmark = pytest.mark.asyncio
Start = Callable[[ServiceRuntime], Awaitable[ServiceRuntime]]
KPI = "revenue_by_region"


async def test_a_due_backfill_waits_for_the_database_to_store_the_events(
    redis: Redis, redis_url: str, running: Start
) -> None:
    metadata = StandInMetadata(redis, {"orders_count": {**KPIS[0], "version": 1}})
    await metadata.server.start()
    replayer = StandInReplayer(redis)
    replay_task = asyncio.create_task(replayer.run())
    events = history(3000, utcnow() - timedelta(seconds=25), 15, seed=5)
    publisher = EventPublisher(redis, source="data_simulator", stream_maxlen=1_000_000)
    for i in range(0, len(events), 1000):
        await publisher.publish_events(events[i : i + 1000])
    # the database service's group exists but has read nothing yet (a backlog, a restart)
    keys = [channels.stream_key(c) for c in channels.ENTITY_CHANNELS]
    for key in keys:
        await redis.xgroup_create(key, DATABASE_GROUP, "0", mkstream=True)
    try:
        settings: dict[str, Any] = {
            "redis_url": redis_url,
            "calculation_port": 0,
            "instance_id": "calc-test",
            "kpi_definitions_dir": None,
            "metadata_timeout_s": 0.5,
            "heartbeat_interval_s": 60,
            "backfill_enabled": True,
            "backfill_horizon": timedelta(minutes=5),
            "backfill_delay": timedelta(milliseconds=200),
        }
        service = build(Settings(**settings))
        service.backfills.ready_retry_s = 0.2
        await running(service.runtime)
        await wait_for(lambda: service.processor.engine.watermark is not None, timeout=20)
        await asyncio.sleep(2.0)  # the history processed
        await metadata.put({**KPIS[1], "version": 1})
        await wait_for(lambda: KPI in service.backfills.jobs, timeout=10)
        job = service.backfills.jobs[KPI]

        # due, but nothing read by the database: it waits, and says so
        await wait_for(lambda: job.waiting is not None, timeout=20)
        assert utcnow() >= job.until
        url = f"http://127.0.0.1:{service.runtime.bound_port}"
        body = await _kpi_list(url)
        assert "has not yet read" in body[KPI]["backfill"]["waiting_for_database"]
        assert (await pending_backfills(url))[KPI].cut == job.cut  # verify still parses it

        # the database reads everything but has not written (acknowledged) it yet
        read: dict[str, list[bytes]] = {}
        for key in keys:
            reply = await redis.xreadgroup(DATABASE_GROUP, "db-1", {key: ">"}, count=100_000)
            read[key] = [entry_id for entry_id, _ in reply[0][1]] if reply else []
        assert sum(map(len, read.values())) > 1000
        await wait_for(lambda: "not yet stored" in (job.waiting or ""), timeout=10)
        await asyncio.sleep(1.0)
        assert replayer.requests == []  # never replayed from an incomplete database
        assert service.backfills.status(KPI) == "backfill_pending"
        assert job.attempts == 0

        # stored: the backfill runs
        for key, ids in read.items():
            if ids:
                await redis.xack(key, DATABASE_GROUP, *ids)
        await wait_for(lambda: service.backfills.status(KPI) == "backfilled", timeout=20)
        assert job.waiting is None
        assert len(replayer.requests) == 1
        await asyncio.sleep(1.0)
        results = [r for r in await published_results(redis) if r["kpi_code"] == KPI]
    finally:
        replay_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await replay_task
        await metadata.server.stop()
    compare(results, recompute([KPIS[1]], events), allow_duplicates=False)
    assert len(results) > 10


async def _kpi_list(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/api/v1/kpis") as response:
        body = await response.json()
    return {item["code"]: item for item in body["items"]}
