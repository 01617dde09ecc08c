"""Fixtures: the metadata service running in-process against real PostgreSQL and Redis.

`metadata_settings(**overrides)` builds `Settings` for the per-test database and Redis;
`start_metadata(settings)` starts a runtime and returns a `MetadataHarness` (HTTP client on the
bound port, the composed service); `metadata` is one started with defaults.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from metadata_helpers import MetadataHarness

from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.metadata.service import SERVICE_KEY, Settings, create

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def metadata_settings(redis_url: str, database_url: str) -> SettingsFactory:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "database_url": database_url,
            "port": 0,
            "instance_id": "metadata-test",
            "outbox_poll_interval_s": 0.2,
            "heartbeat_interval_s": 60.0,
        }
        values.update(overrides)
        return Settings(**values)

    return build


@pytest.fixture
async def start_metadata(
    redis_url: str,
    database_url: str,
    running: Callable[[ServiceRuntime], Awaitable[ServiceRuntime]],
) -> AsyncIterator[Callable[[Settings], Awaitable[MetadataHarness]]]:
    """Requests the servers first so they outlive the runtimes (teardown runs in reverse)."""
    sessions: list[aiohttp.ClientSession] = []

    async def start(settings: Settings) -> MetadataHarness:
        runtime = await running(create(settings))
        session = aiohttp.ClientSession()
        sessions.append(session)
        return MetadataHarness(
            runtime=runtime,
            service=runtime.http[SERVICE_KEY],
            http=session,
            base=f"http://127.0.0.1:{runtime.bound_port}",
        )

    yield start
    for session in sessions:
        await session.close()


@pytest.fixture
async def metadata(
    start_metadata: Callable[[Settings], Awaitable[MetadataHarness]],
    metadata_settings: SettingsFactory,
) -> MetadataHarness:
    harness = await start_metadata(metadata_settings())
    assert harness.service.bootstrapped.is_set()
    return harness
