"""Fixtures for the hostile-input tests: the whole platform in-process (`platform`), a
`bridge` for hypothesis tests, and the read-only role's DSN (`reader_url`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from hostile_platform import (
    SERVICE_NAMES,
    Bridge,
    Platform,
    ReplyInbox,
    Start,
    create_service,
    runtime_task,
    service_settings,
)
from redis.asyncio import Redis

from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.database.roles import ensure_reader_role


@pytest.fixture
async def reader_url(database_url: str) -> str:
    return await ensure_reader_role(database_url, password="hostile-reader-pw")


@pytest.fixture
async def platform(  # noqa: PLR0917
    redis_url: str,
    database_url: str,
    reader_url: str,
    s3_server: Any,
    s3_bucket: str,
    redis: Redis,
    running: Start,
) -> AsyncIterator[Platform]:
    """Every service, started in dependency order; stopped by `running` after the test."""
    runtimes: dict[str, ServiceRuntime] = {}
    tasks: dict[str, asyncio.Task[None]] = {}
    for name in SERVICE_NAMES:
        urls = {
            f"{upstream}_url": f"http://127.0.0.1:{runtimes[upstream].bound_port}"
            for upstream in ("metadata", "calculation", "simulator", "observability")
            if name == "gateway"
        }
        settings = service_settings(
            name,
            redis_url=redis_url,
            database_url=database_url,
            reader_url=reader_url,
            s3=s3_server,
            bucket=s3_bucket,
            urls=urls,
        )
        before = set(asyncio.all_tasks())
        runtimes[name] = await running(create_service(name, settings))
        tasks[name] = runtime_task(before)
    inbox = ReplyInbox(redis)
    await inbox.start()
    async with aiohttp.ClientSession() as http:
        from analytics_engine.gateway.service import GATEWAY_KEY

        yield Platform(
            runtimes=runtimes,
            tasks=tasks,
            redis=redis,
            http=http,
            database_url=database_url,
            reader_url=reader_url,
            inbox=inbox,
            gateway=runtimes["gateway"].http[GATEWAY_KEY],
        )
    await inbox.stop()


@pytest.fixture
async def bridge() -> Bridge:
    return Bridge(asyncio.get_running_loop())
