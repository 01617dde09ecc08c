"""Fixtures shared by integration tests: a Redis client, and in-process service runtimes.

Servers (`redis_url`, `database_url`, `s3_server`, ...) come from the top-level conftest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from analytics_engine.core.redis import connect
from analytics_engine.core.runtime import ServiceRuntime


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def running() -> AsyncIterator[Callable[[ServiceRuntime], Awaitable[ServiceRuntime]]]:
    """Start runtimes in the background; stop them all after the test."""
    started: list[tuple[ServiceRuntime, asyncio.Task[None]]] = []

    async def start(runtime: ServiceRuntime) -> ServiceRuntime:
        task = asyncio.create_task(runtime.run())
        started.append((runtime, task))
        ready = asyncio.create_task(runtime.ready.wait())
        done, _ = await asyncio.wait([ready, task], timeout=10, return_when="FIRST_COMPLETED")
        if task in done:
            task.result()
        assert ready in done, "runtime did not become ready"
        return runtime

    yield start
    for runtime, _ in started:
        runtime.stop()
    for _, task in started:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
