"""The operator's metadata client over real HTTP: error classification and the PUT contract.

Also the pure status builders it feeds (kept here with the operator's other tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from metadata_standin import FIELD_REQUIRED, INVALID_MESSAGE, MetadataStandIn, free_port

from analytics_engine_operator import status
from analytics_engine_operator.metadata_client import (
    FieldError,
    MetadataClient,
    MetadataInvalid,
    MetadataUnavailable,
)

DEFINITION = {
    "code": "orders_count",
    "entity_type": "order",
    "aggregation": "count",
    "window": {"type": "tumbling", "size": "1m"},
}


@pytest.fixture
async def client(metadata: MetadataStandIn) -> AsyncIterator[MetadataClient]:
    async with MetadataClient(metadata.url, timeout_s=2) as client:
        yield client


async def test_put_is_idempotent_and_versions_changes(client: MetadataClient) -> None:
    created = await client.put_definition("orders_count", DEFINITION)
    assert (created.version, created.created) == (1, True)
    same = await client.put_definition("orders_count", DEFINITION)
    assert (same.version, same.created) == (1, False)
    changed = await client.put_definition("orders_count", {**DEFINITION, "unit": "orders"})
    assert (changed.version, changed.created) == (2, False)
    fetched = await client.get_definition("orders_count")
    assert fetched == {**DEFINITION, "unit": "orders", "version": 2}


async def test_get_and_delete_of_an_absent_definition(client: MetadataClient) -> None:
    assert await client.get_definition("nope") is None
    assert await client.delete_definition("nope") is False
    await client.put_definition("orders_count", DEFINITION)
    assert await client.delete_definition("orders_count") is True


async def test_422_is_invalid_with_the_service_message(client: MetadataClient) -> None:
    with pytest.raises(MetadataInvalid) as caught:
        await client.put_definition("orders_count", {**DEFINITION, "aggregation": "sum"})
    assert caught.value.message == INVALID_MESSAGE
    assert caught.value.details == (FieldError("field", FIELD_REQUIRED),)
    assert caught.value.describe() == f"{INVALID_MESSAGE}: field: {FIELD_REQUIRED}"


async def test_connection_refused_is_unavailable() -> None:
    async with MetadataClient(f"http://127.0.0.1:{free_port()}", timeout_s=2) as client:
        with pytest.raises(MetadataUnavailable, match="unreachable"):
            await client.put_definition("orders_count", DEFINITION)


Handler = Callable[[web.Request], Any]


async def _serve(handler: Handler) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.mark.parametrize(
    ("response", "error", "match"),
    [
        (web.Response(status=503, text="overloaded"), MetadataUnavailable, "HTTP 503: overloaded"),
        (web.Response(status=401, text="who?"), MetadataUnavailable, "HTTP 401"),
        (web.Response(status=400, text="not json"), MetadataInvalid, "HTTP 400: not json"),
        (
            web.json_response(
                {"error": {"code": "validation_error", "message": "bad"}}, status=422
            ),
            MetadataInvalid,
            "^bad$",
        ),
        (
            # The metadata service's answer to a body past METADATA_MAX_BODY_BYTES (a spec the
            # CRD accepts, e.g. large query params): only a smaller spec can help.
            web.json_response(
                {"error": {"code": "payload_too_large", "message": "request body too large"}},
                status=413,
            ),
            MetadataInvalid,
            "^request body too large$",
        ),
    ],
    ids=["5xx", "unexpected-4xx", "400-text", "422-without-details", "413-too-large"],
)
async def test_status_classification(
    response: web.Response, error: type[Exception], match: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return response

    server = await _serve(handler)
    try:
        async with MetadataClient(str(server.make_url("/")), timeout_s=2) as client:
            with pytest.raises(error, match=match):
                await client.put_definition("orders_count", DEFINITION)
    finally:
        await server.close()


async def test_timeout_is_unavailable() -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    server = await _serve(slow)
    try:
        async with MetadataClient(str(server.make_url("/")), timeout_s=0.2) as client:
            with pytest.raises(MetadataUnavailable):
                await client.put_definition("orders_count", DEFINITION)
    finally:
        await server.close()


async def test_version_from_etag_when_the_body_has_none() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"code": "orders_count"}, status=201, headers={"ETag": '"7"'})

    server = await _serve(handler)
    try:
        async with MetadataClient(str(server.make_url("/")), timeout_s=2) as client:
            stored = await client.put_definition("orders_count", DEFINITION)
        assert (stored.version, stored.created) == (7, True)
    finally:
        await server.close()


# --- status builders (pure) ---------------------------------------------------------------

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def test_transition_time_only_changes_when_the_status_flips() -> None:
    synced = status.synced_status(None, version=1, generation=1, now=T0, code="c")
    again = status.synced_status(
        synced, version=2, generation=2, now=T0 + timedelta(hours=1), code="c"
    )
    assert again["conditions"][0]["lastTransitionTime"] == "2024-01-01T00:00:00Z"
    assert again["syncedVersion"] == 2
    failed = status.failed_status(
        again,
        reason=status.Reason.UNAVAILABLE,
        message="down",
        generation=2,
        now=T0 + timedelta(hours=2),
    )
    condition = failed["conditions"][0]
    assert (condition["status"], condition["reason"]) == ("False", "Unavailable")
    assert condition["lastTransitionTime"] == "2024-01-01T02:00:00Z"
    assert "syncedVersion" not in failed  # the last stored version stays as it was
    assert failed["phase"] == "Unavailable"


def test_other_conditions_are_kept() -> None:
    previous = {"conditions": [{"type": "Other", "status": "True"}]}
    patch = status.synced_status(previous, version=1, generation=None, now=T0, code="c")
    assert [c["type"] for c in patch["conditions"]] == ["Other", "Synced"]
    assert "observedGeneration" not in patch


def test_status_changes_and_events_only_on_transitions() -> None:
    synced = status.synced_status(None, version=1, generation=1, now=T0, code="c")
    same = status.synced_status(synced, version=1, generation=1, now=T0, code="c")
    assert status.status_changes(synced, same) == {}
    assert status.event_for(synced, same) is None
    assert status.event_for(None, synced) == (
        "Normal",
        "Synced",
        "KPI c stored in the metadata service as version 1",
    )
    invalid = status.failed_status(
        synced, reason=status.Reason.INVALID, message="bad", generation=2, now=T0
    )
    assert status.event_for(synced, invalid) == ("Warning", "Invalid", "bad")
