"""A service told to stop while it is still starting stops: SIGTERM/SIGINT while Redis is
unreachable (its consumers cannot join their groups) used to be ignored until Redis came
back, so `kill`, Ctrl-C and `timeout` left the process running."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import pytest

from analytics_engine.core import channels
from analytics_engine.core.bus import Delivery
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.core.settings import BaseServiceSettings


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_stop_while_redis_is_unreachable_at_start() -> None:
    settings = BaseServiceSettings.model_validate(
        {"REDIS_URL": f"redis://127.0.0.1:{unused_port()}/0", "SERVICE_INSTANCE_ID": "t1"}
    )
    rt = ServiceRuntime(service="database_service", settings=settings, port=0, host="127.0.0.1")

    async def handle(batch: Sequence[Delivery]) -> None:
        return None

    rt.consume([channels.ENTITY_CREATED], handle)
    run = asyncio.create_task(rt.run())
    await asyncio.sleep(1.0)  # the consumer is retrying its connection
    assert not run.done() and not rt.ready.is_set()
    rt.stop()
    try:
        await asyncio.wait_for(asyncio.shield(run), timeout=15)
    except TimeoutError:
        run.cancel()
        pytest.fail("the service did not stop while starting")
