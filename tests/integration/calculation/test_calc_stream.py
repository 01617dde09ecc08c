"""The Calculation Engine against a real Redis: results equal a straightforward recomputation,
each window once on `kpi.calculated` and `kpi.calculated.{code}`; crash (SIGKILL) and restart
mid-stream; hot reload; backfill over stored history (stand-in database replayer); HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from calc_helpers import (
    KPIS,
    StandInMetadata,
    StandInReplayer,
    compare,
    history,
    key_of,
    kpi,
    published_results,
    recompute,
    tumbling,
    wait_for,
    write_kpi_dir,
)
from redis.asyncio import Redis

from analytics_engine.calculation.service import CalculationService, Settings, build
from analytics_engine.core import channels
from analytics_engine.core.bus import DeadLetters, EventPublisher
from analytics_engine.core.envelopes import Event, Request, utcnow
from analytics_engine.core.request_reply import RequestReplyServer
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.verify.engine import VersionStart, engine_backfills, pending_backfills

pytestmark = pytest.mark.asyncio
Start = Callable[[ServiceRuntime], Awaitable[ServiceRuntime]]


def settings(redis_url: str, kpi_dir: str | None, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "calculation_port": 0,
        "instance_id": "calc-test",
        "kpi_definitions_dir": kpi_dir,
        "metadata_timeout_s": 0.5,
        "heartbeat_interval_s": 60,
        "backfill_enabled": False,
        **over,
    }
    return Settings(**values)


async def publish(redis: Redis, events: list[Event], chunk: int = 1000) -> None:
    publisher = EventPublisher(redis, source="data_simulator", stream_maxlen=1_000_000)
    for i in range(0, len(events), chunk):
        await publisher.publish_events(events[i : i + chunk])


async def settled(redis: Redis, quiet_s: float = 1.5) -> list[dict[str, Any]]:
    """The results once no new one has appeared for `quiet_s`."""
    last, since = -1, time.monotonic()
    while True:
        n = await redis.xlen(channels.stream_key(channels.KPI_CALCULATED))
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return await published_results(redis)
        await asyncio.sleep(0.1)


async def test_results_equal_recomputation_once_on_both_channels(
    redis: Redis, redis_url: str, running: Start, tmp_path: Path
) -> None:
    events = history(6000, utcnow() - timedelta(seconds=40), 30)
    expected = recompute(KPIS, events)
    await publish(redis, events)
    per_kpi: list[dict[str, Any]] = []
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.psubscribe("kpi.calculated.*")

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "pmessage":
                per_kpi.append(orjson.loads(message["data"]))

    listener = asyncio.create_task(listen())
    service = build(settings(redis_url, write_kpi_dir(tmp_path)))
    await running(service.runtime)
    results = await settled(redis)
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    await pubsub.aclose()
    compare(results, expected, allow_duplicates=False)
    assert len(expected) > 200
    # the same results, once each, on the per-KPI channels
    assert sorted(map(repr, (key_of(m["payload"]) for m in per_kpi))) == sorted(
        map(repr, (key_of(r) for r in results))
    )
    assert all(m["event_type"] == f"kpi.calculated.{m['payload']['kpi_code']}" for m in per_kpi)
    assert set(results[0]) == {
        "kpi_code",
        "value",
        "window_start",
        "window_end",
        "dimensions",
        "sample_count",
        "definition_version",
        "computed_at",
    }
    stats = service.processor.engine.stats()
    aggregated = [e for e in events if e.event_type != channels.ENTITY_DEACTIVATED]
    assert stats.duplicates == len(aggregated) - len({e.event_id for e in aggregated}) > 0
    assert sum(c.late_events for c in stats.kpis.values()) > 0
    await asyncio.sleep(1.2)  # a checkpoint covers everything read
    checkpoint = orjson.loads(await redis.get(service.processor.checkpoint_key))
    for channel in (channels.ENTITY_CREATED, channels.ENTITY_UPDATED):
        key = channels.stream_key(channel)
        last = (await redis.xrevrange(key, count=1))[0][0].decode()
        assert checkpoint["released"][channel] == last
        # and holds it for stream retention (written in the checkpoint's transaction)
        hold = await redis.hget(channels.stream_hold_key(channel), "calculation_engine")
        assert hold.decode() == last
        # read without acknowledgements: the checkpoint is the position, nothing is pending
        assert (await redis.xpending(key, "calculation_engine"))["pending"] == 0
    metrics = f"http://127.0.0.1:{service.runtime.bound_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(metrics) as r:
        text = await r.text()
    assert "analytics_kpi_freshness_seconds_bucket" in text
    assert 'analytics_kpi_late_events_total{kpi_code="orders_count"}' in text


def spawn(redis_url: str, kpi_dir: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "KPI_DEFINITIONS_DIR": kpi_dir,
        "CALCULATION_PORT": "0",
        "SERVICE_INSTANCE_ID": "calc-crash",
        "BUS_BATCH_SIZE": "100",
        "CALCULATION_CHECKPOINT_INTERVAL": "0.3",
        # the smallest parts: the dedupe ring goes in chunks of 81 ids, so the restarts restore
        # a ring from many chunks written by successive checkpoints
        "CALCULATION_CHECKPOINT_PART_BYTES": "65536",
        "CALCULATION_BACKFILL": "false",
        "CALCULATION_METADATA_TIMEOUT": "0.5",
        "LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "analytics_engine.cli", "run", "calculation"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def test_sigkill_and_restart_mid_stream_loses_and_corrupts_nothing(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    events = history(30_000, utcnow() - timedelta(seconds=70), 60, seed=11)
    expected = recompute(KPIS, events)
    await publish(redis, events)
    kpi_dir = write_kpi_dir(tmp_path)
    kills = 0
    proc = spawn(redis_url, kpi_dir)
    try:
        # kill it twice while it works through the stream, each time after some output
        for target in (len(expected) // 4, len(expected) // 2):
            await wait_for(lambda t=target: _count_at_least(redis, t), timeout=120)
            await wait_for(lambda: _checkpointed(redis), timeout=30)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills += 1
            proc = spawn(redis_url, kpi_dir)
        results = await settled(redis, quiet_s=3)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert kills == 2
    compare(results, expected, allow_duplicates=True)
    assert len(results) < 1.5 * len(expected)  # replays re-emit only since the checkpoint


async def _checkpointed(redis: Redis) -> bool:
    """A checkpoint is stored, its ring in chunks of more than one checkpoint (see `spawn`)."""
    raw = await redis.get("ae:calc:checkpoint")
    if raw is None:
        return False
    chunks = orjson.loads(raw)["recent_ids"]["chunks"]
    return len(chunks) > 2 and await redis.exists(
        *(f"ae:calc:checkpoint:ids:{c[0]}" for c in chunks)
    ) == len(chunks)


async def _count_at_least(redis: Redis, n: int) -> bool:
    return await redis.xlen(channels.stream_key(channels.KPI_CALCULATED)) >= n


async def live_publisher(
    redis: Redis, log: list[Event], stop: asyncio.Event, rate: int = 400
) -> None:
    """Simulator-like events stamped with the real time, kept in `log`."""
    from analytics_engine.simulator.config import GeneratorConfig
    from analytics_engine.simulator.generator import EventGenerator

    gen = EventGenerator(
        GeneratorConfig(
            seed=5, late_ratio=0, out_of_order_ratio=0.05, entity_weights={"order": 1.0}
        )
    )
    publisher = EventPublisher(redis, source="data_simulator", stream_maxlen=1_000_000)
    while not stop.is_set():
        now = utcnow()
        first = gen.sequence
        batch = [
            Event(
                event_id=gen.event_id(first + i),
                event_type=c,
                source="data_simulator",
                timestamp=now,
                payload=p,
            )
            for i, (c, p) in enumerate(gen.next_batch(rate // 20, now))
        ]
        await publisher.publish_events(batch)
        log.extend(batch)
        await asyncio.sleep(0.05)


async def test_hot_reload_of_a_changed_definition_without_restart(
    redis: Redis, redis_url: str, running: Start
) -> None:
    v1 = {**kpi("orders_new", "order", "count", tumbling("1s", "0s")), "version": 1}
    metadata = StandInMetadata(redis, {"orders_new": v1})
    await metadata.server.start()
    log: list[Event] = []
    stop = asyncio.Event()
    feeder = asyncio.create_task(live_publisher(redis, log, stop))
    try:
        service = build(settings(redis_url, None, backfill_enabled=False))
        await running(service.runtime)
        await wait_for(lambda: any(r["definition_version"] == 1 for r in _cached(service)), 20)
        v2 = {**v1, "version": 2, "filter": "status == 'new'"}
        await metadata.put(v2)
        await wait_for(lambda: service.processor.engine.definitions["orders_new"].version == 2)
        changed_at = service.processor.engine.watermark
        assert changed_at is not None
        await asyncio.sleep(4)
    finally:
        stop.set()
        await feeder
        await metadata.server.stop()
    results = await settled(redis)
    v2_results = [r for r in results if r["definition_version"] == 2]
    assert v2_results, "the changed definition never produced a result"
    expected = recompute([{**v2, "code": "orders_with_status_new"}], log)
    checked = 0
    # without a backfill, windows from the cut on are exact (the live engine saw all of them)
    for r in v2_results:
        if datetime.fromisoformat(r["window_start"]) < changed_at:
            continue
        key = ("orders_with_status_new", *key_of(r)[1:])
        want = expected[key]
        assert (r["value"], r["sample_count"]) == (want.value, want.sample_count), r
        checked += 1
    assert checked >= 2
    # version-1 windows stop once the change took effect
    assert all(
        r["definition_version"] == 2
        for r in results
        if datetime.fromisoformat(r["window_start"]) > changed_at + timedelta(seconds=2)
    )


def _cached(service: CalculationService) -> list[dict[str, Any]]:
    return service.cache.latest("orders_new")


async def test_new_definition_is_backfilled_over_stored_history(
    redis: Redis, redis_url: str, running: Start
) -> None:
    orders_count = {**KPIS[0], "version": 1}
    revenue = {**KPIS[1], "version": 1}
    metadata = StandInMetadata(redis, {"orders_count": orders_count})
    await metadata.server.start()
    replayer = StandInReplayer(redis)
    replay_task = asyncio.create_task(replayer.run())
    events = history(4000, utcnow() - timedelta(seconds=30), 20, seed=3)
    await publish(redis, events)
    await replayer.stored_everything()  # the database has stored them: the backfill may run
    try:
        service = build(
            settings(
                redis_url,
                None,
                backfill_enabled=True,
                backfill_horizon=timedelta(minutes=5),
                # the backfill waits this long after its last window closes: time to see it
                # pending through the HTTP API
                backfill_delay=timedelta(milliseconds=1500),
            )
        )
        await running(service.runtime)
        await settled(redis)  # history processed; the idle path closed every window
        cut = service.processor.engine.watermark
        await metadata.put(revenue)  # a new KPI: its history must come from the backfill
        await wait_for(lambda: "revenue_by_region" in service.processor.engine.definitions)
        # what `verify` reads: the windows the pending backfill will publish
        job = service.backfills.jobs["revenue_by_region"]
        url = f"http://127.0.0.1:{service.runtime.bound_port}"
        pending = (await pending_backfills(url))["revenue_by_region"]
        assert (pending.since, pending.cut, pending.definition_version) == (job.since, job.cut, 1)
        assert pending.due == job.until + timedelta(milliseconds=1500)
        assert pending.since < pending.cut
        # where the version's results begin; orders_count has run since the first start
        coverage = (await engine_backfills(url)).coverage
        assert coverage == {"revenue_by_region": VersionStart(1, job.since)}
        await wait_for(
            lambda: (
                service.backfills.status("revenue_by_region") != "backfill_pending"
                and len(replayer.unsubscribed) == 1
            ),
            timeout=30,
        )
        results = await settled(redis)
        # the backfill is done: nothing pending, and verify still learns where v1 begins
        after = await engine_backfills(url)
        assert after.pending == {}
        assert after.coverage == {"revenue_by_region": VersionStart(1, job.since)}
    finally:
        replay_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await replay_task
        await metadata.server.stop()
    assert replayer.requests[0]["entity_type"] == "order"
    revenue_results = [r for r in results if r["kpi_code"] == "revenue_by_region"]
    expected = recompute([KPIS[1]], events)
    assert cut is not None
    compare(revenue_results, expected, allow_duplicates=False)
    assert len(revenue_results) > 20
    # the backfill's results say where the version begins (the database hides older
    # versions' results from there on); the live engine's do not
    backfilled = [r for r in revenue_results if datetime.fromisoformat(r["window_start"]) < job.cut]
    assert backfilled
    assert {datetime.fromisoformat(r["version_since"]) for r in backfilled} == {job.since}
    assert all("version_since" not in r for r in revenue_results if r not in backfilled)


async def test_http_api_with_a_stand_in_database(
    redis: Redis, redis_url: str, running: Start, tmp_path: Path
) -> None:
    calls: list[dict[str, Any]] = []

    async def kpi_history(request: Request) -> dict[str, Any]:
        calls.append(request.payload)
        rows = [{"kpi_code": request.payload["kpi_code"], "value": 1.0}]
        return {"rows": rows, "truncated": request.payload.get("limit") == 1}  # as the database

    async def latest_kpi_values(request: Request) -> dict[str, Any]:
        return {"rows": [{"kpi_code": request.payload["kpi_code"], "value": 2.0}]}

    database = RequestReplyServer(
        redis,
        channel=channels.DATABASE_QUERY,
        source="database_stand_in",
        instance="t",
        handlers={"kpi_history": kpi_history, "latest_kpi_values": latest_kpi_values},
        dead_letters=DeadLetters(redis, service="database_stand_in"),
    )
    service = build(settings(redis_url, write_kpi_dir(tmp_path), query_timeout_s=1.0))
    await running(service.runtime)
    base = f"http://127.0.0.1:{service.runtime.bound_port}/api/v1/kpis"
    async with aiohttp.ClientSession() as http:
        async with http.get(base) as r:
            items = (await r.json())["items"]
        assert r.status == 200
        assert {i["code"] for i in items} == {k["code"] for k in KPIS}
        assert all(i["status"] == "running" and i["kind"] == "streaming" for i in items)
        # no database service yet: 503
        url = f"{base}/orders_count/history?start=2024-01-01T00:00:00Z&end=2024-01-02T00:00:00Z"
        async with http.get(url) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "upstream_unavailable"
        await database.start()
        try:
            async with http.get(url + "&dimension.region=eu-west") as r:
                body = await r.json()
            assert r.status == 200 and body["items"][0]["value"] == 1.0
            assert body["truncated"] is False
            assert calls[-1]["dimensions"] == {"region": "eu-west"}
            async with http.get(url + "&limit=1") as r:  # the range holds more: say so
                assert r.status == 200 and (await r.json())["truncated"] is True
            assert calls[-1]["kpi_code"] == "orders_count"
            async with http.get(f"{base}/orders_count/history?start=yesterday") as r:
                body = await r.json()
            assert r.status == 422 and body["error"]["details"]
            # out of range: refused here too, not a failure building or answering the request
            n_calls = len(calls)
            for bad in ("&limit=99999999999999999999999", "&limit=0"):
                async with http.get(url + bad) as r:
                    assert r.status == 422, bad
            overflow = "start=0001-01-01T00:00:00%2B14:00&end=2024-01-02T00:00:00Z"
            backwards = "start=2024-01-02T00:00:00Z&end=2024-01-01T00:00:00Z"
            for bad in (overflow, backwards):
                async with http.get(f"{base}/orders_count/history?{bad}") as r:
                    assert r.status == 422, bad
            assert len(calls) == n_calls  # none of these reached the database
            async with http.get(f"{base}/orders_count/latest") as r:
                body = await r.json()
            assert r.status == 200 and body["source"] == "database"
            assert body["items"][0]["value"] == 2.0
        finally:
            await database.stop()
        async with http.get(f"{base}/unknown_kpi/latest") as r:
            assert r.status == 404
        # a responder that never answers: 504
        slow = RequestReplyServer(
            redis,
            channel=channels.DATABASE_QUERY,
            source="slow",
            instance="t",
            handlers={"kpi_history": _never},
            dead_letters=DeadLetters(redis, service="slow"),
        )
        await slow.start()
        try:
            async with http.get(url) as r:
                assert r.status == 504
        finally:
            await slow.stop(grace=0)
        # the in-memory cache answers latest once the engine emitted a result
        await publish(redis, history(500, utcnow(), 0.5))  # stamped now: not late
        await wait_for(lambda: bool(service.cache.latest("orders_count")), 20)
        async with http.get(f"{base}/orders_count/latest") as r:
            body = await r.json()
        assert body["source"] == "engine" and body["items"][0]["kpi_code"] == "orders_count"


async def _never(_: Request) -> dict[str, Any]:
    await asyncio.sleep(30)
    return {}


async def test_a_window_ready_to_close_does_not_wait_for_the_idle_tick(
    redis: Redis, redis_url: str, running: Start, tmp_path: Path
) -> None:
    """An event that closes a window but is held back by the stream merge (its millisecond
    may still get entries on the other stream) is released by an immediate completeness
    check, not at the next idle tick (5 s here): the result is out at once (freshness)."""
    kpi_dir = write_kpi_dir(tmp_path, [kpi("fast_count", "order", "count", tumbling("1s", "0s"))])
    s = settings(redis_url, kpi_dir, advance_interval_s=5, idle_close_grace="1h")
    service = build(s)
    await running(service.runtime)
    processor = service.processor

    def order(event_id: str, at: datetime) -> Event:
        payload = {
            "entity_type": "order",
            "entity_id": event_id,
            "version": 1,
            "occurred_at": at.isoformat(),
            "attributes": {"amount": 1.0},
        }
        return Event(
            event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, event_id)),  # entity events: UUIDs
            event_type=channels.ENTITY_CREATED,
            source="data_simulator",
            timestamp=at,
            payload=payload,
        )

    now = utcnow()
    await publish(redis, [order("e-1", now)])
    await wait_for(lambda: processor.events_processed == 1, timeout=15)  # at an idle tick
    window_end = now.replace(microsecond=0) + timedelta(seconds=1)
    started = time.monotonic()
    await publish(redis, [order("e-2", window_end + timedelta(milliseconds=1))])
    await wait_for(lambda: processor.events_processed == 2, timeout=15)
    elapsed = time.monotonic() - started
    assert elapsed < 2.5, elapsed  # the next idle tick is ~5 s after the first event's
    results = await published_results(redis)
    assert [(r["kpi_code"], r["value"]) for r in results] == [("fast_count", 1.0)]


async def test_a_list_or_object_dimension_is_left_out_and_shows_in_the_metrics(
    redis: Redis, redis_url: str, running: Start, tmp_path: Path
) -> None:
    """Results carry scalar dimensions only: events whose group_by attribute is a list or an
    object are left out of that KPI (never published as a result the database would refuse)
    and counted in `analytics_kpi_event_issues_total{issue="invalid_dimension"}`."""
    by_tag = kpi("count_by_tag", "order", "count", tumbling("1s", "0s"), group_by=["tag"])
    service = build(settings(redis_url, write_kpi_dir(tmp_path, [by_tag])))
    await running(service.runtime)
    start = utcnow().replace(microsecond=0) - timedelta(seconds=5)
    tags: list[Any] = ["a", ["a"], {"k": "a"}, "a"]
    events = [
        Event(
            event_id=str(uuid.uuid4()),
            event_type=channels.ENTITY_CREATED,
            source="data_simulator",
            timestamp=start + timedelta(milliseconds=100 * i),
            payload={
                "entity_type": "order",
                "entity_id": f"o{i}",
                "version": 1,
                "occurred_at": (start + timedelta(milliseconds=100 * i)).isoformat(),
                "attributes": {"tag": tag},
            },
        )
        for i, tag in enumerate(tags)
    ]
    await publish(redis, events)
    results = await settled(redis)
    assert [(r["dimensions"], r["value"], r["sample_count"]) for r in results] == [
        ({"tag": "a"}, 2.0, 2)
    ]
    metrics = f"http://127.0.0.1:{service.runtime.bound_port}/metrics"
    series = 'analytics_kpi_event_issues_total{issue="invalid_dimension",kpi_code="count_by_tag"}'

    async def counted() -> bool:
        async with aiohttp.ClientSession() as http, http.get(metrics) as r:
            return f"{series} 2.0" in await r.text()

    await wait_for(counted, timeout=10)  # exported with the next checkpoint (~1 s)
