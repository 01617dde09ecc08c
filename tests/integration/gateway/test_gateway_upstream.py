"""The gateway's HTTP client to the business services, against a real aiohttp server."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CollectorRegistry

from analytics_engine.gateway.metrics import GatewayMetrics
from analytics_engine.gateway.upstream import Upstream, Upstreams


async def test_waiting_for_a_free_connection_is_not_a_connect_timeout() -> None:
    """With every pooled connection busy, a request waits for one: that wait is bounded by the
    request timeout, not by the connect timeout (which bounds opening a TCP connection), so a
    busy gateway does not answer 504 while the service is healthy."""

    async def slow(_: web.Request) -> web.Response:
        await asyncio.sleep(0.6)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    upstreams = Upstreams(timeout_s=10, connect_timeout_s=0.2, max_connections=1)
    await upstreams.start()
    try:
        upstream = Upstream(
            "calculation",
            f"http://127.0.0.1:{port}",
            upstreams,
            GatewayMetrics(CollectorRegistry()),
        )
        answers = await asyncio.gather(
            *(upstream.call("GET", "/slow", request_id=f"r{i}") for i in range(3))
        )
        assert [a.status for a in answers] == [200, 200, 200]
    finally:
        await upstreams.close()
        await runner.cleanup()
