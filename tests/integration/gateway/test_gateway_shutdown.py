"""Stopping the gateway (SIGTERM) while requests are in flight: proxied requests finish with
the upstream session still open, and SSE streams end so the drain does not wait for them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from gateway_stack import READ_KEY, StackFactory

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def slow_upstream() -> AsyncIterator[str]:
    """A calculation service that answers `GET /api/v1/kpis` after 1.5 s."""

    async def kpis(_: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        return web.json_response({"items": []})

    app = web.Application()
    app.router.add_get("/api/v1/kpis", kpis)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_stop_mid_request_still_answers_the_proxied_request(
    make_stack: StackFactory, slow_upstream: str
) -> None:
    stack = await make_stack(services=(), gateway={"calculation_url": slow_upstream})
    runtime = stack.gateway.runtime
    stream = await stack.http.get(
        f"{stack.base}/api/v1/stream",
        headers={"Authorization": f"Bearer {READ_KEY}"},
        timeout=aiohttp.ClientTimeout(total=None, sock_read=30),
    )
    assert stream.status == 200
    call = asyncio.create_task(stack.call("GET", "/api/v1/kpis"))
    await asyncio.sleep(0.3)  # the request is at the upstream
    started = asyncio.get_running_loop().time()
    runtime.stop()
    reply = await call
    assert reply.status == 200, reply.body
    assert reply.body == {"items": []}
    async with asyncio.timeout(5):  # the open stream ended, it did not hold up the stop
        while await stream.content.readline():
            pass
    stream.close()
    assert stack.gateway.hub.clients == 0
    assert asyncio.get_running_loop().time() - started < 5
