"""The gateway while Redis is down: an entity read (the one read made on the bus) answers 503
at once instead of waiting out the request timeout for a 504."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from gateway_stack import start_stack

from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.localstack import RedisServer

pytestmark = pytest.mark.asyncio


async def test_entity_read_with_redis_down_is_an_immediate_503(
    tmp_path: Path, running: Callable[[ServiceRuntime], Awaitable[ServiceRuntime]]
) -> None:
    with RedisServer(tmp_path / "redis") as server:
        async with aiohttp.ClientSession() as http:
            stack = await start_stack(
                running,
                redis_url=server.url,
                services=(),
                gateway={"upstream_timeout_s": 10.0},
                http=http,
            )
            reply = await stack.call("GET", "/api/v1/entities/order/ord-1")
            assert reply.status == 503  # Redis up, no database service: no responder
            server.stop()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while stack.gateway.live.subscribed.is_set():  # noticed the closed connection
                assert loop.time() < deadline
                await asyncio.sleep(0.05)
            started = loop.time()
            reply = await stack.call("GET", "/api/v1/entities/order/ord-1")
            assert reply.status == 503, reply.body
            assert reply.body["error"]["code"] == "upstream_unavailable"
            assert "Redis" in reply.body["error"]["message"]
            assert loop.time() - started < 2  # not the 10 s request timeout
            reply = await stack.call("GET", "/readyz", key=None)
            assert reply.status == 503
            server.start()
