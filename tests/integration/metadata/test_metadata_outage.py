"""PostgreSQL outages: 503 JSON and `unavailable` replies, never a crash; recovery when the
database is back, including a service that started while it was down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from metadata_helpers import MetadataHarness, revenue_kpi

from analytics_engine.core.channels import METADATA_LOOKUP
from analytics_engine.core.errors import RemoteError
from analytics_engine.core.redis import connect
from analytics_engine.core.request_reply import RequestReplyClient
from analytics_engine.localstack import PostgresServer
from analytics_engine.metadata.service import Settings

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def pg_control(postgres_server: object) -> AsyncIterator[PostgresServer]:
    """The session's private PostgreSQL, restarted after the test whatever happens."""
    if not isinstance(postgres_server, PostgresServer):
        pytest.skip("needs the private PostgreSQL server (not AE_TEST_DATABASE_URL)")
    yield postgres_server
    if not postgres_server.running:
        await asyncio.to_thread(postgres_server.start)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)


async def test_database_outage_and_recovery(
    pg_control: PostgresServer, metadata: MetadataHarness, redis_url: str
) -> None:
    redis = connect(redis_url)
    client = RequestReplyClient(redis, service="calculation_engine", instance="outage-test")
    try:
        status, _, _ = await metadata.call(
            "PUT", "/api/v1/kpi-definitions/orders_revenue", revenue_kpi()
        )
        assert status == 201

        await asyncio.to_thread(pg_control.stop)

        status, error, headers = await metadata.call("GET", "/api/v1/kpi-definitions")
        assert status == 503
        assert error["error"]["code"] == "unavailable"
        assert headers["Retry-After"]
        status, error, _ = await metadata.call(
            "PUT", "/api/v1/kpi-definitions/orders_revenue", revenue_kpi(unit="USD")
        )
        assert status == 503
        with pytest.raises(RemoteError) as failed:
            await client.request(METADATA_LOOKUP, "get_kpi_definition", {"code": "orders_revenue"})
        assert failed.value.code == "unavailable"
        status, ready, _ = await metadata.call("GET", "/readyz")
        assert status == 503
        assert ready["checks"]["database"] is False
        status, _, _ = await metadata.call("GET", "/healthz")
        assert status == 200

        await asyncio.to_thread(pg_control.start)

        async def back() -> bool:
            return (await metadata.call("GET", "/api/v1/kpi-definitions/orders_revenue"))[0] == 200

        await eventually(back)
        got = await client.request(
            METADATA_LOOKUP, "get_kpi_definition", {"code": "orders_revenue"}
        )
        assert got["version"] == 1
        status, _, _ = await metadata.call("GET", "/readyz")
        assert status == 200
    finally:
        await client.close()
        await redis.aclose()


async def test_service_started_while_the_database_is_down(
    pg_control: PostgresServer,
    metadata_settings: Callable[..., Settings],
    start_metadata: Callable[[Settings], Awaitable[MetadataHarness]],
) -> None:
    await asyncio.to_thread(pg_control.stop)
    harness = await start_metadata(metadata_settings())
    assert not harness.service.bootstrapped.is_set()
    status, error, _ = await harness.call("GET", "/api/v1/entity-types")
    assert status == 503
    assert error["error"]["code"] == "unavailable"
    assert (await harness.call("GET", "/readyz"))[0] == 503

    await asyncio.to_thread(pg_control.start)
    await asyncio.wait_for(harness.service.bootstrapped.wait(), 30)
    status, body, _ = await harness.call("GET", "/api/v1/entity-types")
    assert status == 200
    assert [e["entity_type"] for e in body["items"]] == ["order", "sensor"]
    assert (await harness.call("GET", "/readyz"))[0] == 200
