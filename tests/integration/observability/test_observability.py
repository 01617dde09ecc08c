"""The observability service against real Redis: heartbeats, missing services, dead letters,
KPI freshness, simulation ticks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.core.settings import BaseServiceSettings
from analytics_engine.localstack import RedisServer
from analytics_engine.observability.service import Settings, create

pytestmark = pytest.mark.asyncio
Start = Callable[[ServiceRuntime], Awaitable[ServiceRuntime]]


async def status(rt: ServiceRuntime) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{rt.bound_port}/api/v1/status") as resp:
            assert resp.status == 200
            body: dict[str, Any] = await resp.json()
            return body


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_marks_a_killed_service_missing_and_back_when_restarted(
    redis_url: str, running: Start
) -> None:
    obs = create(
        Settings.model_validate(
            {"REDIS_URL": redis_url, "OBSERVABILITY_PORT": 0, "OBSERVABILITY_MISSING_AFTER": 0.6}
        )
    )
    await running(obs)

    def worker() -> ServiceRuntime:
        settings = BaseServiceSettings.model_validate(
            {"REDIS_URL": redis_url, "SERVICE_INSTANCE_ID": "w1", "HEARTBEAT_INTERVAL": 0.1}
        )
        return ServiceRuntime(service="database_service", settings=settings, port=0)

    async def state() -> str | None:
        for entry in (await status(obs))["services"]:
            if entry["service"] == "database_service":
                return str(entry["status"])
        return None

    first = worker()
    task = asyncio.create_task(first.run())
    await eventually(lambda: _eq(state(), "up"))
    task.cancel()  # killed: no goodbye
    await asyncio.gather(task, return_exceptions=True)
    await eventually(lambda: _eq(state(), "missing"))
    second = worker()
    await running(second)
    await eventually(lambda: _eq(state(), "up"))


async def _eq(value: Awaitable[str | None], expected: str) -> bool:
    return (await value) == expected


async def test_reports_dead_letters_kpi_freshness_and_ticks(redis_url: str, running: Start) -> None:
    obs = create(Settings.model_validate({"REDIS_URL": redis_url, "OBSERVABILITY_PORT": 0}))
    await running(obs)
    publisher = obs.publisher
    await obs.dead_letters.add(
        channel=channels.KPI_CALCULATED, reason="test", original=b"{}", kind="event"
    )
    end = datetime.now(UTC) - timedelta(milliseconds=50)
    await publisher.publish(
        channels.kpi_channel("orders_count"),
        {
            "kpi_code": "orders_count",
            "value": 12.0,
            "window_start": (end - timedelta(minutes=1)).isoformat(),
            "window_end": end.isoformat(),
            "dimensions": {},
            "sample_count": 12,
            "definition_version": 1,
            "computed_at": end.isoformat(),
        },
    )
    await publisher.publish(
        channels.SIMULATION_TICK,
        {"tick": 7, "simulated_time": end.isoformat(), "events_emitted": 700, "rate_per_s": 100},
    )

    async def complete() -> bool:
        body = await status(obs)
        return bool(body["kpi_freshness"]) and body["simulation"]["last_tick"] is not None

    await eventually(complete)
    body = await status(obs)
    assert body["dead_letters"] == {channels.KPI_CALCULATED: 1}
    [kpi] = body["kpi_freshness"]
    assert kpi["kpi_code"] == "orders_count"
    assert 0.0 < kpi["freshness_s"] < 5.0
    assert body["simulation"]["last_tick"]["tick"] == 7
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{obs.bound_port}/metrics") as resp:
            text = await resp.text()
    assert 'analytics_dead_letters{channel="kpi.calculated"} 1.0' in text
    assert 'analytics_kpi_result_delay_seconds{kpi_code="orders_count"}' in text


async def test_trims_a_stream_once_its_readers_consumed_it(redis_url: str, running: Start) -> None:
    """`simulation.tick` is read by the observability service alone: once it has acknowledged
    the ticks, they leave the stream (the length cap alone would keep them)."""
    obs = create(
        Settings.model_validate(
            {
                "REDIS_URL": redis_url,
                "OBSERVABILITY_PORT": 0,
                "OBSERVABILITY_TRIM_INTERVAL": "200ms",
            }
        )
    )
    await running(obs)
    key = channels.stream_key(channels.SIMULATION_TICK)
    now = datetime.now(UTC).isoformat()
    await obs.publisher.publish_many(
        (
            channels.SIMULATION_TICK,
            {"tick": i, "simulated_time": now, "events_emitted": i, "rate_per_s": 1},
        )
        for i in range(1000)
    )

    async def trimmed() -> bool:
        return int(await obs.redis.xlen(key)) < 500

    await eventually(trimmed)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{obs.bound_port}/metrics") as resp:
            text = await resp.text()
    assert 'analytics_stream_entries_trimmed_total{channel="simulation.tick"}' in text


async def test_reports_full_streams_as_degraded(redis_url: str, running: Start) -> None:
    """A full stream holds its publishers back (backpressure): the status names it. Trimming is
    off here, so consumed ticks stay and fill `simulation.tick`."""
    obs = create(
        Settings.model_validate(
            {
                "REDIS_URL": redis_url,
                "OBSERVABILITY_PORT": 0,
                "OBSERVABILITY_TRIM_INTERVAL": "0s",
                "BUS_STREAM_MAXLEN": 1000,
            }
        )
    )
    await running(obs)
    body = await status(obs)
    assert body["full_streams"] == []
    now = datetime.now(UTC).isoformat()
    stopping = asyncio.Event()
    stopping.set()  # publish without waiting for room
    publisher = EventPublisher(
        obs.redis, source="data_simulator", stream_maxlen=1000, stopping=stopping
    )
    await publisher.publish_many(
        (
            channels.SIMULATION_TICK,
            {"tick": i, "simulated_time": now, "events_emitted": i, "rate_per_s": 1},
        )
        for i in range(1000)
    )
    body = await status(obs)
    assert body["full_streams"] == [channels.SIMULATION_TICK]
    assert body["status"] == "degraded"


async def test_replicas_report_the_same_last_tick_and_either_one_trims(
    redis_url: str, running: Start
) -> None:
    """The chart runs two replicas, so that retention (which gives full streams room) outlives
    the loss of one pod. They share the tick stream's consumer group, each delivered only some
    ticks, yet both report the newest valid tick; and the one left trims on its own."""

    def replica(instance: str) -> ServiceRuntime:
        return create(
            Settings.model_validate(
                {
                    "REDIS_URL": redis_url,
                    "OBSERVABILITY_PORT": 0,
                    "SERVICE_INSTANCE_ID": instance,
                    "OBSERVABILITY_TRIM_INTERVAL": "200ms",
                }
            )
        )

    first = await running(replica("obs-a"))
    second = await running(replica("obs-b"))
    key = channels.stream_key(channels.SIMULATION_TICK)
    now = datetime.now(UTC).isoformat()

    def tick(i: int) -> tuple[str, dict[str, Any]]:
        return channels.SIMULATION_TICK, {
            "tick": i,
            "simulated_time": now,
            "events_emitted": i,
            "rate_per_s": 1,
        }

    for start in range(0, 100, 10):
        await first.publisher.publish_many(tick(i) for i in range(start, start + 10))
        await asyncio.sleep(0.02)
    # the newest entry is not a valid tick: it is dead-lettered, and the status skips it
    await first.redis.xadd(
        key,
        {
            b"m": b'{"event_id":"bad-tick","event_type":"simulation.tick","source":"t",'
            b'"timestamp":"2026-01-01T00:00:00+00:00","payload":{"tick":"soon"}}'
        },
    )

    # each tick entry is delivered to one replica only, so only a status read from the
    # stream can show tick 99 on both
    async def both_report_99() -> bool:
        ticks = [(await status(rt))["simulation"] for rt in (first, second)]
        return all(t["last_tick"] is not None and t["last_tick"]["tick"] == 99 for t in ticks)

    await eventually(both_report_99)
    for rt in (first, second):
        assert 0 <= (await status(rt))["simulation"]["seconds_ago"] < 10
    await eventually(lambda: _has_dead_letter(second, channels.SIMULATION_TICK))

    first.stop()
    await eventually(lambda: _down(first))
    await second.publisher.publish_many(tick(i) for i in range(100, 1100))

    async def trimmed() -> bool:
        return int(await second.redis.xlen(key)) < 500

    await eventually(trimmed)


async def _has_dead_letter(rt: ServiceRuntime, channel: str) -> bool:
    return (await status(rt))["dead_letters"].get(channel, 0) >= 1


async def _down(rt: ServiceRuntime) -> bool:
    try:
        await status(rt)
    except aiohttp.ClientConnectionError:
        return True
    return False


async def test_a_service_down_since_before_it_started_is_reported_missing(
    redis_url: str, running: Start
) -> None:
    """Restarted (a new pod, a second replica), the observability service has missed the last
    heartbeats of a service that is already down: it reports every deployed service it does
    not hear from, and not those the chart says are not deployed."""
    obs = create(
        Settings.model_validate(
            {
                "REDIS_URL": redis_url,
                "OBSERVABILITY_PORT": 0,
                "OBSERVABILITY_MISSING_AFTER": 0.5,
                "HEARTBEAT_INTERVAL": 0.1,
                "OBSERVABILITY_ABSENT_READERS": "data_simulator",
            }
        )
    )
    await running(obs)

    async def reported() -> bool:
        return "database_service" in {s["service"] for s in (await status(obs))["services"]}

    await eventually(reported)
    body = await status(obs)
    entries = {s["service"]: s for s in body["services"]}
    assert entries["database_service"]["status"] == "missing"
    assert entries["database_service"]["instances"] == []
    assert "data_simulator" not in entries
    assert entries["observability_service"]["status"] == "up"  # its own heartbeats
    assert body["status"] == "degraded"


async def test_status_during_a_redis_outage_is_a_degraded_report(
    tmp_path: Path, running: Start
) -> None:
    """Redis down is what the status must say, not a 502: 200, degraded, Redis unreachable,
    and what the service holds in memory (services, rates, freshness) still reported."""
    with RedisServer(tmp_path / "redis") as server:
        obs = create(Settings.model_validate({"REDIS_URL": server.url, "OBSERVABILITY_PORT": 0}))
        await running(obs)
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # its own heartbeat heard: what it knows no longer changes while Redis is down
            body = await status(obs)
            known = [s["service"] for s in body["services"]]
            if "observability_service" in known:
                break
            assert asyncio.get_running_loop().time() < deadline, known
            await asyncio.sleep(0.05)
        assert body["redis"] == {"reachable": True}
        assert "dead_letters" in body
        server.stop()
        started = asyncio.get_running_loop().time()
        body = await status(obs)
        assert asyncio.get_running_loop().time() - started < 5
        assert body["status"] == "degraded"
        assert body["redis"]["reachable"] is False
        assert "Redis is unreachable" in body["redis"]["error"]
        assert [s["service"] for s in body["services"]] == known
        assert "message_rates" in body and "kpi_freshness" in body
        assert "dead_letters" not in body and "simulation" not in body  # unknown, not empty
        server.start()


async def _metrics(rt: ServiceRuntime) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{rt.bound_port}/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


async def test_gauges_follow_the_platform_without_anyone_reading_the_status(
    redis_url: str, running: Start
) -> None:
    """Prometheus scrapes /metrics, never /api/v1/status: `analytics_service_up` and
    `analytics_dead_letters` must rise and fall from the bus alone, else an alert on them
    never fires (nobody opened the status page) or never clears (a dead-letter stream the
    operator deleted keeps its last count)."""
    obs = create(
        Settings.model_validate(
            {"REDIS_URL": redis_url, "OBSERVABILITY_PORT": 0, "OBSERVABILITY_MISSING_AFTER": 0.6}
        )
    )
    await running(obs)
    worker = ServiceRuntime(
        service="database_service",
        settings=BaseServiceSettings.model_validate(
            {"REDIS_URL": redis_url, "SERVICE_INSTANCE_ID": "w1", "HEARTBEAT_INTERVAL": 0.1}
        ),
        port=0,
    )
    task = asyncio.create_task(worker.run())
    up = 'analytics_service_up{service="database_service"} 1.0'
    down = 'analytics_service_up{service="database_service"} 0.0'
    await eventually(lambda: _contains(_metrics(obs), up))
    task.cancel()  # killed: no goodbye
    await asyncio.gather(task, return_exceptions=True)
    await eventually(lambda: _contains(_metrics(obs), down))

    await obs.dead_letters.add(
        channel=channels.KPI_CALCULATED, reason="test", original=b"{}", kind="event"
    )
    counted = 'analytics_dead_letters{channel="kpi.calculated"} 1.0'
    await eventually(lambda: _contains(_metrics(obs), counted))
    await obs.redis.delete(channels.dead_letter_key(channels.KPI_CALCULATED))  # handled
    await eventually(lambda: _lacks(_metrics(obs), counted))


async def _contains(text: Awaitable[str], needle: str) -> bool:
    return needle in await text


async def _lacks(text: Awaitable[str], needle: str) -> bool:
    return needle not in await text
