"""Fixtures for the database service against real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher
from analytics_engine.core.envelopes import Event, new_id
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.database.service import Settings, create

Start = Callable[..., Awaitable[ServiceRuntime]]


def make_settings(redis_url: str, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "database_url": database_url,
        "port": 0,
        "instance_id": "db-test",
        "heartbeat_interval_s": 60.0,
        "archival_interval": timedelta(seconds=0),
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def start_service(
    redis_url: str,
    database_url: str,
    running: Callable[[ServiceRuntime], Awaitable[ServiceRuntime]],
) -> Start:
    """Start a database service (settings overridable by field name)."""

    async def start(**overrides: Any) -> ServiceRuntime:
        return await running(create(make_settings(redis_url, database_url, **overrides)))

    return start


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
def publisher(redis: Redis) -> EventPublisher:
    return EventPublisher(redis, source="data_simulator", stream_maxlen=1_000_000)


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0, interval: float = 0.05
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def entity_event(
    publisher: EventPublisher,
    kind: str,
    entity_id: str,
    version: int,
    *,
    entity_type: str = "order",
    occurred_at: datetime | None = None,
    attributes: dict[str, Any] | None = None,
    reason: str | None = None,
) -> Event:
    channel = {
        "created": channels.ENTITY_CREATED,
        "updated": channels.ENTITY_UPDATED,
        "deactivated": channels.ENTITY_DEACTIVATED,
    }[kind]
    payload: dict[str, Any] = {
        "entity_type": entity_type,
        "entity_id": entity_id,
        "version": version,
        "occurred_at": (occurred_at or datetime.now(UTC)).isoformat(),
    }
    if kind == "deactivated":
        if reason is not None:
            payload["reason"] = reason
    else:
        payload["attributes"] = attributes if attributes is not None else {"v": version}
    return publisher.make_event(channel, payload, event_id=new_id())


async def count(pg: asyncpg.Connection, sql: str, *args: Any) -> int:
    return int(await pg.fetchval(sql, *args))
