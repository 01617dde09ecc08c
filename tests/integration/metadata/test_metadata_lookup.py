"""`metadata.lookup` request types through the real `RequestReplyClient`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from metadata_helpers import MetadataHarness, revenue_kpi

from analytics_engine.core.channels import METADATA_LOOKUP
from analytics_engine.core.errors import RemoteError
from analytics_engine.core.redis import connect
from analytics_engine.core.request_reply import RequestReplyClient

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[RequestReplyClient]:
    redis = connect(redis_url)
    rr = RequestReplyClient(redis, service="data_simulator", instance="lookup-test")
    await rr.start()
    yield rr
    await rr.close()
    await redis.aclose()


async def test_kpi_definitions(metadata: MetadataHarness, client: RequestReplyClient) -> None:
    _, stored, _ = await metadata.call(
        "PUT", "/api/v1/kpi-definitions/orders_revenue", revenue_kpi()
    )
    await metadata.call(
        "PUT",
        "/api/v1/kpi-definitions/orders_count",
        revenue_kpi(code="orders_count", aggregation="count", field=None, enabled=False),
    )

    got = await client.request(METADATA_LOOKUP, "get_kpi_definition", {"code": "orders_revenue"})
    assert got == stored
    assert got["version"] == 1

    listing = await client.request(METADATA_LOOKUP, "list_kpi_definitions", {})
    assert [(i["code"], i["version"], i["enabled"]) for i in listing["items"]] == [
        ("orders_count", 1, False),
        ("orders_revenue", 1, True),
    ]
    listing = await client.request(
        METADATA_LOOKUP, "list_kpi_definitions", {"entity_type": "sensor"}
    )
    assert listing["items"] == []

    with pytest.raises(RemoteError) as missing:
        await client.request(METADATA_LOOKUP, "get_kpi_definition", {"code": "nope"})
    assert missing.value.code == "not_found"
    with pytest.raises(RemoteError) as bad:
        await client.request(METADATA_LOOKUP, "get_kpi_definition", {"code": 42})
    assert bad.value.code == "invalid_request"  # checked against the protocol model first


async def test_entity_definitions(metadata: MetadataHarness, client: RequestReplyClient) -> None:
    order = await client.request(METADATA_LOOKUP, "get_entity_definition", {"entity_type": "order"})
    assert order["entity_type"] == "order"
    assert order["attributes"]["amount"] == "number"
    assert order["version"] == 1

    listing = await client.request(METADATA_LOOKUP, "list_entity_definitions", {})
    assert [i["entity_type"] for i in listing["items"]] == ["order", "sensor"]

    with pytest.raises(RemoteError) as missing:
        await client.request(METADATA_LOOKUP, "get_entity_definition", {"entity_type": "ship"})
    assert missing.value.code == "not_found"
    with pytest.raises(RemoteError) as missing_arg:
        await client.request(METADATA_LOOKUP, "get_entity_definition", {})
    assert missing_arg.value.code == "invalid_request"
