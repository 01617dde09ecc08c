"""Fixtures: the gateway and real business services in-process (see `gateway_stack`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from gateway_stack import Stack, StackFactory, start_stack

from analytics_engine.core.runtime import ServiceRuntime


@pytest.fixture
async def make_stack(
    redis_url: str,
    database_url: str,
    running: Callable[[ServiceRuntime], Awaitable[ServiceRuntime]],
) -> AsyncIterator[StackFactory]:
    """`await make_stack(services=..., gateway={...})`; requests the servers first so they
    outlive the runtimes (fixture teardown runs in reverse)."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(**kwargs: Any) -> Stack:
        session = aiohttp.ClientSession()
        sessions.append(session)
        return await start_stack(
            running, redis_url=redis_url, database_url=database_url, http=session, **kwargs
        )

    yield make
    for session in sessions:
        await session.close()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    """Gateway + database, metadata, calculation, observability and simulator (stopped)."""
    return await make_stack()
