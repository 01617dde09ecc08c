"""A service told to stop while it is still starting stops: SIGTERM/SIGINT while Redis is
unreachable (its consumers cannot join their groups, its responders, live subscriptions and
reply channel cannot subscribe) used to be ignored until Redis came back, so `kill`, Ctrl-C
and `timeout` left the process running (`analytics-engine run gateway` did, for one)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence

import pytest

from analytics_engine.core import channels
from analytics_engine.core.bus import Delivery
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.core.settings import BaseServiceSettings


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _no_batch(batch: Sequence[Delivery]) -> None:
    return None


WAITS_FOR_REDIS: dict[str, Callable[[ServiceRuntime], object]] = {
    "consumer": lambda rt: rt.consume([channels.ENTITY_CREATED], _no_batch),
    "responder": lambda rt: rt.respond(channels.DATABASE_QUERY, {}),
    "live subscription": lambda rt: rt.listen(lambda channel, data: None, patterns=["kpi.*"]),
    "reply channel": lambda rt: rt.requests,
}


@pytest.mark.parametrize("waits", list(WAITS_FOR_REDIS.values()), ids=list(WAITS_FOR_REDIS))
async def test_stop_while_redis_is_unreachable_at_start(
    waits: Callable[[ServiceRuntime], object],
) -> None:
    settings = BaseServiceSettings.model_validate(
        {"REDIS_URL": f"redis://127.0.0.1:{unused_port()}/0", "SERVICE_INSTANCE_ID": "t1"}
    )
    rt = ServiceRuntime(service="database_service", settings=settings, port=0, host="127.0.0.1")
    waits(rt)
    run = asyncio.create_task(rt.run())
    await asyncio.sleep(1.0)  # still trying to reach Redis
    assert not run.done() and not rt.ready.is_set()
    rt.stop()
    try:
        await asyncio.wait_for(asyncio.shield(run), timeout=15)
    except TimeoutError:
        run.cancel()
        pytest.fail("the service did not stop while starting")
