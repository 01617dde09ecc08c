"""The service runtime: health, readiness and metrics endpoints, heartbeats, graceful shutdown,
and surviving a Redis restart without losing durable events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from analytics_engine.core import channels
from analytics_engine.core.bus import Delivery
from analytics_engine.core.envelopes import Request
from analytics_engine.core.redis import connect
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.core.settings import BaseServiceSettings
from analytics_engine.localstack import RedisServer

pytestmark = pytest.mark.asyncio
Start = Callable[[ServiceRuntime], Awaitable[ServiceRuntime]]


def runtime(redis_url: str, name: str = "database_service", **env: Any) -> ServiceRuntime:
    settings = BaseServiceSettings.model_validate(
        {"REDIS_URL": redis_url, "SERVICE_INSTANCE_ID": "t1", "HEARTBEAT_INTERVAL": 0.1, **env}
    )
    return ServiceRuntime(service=name, settings=settings, port=0, host="127.0.0.1")


async def test_health_readiness_and_metrics_endpoints(redis_url: str, running: Start) -> None:
    rt = runtime(redis_url)

    async def handle(batch: Sequence[Delivery]) -> None:
        return None

    rt.consume([channels.ENTITY_CREATED], handle)
    healthy = True

    async def db_check() -> bool:
        return healthy

    rt.add_readiness_check("database", db_check)
    await running(rt)
    await rt.publisher.publish(channels.ENTITY_CREATED, {"x": 1})
    base = f"http://127.0.0.1:{rt.bound_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["checks"] == {
                "started": True,
                "redis": True,
                "database": True,
            }
        healthy = False
        async with http.get(f"{base}/readyz") as resp:
            assert resp.status == 503
        await asyncio.sleep(0.3)
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
    assert 'analytics_bus_messages_published_total{channel="simulation.entity.created"} 1.0' in text
    assert "analytics_bus_messages_consumed_total" in text
    assert "analytics_bus_handler_duration_seconds_bucket" in text


async def test_heartbeats_carry_identity_and_consumer_lag(redis_url: str, running: Start) -> None:
    redis = connect(redis_url)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channels.SERVICE_HEARTBEAT)
    rt = runtime(redis_url)

    async def handle(batch: Sequence[Delivery]) -> None:
        return None

    rt.consume([channels.ENTITY_CREATED], handle)
    await running(rt)
    message = None
    for _ in range(50):
        message = await pubsub.get_message(timeout=0.1)
        if message:
            break
    await pubsub.aclose()
    await redis.aclose()
    assert message is not None
    beat = orjson.loads(message["data"])
    assert beat["event_type"] == channels.SERVICE_HEARTBEAT
    assert beat["payload"]["service"] == "database_service"
    assert beat["payload"]["instance"] == "t1"
    assert beat["payload"]["consumer_lag"] == {channels.ENTITY_CREATED: 0}


async def test_graceful_shutdown_finishes_in_flight_work(redis_url: str) -> None:
    rt = runtime(redis_url)
    finished: list[str] = []
    entered = asyncio.Event()

    async def slow_handler(req: Request) -> Mapping[str, Any]:
        entered.set()
        await asyncio.sleep(0.5)
        finished.append(req.correlation_id)
        return {"done": True}

    rt.respond(channels.DATABASE_QUERY, {"slow": slow_handler})
    task = asyncio.create_task(rt.run())
    await rt.ready.wait()
    caller = runtime(redis_url, name="calculation_engine")
    call = asyncio.create_task(
        caller.requests.request(channels.DATABASE_QUERY, "slow", {}, timeout=5)
    )
    await entered.wait()
    rt.stop()  # as on SIGTERM: stop taking requests, finish the one in hand
    assert (await call) == {"done": True}
    await task
    await caller.requests.close()
    await caller.redis.aclose()
    assert len(finished) == 1


async def test_redis_restart_mid_stream_loses_no_durable_event(
    tmp_path: Path, running: Start
) -> None:
    with RedisServer(tmp_path / "redis", appendfsync="always") as server:
        rt = runtime(server.url)
        got: list[int] = []

        async def handle(batch: Sequence[Delivery]) -> None:
            got.extend(d.event.payload["i"] for d in batch)

        rt.consume([channels.ENTITY_CREATED], handle)
        await running(rt)
        producer = runtime(server.url, name="data_simulator")
        sent = 0

        async def publish(count: int) -> None:
            nonlocal sent
            for _ in range(count):
                while True:
                    try:
                        await producer.publisher.publish(channels.ENTITY_CREATED, {"i": sent})
                        break
                    except Exception:  # the producer retries while Redis is down
                        await asyncio.sleep(0.05)
                sent += 1

        await publish(200)
        server.restart()
        await publish(200)
        for _ in range(300):
            if len(set(got)) == 400:
                break
            await asyncio.sleep(0.05)
        await producer.redis.aclose()
        assert sorted(set(got)) == list(range(400))


async def test_stop_reports_not_ready_at_once_and_drains_http_before_the_hooks(
    redis_url: str,
) -> None:
    """On SIGTERM: /readyz answers 503 while the bus work in hand drains, and an HTTP request
    in flight finishes (with what it uses still open) before the shutdown hooks close it."""
    from aiohttp import web

    rt = runtime(redis_url)
    resource = {"open": True}
    entered = asyncio.Event()
    http_entered = asyncio.Event()

    async def slow_request(req: Request) -> Mapping[str, Any]:
        entered.set()
        await asyncio.sleep(1.0)
        return {"done": True}

    async def slow_page(_: web.Request) -> web.Response:
        http_entered.set()
        await asyncio.sleep(1.0)
        return web.json_response({"resource_open": resource["open"]})

    async def close_resource() -> None:
        resource["open"] = False

    rt.respond(channels.DATABASE_QUERY, {"slow": slow_request})
    rt.http.router.add_get("/slow", slow_page)
    rt.on_shutdown(close_resource)
    task = asyncio.create_task(rt.run())
    await rt.ready.wait()
    base = f"http://127.0.0.1:{rt.bound_port}"
    caller = runtime(redis_url, name="calculation_engine")
    call = asyncio.create_task(
        caller.requests.request(channels.DATABASE_QUERY, "slow", {}, timeout=5)
    )
    async with aiohttp.ClientSession() as http, aiohttp.ClientSession() as probe:
        page = asyncio.create_task(http.get(f"{base}/slow"))
        await entered.wait()
        await http_entered.wait()
        rt.stop()
        await asyncio.sleep(0.1)
        async with probe.get(f"{base}/readyz") as resp:  # the responder is still draining
            assert resp.status == 503
            assert (await resp.json())["status"] == "stopping"
        assert not rt.ready.is_set()
        async with await page as resp:
            assert resp.status == 200
            assert await resp.json() == {"resource_open": True}
    assert (await call) == {"done": True}
    await asyncio.wait_for(task, 10)
    assert resource == {"open": False}
    await caller.requests.close()
    await caller.redis.aclose()


async def test_stop_cancels_http_requests_past_the_grace(redis_url: str) -> None:
    from aiohttp import web

    rt = runtime(redis_url, SERVICE_SHUTDOWN_GRACE=0.3)
    entered = asyncio.Event()

    async def endless(_: web.Request) -> web.Response:
        entered.set()
        await asyncio.sleep(60)
        return web.Response()

    rt.http.router.add_get("/endless", endless)
    task = asyncio.create_task(rt.run())
    await rt.ready.wait()
    async with aiohttp.ClientSession() as http:
        page = asyncio.create_task(http.get(f"http://127.0.0.1:{rt.bound_port}/endless"))
        await entered.wait()
        started = asyncio.get_running_loop().time()
        rt.stop()
        await asyncio.wait_for(task, 10)
        assert asyncio.get_running_loop().time() - started < 5
        with contextlib.suppress(aiohttp.ClientError):
            (await page).close()


async def test_a_stop_during_startup_cancels_the_hook_and_skips_the_shutdown_hooks(
    redis_url: str,
) -> None:
    """A startup hook still waiting (for a database not up yet) is cancelled by a stop, and the
    shutdown hooks, which may rely on a completed startup, do not run."""
    rt = runtime(redis_url)
    waiting = asyncio.Event()
    calls: list[str] = []

    async def wait_for_a_database() -> None:
        waiting.set()
        try:
            await asyncio.Event().wait()  # never up
        except asyncio.CancelledError:
            calls.append("startup cancelled")
            raise

    async def final_checkpoint() -> None:
        calls.append("shutdown hook")

    rt.on_startup(wait_for_a_database)
    rt.on_shutdown(final_checkpoint)
    task = asyncio.create_task(rt.run())
    await asyncio.wait_for(waiting.wait(), 5)
    rt.stop()
    await asyncio.wait_for(task, 5)
    assert calls == ["startup cancelled"]
    assert not rt.ready.is_set()


async def test_shutdown_hooks_run_after_a_complete_startup(redis_url: str) -> None:
    rt = runtime(redis_url)
    calls: list[str] = []

    async def startup() -> None:
        calls.append("startup")

    async def shutdown() -> None:
        calls.append("shutdown")

    rt.on_startup(startup)
    rt.on_shutdown(shutdown)
    task = asyncio.create_task(rt.run())
    await asyncio.wait_for(rt.ready.wait(), 10)
    rt.stop()
    await asyncio.wait_for(task, 10)
    assert calls == ["startup", "shutdown"]


async def test_a_startup_hook_that_fails_still_fails_the_service(redis_url: str) -> None:
    rt = runtime(redis_url)

    async def broken() -> None:
        raise RuntimeError("bad configuration")

    rt.on_startup(broken)
    with pytest.raises(RuntimeError, match="bad configuration"):
        await asyncio.wait_for(rt.run(), 10)
