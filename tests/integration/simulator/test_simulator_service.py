"""The Data Simulator service against a real Redis: deterministic stream at the configured
rate, HTTP control API, ticks, entity types from a (stand-in) metadata service, throughput."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from analytics_engine.core import channels
from analytics_engine.core.bus import DeadLetters
from analytics_engine.core.envelopes import Request
from analytics_engine.core.redis import connect
from analytics_engine.core.request_reply import RequestReplyServer
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.localstack import RedisServer
from analytics_engine.simulator.service import Settings, SimulatorService, build

pytestmark = pytest.mark.asyncio
Start = Callable[[ServiceRuntime], Awaitable[ServiceRuntime]]


def settings(redis_url: str, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "simulator_port": 0,
        "instance_id": "sim-test",
        "metadata_timeout_s": 0.5,
        "heartbeat_interval_s": 60,
        **over,
    }
    return Settings(**values)


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def stored(redis: Redis) -> list[dict[str, Any]]:
    """Every entity event in the durable streams, in generation order."""
    entries = []
    for channel in channels.ENTITY_CHANNELS:
        for _, fields in await redis.xrange(channels.stream_key(channel)):
            entries.append(orjson.loads(fields[b"m"]))
    return sorted(entries, key=lambda e: e["event_id"])  # ids end in the sequence number


def stable(event: dict[str, Any]) -> tuple[Any, ...]:
    """What must repeat exactly for one seed (sensor readings follow the time of day)."""
    p = event["payload"]
    attrs = dict(p.get("attributes") or {})
    if p["entity_type"] == "sensor":
        attrs = {k: attrs[k] for k in ("site", "battery") if k in attrs}
    return (
        event["event_id"],
        event["event_type"],
        p["entity_type"],
        p["entity_id"],
        p["version"],
        p.get("reason"),
        sorted(attrs.items()),
    )


async def run_to_end(start: Start, s: Settings) -> SimulatorService:
    service = build(s)
    await start(service.runtime)
    await wait_for(lambda: service.controller.finished and not service.controller.running)
    return service


async def test_same_seed_same_stream_at_the_configured_rate(
    redis: Redis, redis_url: str, running: Start
) -> None:
    began = time.monotonic()
    run = {"run_id": "reproducible"}  # ids repeat only when the run id is pinned
    service = await run_to_end(
        start=running, s=settings(redis_url, rate=2000, max_events=3000, **run)
    )
    elapsed = time.monotonic() - began
    # 3000 events at 2000/s: paced (not faster than the rate), and not stalled; the upper bound
    # leaves room for a slow shared machine
    assert 1.2 < elapsed < 8.0, elapsed
    first = await stored(redis)
    assert len(first) == 3000
    gen = service.generator
    assert [e["event_id"] for e in first] == [gen.event_id(i) for i in range(3000)]
    assert all(e["source"] == "data_simulator" for e in first)
    service.runtime.stop()
    await redis.flushdb()
    await run_to_end(start=running, s=settings(redis_url, rate=5000, max_events=3000, **run))
    second = await stored(redis)
    assert [stable(e) for e in second] == [stable(e) for e in first]
    await redis.flushdb()
    await run_to_end(start=running, s=settings(redis_url, rate=5000, max_events=300))
    unpinned = await stored(redis)
    assert not {e["event_id"] for e in unpinned} & {e["event_id"] for e in first}
    await redis.flushdb()
    await run_to_end(start=running, s=settings(redis_url, rate=5000, max_events=300, seed=43))
    assert [stable(e) for e in await stored(redis)] != [stable(e) for e in first[:300]]


async def test_http_control_api(redis_url: str, running: Start) -> None:
    service = build(settings(redis_url, rate=500, autostart=False, tick_interval_s=0.1))
    await running(service.runtime)
    base = f"http://127.0.0.1:{service.runtime.bound_port}/api/v1/simulator"
    async with aiohttp.ClientSession() as http:
        async with http.get(base) as r:
            status = await r.json()
        assert r.status == 200
        assert status["running"] is False and status["events_emitted"] == 0
        assert status["seed"] == 42 and status["rate"] == 500 and status["started_at"] is None
        async with http.post(f"{base}/start") as r:
            assert r.status == 200 and (await r.json())["running"] is True
        await wait_for(lambda: service.controller.events_emitted > 100)
        async with http.get(base) as r:
            status = await r.json()
        assert status["started_at"] is not None
        counts = status["counts"]
        assert sum(sum(kinds.values()) for kinds in counts.values()) >= 100
        assert set(counts) == {"order", "sensor"}
        async with http.put(f"{base}/rate", json={"rate": 1500.5}) as r:
            assert r.status == 200 and (await r.json())["rate"] == 1500.5
        for bad in (
            {"rate": 0},
            {"rate": -3},
            {"rate": 100_001},
            {"rate": "fast"},
            {"rate": True},
            {},
            [1],
            50,  # a bare number: the message names the object it must be
        ):
            async with http.put(f"{base}/rate", json=bad) as r:
                body = await r.json()
            assert r.status == 422, bad
            assert body["error"]["code"] == "validation_error"
            assert body["error"]["message"] and body["error"]["details"]
            if not isinstance(bad, dict):
                assert '{"rate"' in body["error"]["message"], body
        async with http.put(f"{base}/rate", data=b"{nope") as r:
            assert r.status == 400
        async with http.put(f"{base}/rate", data=b"[" * 100_000) as r:  # too deep to parse
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "invalid_json"
        assert service.controller.rate == 1500.5
        await wait_for(lambda: service.controller.status()["measured_rate"] > 0)
        async with http.post(f"{base}/stop") as r:
            stopped = await r.json()
        assert r.status == 200 and stopped["running"] is False
        assert stopped["measured_rate"] == 0  # not the last tick's rate while it ran
        await asyncio.sleep(0.1)
        frozen = service.controller.events_emitted
        await asyncio.sleep(0.3)
        assert service.controller.events_emitted == frozen


async def test_ticks(redis: Redis, redis_url: str, running: Start) -> None:
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channels.SIMULATION_TICK)
    await running(build(settings(redis_url, rate=1000, tick_interval_s=0.2)).runtime)
    ticks = []
    deadline = time.monotonic() + 5
    while len(ticks) < 3 and time.monotonic() < deadline:
        message = await pubsub.get_message(timeout=0.5)
        if message:
            ticks.append(orjson.loads(message["data"])["payload"])
    await pubsub.aclose()
    assert len(ticks) == 3
    assert set(ticks[0]) == {"tick", "simulated_time", "events_emitted", "rate_per_s"}
    assert [t["tick"] for t in ticks] == sorted(t["tick"] for t in ticks)
    assert ticks[-1]["events_emitted"] > ticks[0]["events_emitted"]
    assert 500 < ticks[-1]["rate_per_s"] < 1500


async def test_entity_types_from_a_stand_in_metadata_service(
    redis: Redis, redis_url: str, running: Start
) -> None:
    """A stand-in `metadata.lookup` responder (the real metadata service needs PostgreSQL)."""

    async def list_entity_definitions(_: Request) -> dict[str, Any]:
        return {
            "items": [
                {
                    "entity_type": "order",
                    "attributes": {"amount": "number", "status": "string"},
                    "version": 1,
                },
                {
                    "entity_type": "truck",
                    "attributes": {"load": "number", "depot": "string"},
                    "version": 1,
                },
            ]
        }

    stand_in = RequestReplyServer(
        redis,
        channel=channels.METADATA_LOOKUP,
        source="metadata_stand_in",
        instance="t",
        handlers={"list_entity_definitions": list_entity_definitions},
        dead_letters=DeadLetters(redis, service="metadata_stand_in"),
    )
    await stand_in.start()
    try:
        await run_to_end(running, settings(redis_url, rate=5000, max_events=2000))
    finally:
        await stand_in.stop()
    events = [e["payload"] for e in await stored(redis) if "attributes" in e["payload"]]
    types = {p["entity_type"] for p in events}
    assert types == {"order", "truck"}
    for p in events:
        expected = {"amount", "status"} if p["entity_type"] == "order" else {"load", "depot"}
        assert set(p["attributes"]) == expected


async def test_a_large_burst_is_published_whole(
    redis: Redis, redis_url: str, running: Start
) -> None:
    """At the highest rate every event still reaches the streams (the rate itself is measured
    by bench/pipeline_bench.py, not asserted here)."""
    n = 100_000
    service = await run_to_end(running, settings(redis_url, rate=100_000, max_events=n))
    assert service.controller.events_emitted == n
    assert sum([await redis.xlen(channels.stream_key(c)) for c in channels.ENTITY_CHANNELS]) == n


async def test_high_rates_publish_in_batches_of_a_hundredth_of_the_rate(
    redis: Redis, redis_url: str, running: Start
) -> None:
    """At 20k/s the simulator publishes ~100 batches of ~200 events per second, not a batch
    per wake-up of whatever accrued meanwhile (one script call and one wake-up per few events
    would cost the CPU the pipeline needs)."""
    n, rate = 20_000, 20_000
    service = await run_to_end(running, settings(redis_url, rate=rate, max_events=n))
    assert service.controller.events_emitted == n
    assert service.controller.batches_published <= 1.5 * n / (rate / 100)
    assert sum([await redis.xlen(channels.stream_key(c)) for c in channels.ENTITY_CHANNELS]) == n


async def test_a_batch_retried_over_a_redis_outage_is_stamped_when_published(
    tmp_path: Any, running: Start
) -> None:
    """A batch made before Redis went away is published after it with a fresh `timestamp`:
    consumers close windows on Redis time once they have read everything, so an old stamp
    arriving after the outage would be on time for a window already closed."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        service = build(settings(server.url, rate=1000, max_events=3000))
        await running(service.runtime)
        await wait_for(lambda: service.controller.events_emitted >= 500)
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(1.5)  # the simulator's next batch waits for Redis
        await asyncio.to_thread(server.start)
        await wait_for(lambda: service.controller.finished)
        redis = connect(server.url)
        skews = []
        event_ids = set()
        for channel in channels.ENTITY_CHANNELS:
            for entry_id, fields in await redis.xrange(channels.stream_key(channel)):
                appended_ms = int(entry_id.split(b"-")[0])
                envelope = orjson.loads(fields[b"m"])
                event_ids.add(envelope["event_id"])
                skews.append(
                    appended_ms - datetime.fromisoformat(envelope["timestamp"]).timestamp() * 1000
                )
        await redis.aclose()
        # a batch that landed just before the outage is sent again (at-least-once): a copy
        assert len(event_ids) == 3000
        assert max(skews) < 500  # ms between an event's stamp and its append
    finally:
        server.stop()


async def test_a_stop_before_the_autostart_is_not_overridden(
    redis: Redis, redis_url: str, running: Start
) -> None:
    """The autostart waits for the metadata service's first answer (here a slow one: it waits
    out the timeout). An operator's `stop` meanwhile must hold: the autostart must not start the
    simulator behind their back once the wait is over."""

    async def slow(_: Request) -> dict[str, Any]:
        await asyncio.sleep(8)  # beyond the timeout
        return {"items": []}

    stand_in = RequestReplyServer(
        redis,
        channel=channels.METADATA_LOOKUP,
        source="metadata_stand_in",
        instance="t",
        handlers={"list_entity_definitions": slow},
        dead_letters=DeadLetters(redis, service="metadata_stand_in"),
    )
    await stand_in.start()
    try:
        service = build(settings(redis_url, rate=1000, metadata_timeout_s=3.0))
        await running(service.runtime)
        base = f"http://127.0.0.1:{service.runtime.bound_port}/api/v1/simulator"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/stop") as r:
                assert r.status == 200 and (await r.json())["running"] is False
        await asyncio.wait_for(service.sync.first_attempt.wait(), 20)
        await asyncio.sleep(0.5)  # the autostart runs right after the first attempt
        assert not service.controller.running
        assert service.controller.events_emitted == 0
    finally:
        await stand_in.stop()
