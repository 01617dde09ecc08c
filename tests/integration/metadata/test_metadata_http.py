"""The metadata HTTP API over real HTTP (bound port), real PostgreSQL and Redis."""

from __future__ import annotations

import gzip
from typing import Any

import asyncpg
import orjson
import pytest
from metadata_helpers import MetadataHarness, revenue_kpi

pytestmark = pytest.mark.asyncio

KPIS = "/api/v1/kpi-definitions"
ENTITIES = "/api/v1/entity-types"
GZIP = {"Content-Encoding": "gzip"}


async def test_builtin_entity_types_are_seeded(metadata: MetadataHarness) -> None:
    status, body, _ = await metadata.call("GET", ENTITIES)
    assert status == 200
    by_name = {item["entity_type"]: item for item in body["items"]}
    assert set(by_name) == {"order", "sensor"}
    assert by_name["order"]["attributes"] == {
        "amount": "number",
        "currency": "string",
        "region": "string",
        "status": "string",
        "customer_id": "string",
        "items": "integer",
    }
    assert by_name["sensor"]["attributes"]["temperature"] == "number"
    assert by_name["order"]["version"] == 1
    status, body, headers = await metadata.call("GET", f"{ENTITIES}/sensor")
    assert status == 200
    assert headers["ETag"] == '"1"'
    assert body["entity_type"] == "sensor"


async def test_create_read_list_and_idempotent_put(metadata: MetadataHarness) -> None:
    status, body, headers = await metadata.call("PUT", f"{KPIS}/orders_revenue", revenue_kpi())
    assert status == 201
    assert body["version"] == 1
    assert headers["ETag"] == '"1"'
    assert body["window"] == {
        "type": "tumbling",
        "size": "1m",
        "slide": None,
        "allowed_lateness": "10s",
    }

    status, got, headers = await metadata.call("GET", f"{KPIS}/orders_revenue")
    assert status == 200
    assert got == body
    assert headers["ETag"] == '"1"'

    # Same definition, spelled differently (1m vs 60s, defaults explicit): no new version.
    same = revenue_kpi(
        window={"type": "tumbling", "size": "1m", "allowed_lateness": 10},
        enabled=True,
        description="",
    )
    status, again, headers = await metadata.call("PUT", f"{KPIS}/orders_revenue", same)
    assert status == 200
    assert again["version"] == 1
    assert headers["ETag"] == '"1"'

    status, changed, headers = await metadata.call(
        "PUT", f"{KPIS}/orders_revenue", revenue_kpi(display_name="Revenue (EUR)")
    )
    assert status == 200
    assert changed["version"] == 2
    assert headers["ETag"] == '"2"'

    status, listing, _ = await metadata.call("GET", KPIS)
    assert status == 200
    assert [(i["code"], i["version"]) for i in listing["items"]] == [("orders_revenue", 2)]
    status, listing, _ = await metadata.call("GET", f"{KPIS}?entity_type=sensor")
    assert listing["items"] == []

    status, history, _ = await metadata.call("GET", f"{KPIS}/orders_revenue/history")
    assert status == 200
    assert [(h["version"], h["action"]) for h in history["items"]] == [
        (1, "created"),
        (2, "updated"),
    ]
    assert history["items"][0]["spec"]["display_name"] == "Revenue"
    assert history["items"][1]["spec"]["display_name"] == "Revenue (EUR)"


async def test_put_fills_in_the_code_and_rejects_a_different_one(
    metadata: MetadataHarness,
) -> None:
    body = revenue_kpi()
    del body["code"]
    status, stored, _ = await metadata.call("PUT", f"{KPIS}/revenue_two", body)
    assert status == 201
    assert stored["code"] == "revenue_two"

    status, error, _ = await metadata.call("PUT", f"{KPIS}/revenue_three", revenue_kpi())
    assert status == 422
    assert error["error"]["code"] == "validation_error"
    assert [d["field"] for d in error["error"]["details"]] == ["code"]


async def test_version_from_a_get_is_accepted_back(metadata: MetadataHarness) -> None:
    _, stored, _ = await metadata.call("PUT", f"{KPIS}/orders_revenue", revenue_kpi())
    status, again, _ = await metadata.call("PUT", f"{KPIS}/orders_revenue", stored)
    assert status == 200
    assert again["version"] == 1


async def test_a_read_with_the_current_etag_is_304(metadata: MetadataHarness) -> None:
    await metadata.call("PUT", f"{KPIS}/orders_revenue", revenue_kpi())
    status, body, headers = await metadata.call(
        "GET", f"{KPIS}/orders_revenue", headers={"If-None-Match": '"1"'}
    )
    assert (status, body, headers["ETag"]) == (304, None, '"1"')
    await metadata.call("PUT", f"{KPIS}/orders_revenue", revenue_kpi(unit="USD"))  # v2
    status, body, headers = await metadata.call(
        "GET", f"{KPIS}/orders_revenue", headers={"If-None-Match": '"1"'}
    )
    assert (status, body["unit"], headers["ETag"]) == (200, "USD", '"2"')


async def test_if_match_optimistic_concurrency(metadata: MetadataHarness) -> None:
    await metadata.call("PUT", f"{KPIS}/orders_revenue", revenue_kpi())
    await metadata.call("PUT", f"{KPIS}/orders_revenue", revenue_kpi(unit="USD"))  # v2

    status, error, headers = await metadata.call(
        "PUT", f"{KPIS}/orders_revenue", revenue_kpi(unit="GBP"), headers={"If-Match": '"1"'}
    )
    assert status == 412
    assert error["error"]["code"] == "precondition_failed"
    assert headers["ETag"] == '"2"'
    _, current, _ = await metadata.call("GET", f"{KPIS}/orders_revenue")
    assert current["unit"] == "USD"

    status, body, headers = await metadata.call(
        "PUT", f"{KPIS}/orders_revenue", revenue_kpi(unit="GBP"), headers={"If-Match": '"2"'}
    )
    assert status == 200
    assert body["version"] == 3

    status, _, _ = await metadata.call(
        "PUT", f"{KPIS}/orders_revenue", revenue_kpi(), headers={"If-None-Match": "*"}
    )
    assert status == 412
    status, _, _ = await metadata.call(
        "PUT", f"{KPIS}/brand_new", revenue_kpi(code="brand_new"), headers={"If-Match": "*"}
    )
    assert status == 412
    status, error, _ = await metadata.call("POST", KPIS, revenue_kpi())
    assert status == 409
    assert error["error"]["code"] == "conflict"

    status, _, _ = await metadata.call(
        "DELETE", f"{KPIS}/orders_revenue", headers={"If-Match": '"2"'}
    )
    assert status == 412
    status, _, _ = await metadata.call(
        "DELETE", f"{KPIS}/orders_revenue", headers={"If-Match": '"3"'}
    )
    assert status == 204


async def test_post_creates(metadata: MetadataHarness) -> None:
    status, body, headers = await metadata.call("POST", KPIS, revenue_kpi(code="posted"))
    assert status == 201
    assert body["code"] == "posted"
    assert headers["ETag"] == '"1"'


INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    ("sum over a string", revenue_kpi(field="region"), "field", "numeric"),
    (
        "sum without a field",
        {k: v for k, v in revenue_kpi().items() if k != "field"},
        "field",
        "required",
    ),
    ("bad CEL filter", revenue_kpi(filter="status == 'completed' &&"), "filter", "syntax"),
    ("unknown attribute in filter", revenue_kpi(filter="colour == 'red'"), "filter", "colour"),
    ("ill-typed filter", revenue_kpi(filter="amount == 'ten'"), "filter", ""),
    (
        "slide on tumbling",
        revenue_kpi(window={"type": "tumbling", "size": "60s", "slide": "10s"}),
        "window.slide",
        "sliding",
    ),
    (
        "window too small",
        revenue_kpi(window={"type": "tumbling", "size": "0s"}),
        "window.size",
        "at least",
    ),
    ("unknown group_by", revenue_kpi(group_by=["country"]), "group_by.0", "country"),
    ("unknown entity type", revenue_kpi(entity_type="invoice"), "entity_type", "invoice"),
    ("bad code", revenue_kpi(code="Bad-Code"), "code", ""),
    (
        "write SQL in query KPI",
        {
            "code": "orders_revenue",
            "display_name": "Q",
            "entity_type": "order",
            "query": {"sql": "DELETE FROM kpi_results", "schedule": "60s"},
        },
        "query.sql",
        "",
    ),
    (
        "more params than placeholders",
        {
            "code": "orders_revenue",
            "display_name": "Q",
            "entity_type": "order",
            "query": {"sql": "select $1::int", "params": [7, 8], "schedule": "60s"},
        },
        "query.params",
        "1 placeholder(s) ($1..$1) but 2 params are given",
    ),
]


@pytest.mark.parametrize(("case", "body", "field", "words"), INVALID, ids=[c[0] for c in INVALID])
async def test_validation_errors_are_field_level(
    metadata: MetadataHarness, case: str, body: dict[str, Any], field: str, words: str
) -> None:
    code = body.get("code", "orders_revenue")
    status, error, _ = await metadata.call("PUT", f"{KPIS}/{code}", body)
    assert status == 422, (case, error)
    assert error["error"]["code"] == "validation_error"
    assert error["error"]["message"]
    details = error["error"]["details"]
    assert field in [d["field"] for d in details], details
    message = next(d["message"] for d in details if d["field"] == field)
    assert words.lower() in message.lower(), message
    status, _, _ = await metadata.call("GET", f"{KPIS}/{code}")
    assert status == 404


async def test_valid_query_kpi_is_accepted(metadata: MetadataHarness) -> None:
    body = {
        "code": "open_orders",
        "display_name": "Open orders",
        "entity_type": "order",
        "query": {
            "sql": "SELECT count(*) FROM entities WHERE kind = $1",
            "params": ["order"],
            "schedule": "30s",
        },
    }
    status, stored, _ = await metadata.call("PUT", f"{KPIS}/open_orders", body)
    assert status == 201, stored
    assert stored["query"]["schedule"] == "30s"
    assert stored["query"]["bind_window"] is False
    assert stored["query"]["delay"] == "0s"
    status, error, _ = await metadata.call(
        "PUT", f"{KPIS}/open_orders", {**body, "query": {**body["query"], "delay": "30s"}}
    )
    assert status == 422, error
    assert [d["field"] for d in error["error"]["details"]] == ["query.delay"]


async def test_query_kpi_with_bind_window(metadata: MetadataHarness) -> None:
    """`bind_window` adds the slot's start and end as the last two placeholders: the SQL must use
    them with the flag, and is refused without it (nothing would bind $2, $3)."""
    query = {
        "sql": "SELECT count(*) FROM entity_events"
        " WHERE entity_type = $1 AND occurred_at >= $2 AND occurred_at < $3",
        "params": ["order"],
        "schedule": "1m",
    }
    body = {"code": "orders_per_minute", "display_name": "Orders", "entity_type": "order"}
    status, error, _ = await metadata.call(
        "PUT", f"{KPIS}/orders_per_minute", {**body, "query": query}
    )
    assert status == 422, error
    details = error["error"]["details"]
    assert [d["field"] for d in details] == ["query.params"]
    assert "3 placeholder(s)" in details[0]["message"]
    status, stored, _ = await metadata.call(
        "PUT", f"{KPIS}/orders_per_minute", {**body, "query": {**query, "bind_window": True}}
    )
    assert status == 201, stored
    assert stored["query"]["bind_window"] is True
    status, fetched, _ = await metadata.call("GET", f"{KPIS}/orders_per_minute")
    assert status == 200 and fetched["query"]["bind_window"] is True


async def test_a_spec_stored_before_a_field_was_added_is_unchanged_by_the_same_put(
    metadata: MetadataHarness,
) -> None:
    """A query KPI stored by a release without `bind_window` lacks the field; re-asserting the
    same definition (as the operator does on every resync) makes no new version."""
    body = {
        "code": "open_orders",
        "display_name": "Open orders",
        "entity_type": "order",
        "query": {"sql": "SELECT count(*) FROM entities", "schedule": "30s"},
    }
    status, stored, _ = await metadata.call("PUT", f"{KPIS}/open_orders", body)
    assert status == 201, stored
    conn = await asyncpg.connect(str(metadata.runtime.settings.database_url))  # type: ignore[attr-defined]
    try:  # as the earlier release stored it
        await conn.execute(
            "UPDATE kpi_definitions SET spec = spec #- '{query,bind_window}' WHERE code = $1",
            "open_orders",
        )
    finally:
        await conn.close()
    for _ in range(2):  # the fast path, then the locked path (the version in If-Match)
        status, again, _ = await metadata.call("PUT", f"{KPIS}/open_orders", body)
        assert status == 200, again
        assert again["version"] == stored["version"]
        body = {**body, "version": stored["version"]}


async def test_malformed_and_oversized_bodies(metadata: MetadataHarness) -> None:
    status, error, _ = await metadata.call("PUT", f"{KPIS}/x", data=b'{"code": ')
    assert status == 400
    assert error["error"]["code"] == "bad_request"
    status, error, _ = await metadata.call("PUT", f"{KPIS}/x", data=b"[1, 2]")
    assert status == 422
    assert error["error"]["details"][0]["field"] == ""
    big = revenue_kpi(description="x" * 300_000)
    status, error, _ = await metadata.call("PUT", f"{KPIS}/orders_revenue", big)
    assert status == 413
    assert error["error"]["code"] == "payload_too_large"
    status, error, _ = await metadata.call("GET", "/api/v1/nothing-here")
    assert status == 404
    assert error["error"]["code"] == "not_found"


async def test_a_body_that_does_not_decompress_is_a_client_error(
    metadata: MetadataHarness,
) -> None:
    """aiohttp inflates `Content-Encoding: gzip`/`deflate` bodies itself; one that is not what
    it says failed inside `request.read()` with RequestPayloadError, which was answered 500."""
    body = orjson.dumps(revenue_kpi())
    status, _, _ = await metadata.call(
        "PUT", f"{KPIS}/orders_revenue", data=gzip.compress(body), headers=GZIP
    )
    assert status == 201  # a well-formed compressed body is fine
    for encoding in ("gzip", "deflate"):
        status, error, _ = await metadata.call(
            "PUT",
            f"{KPIS}/orders_revenue",
            data=b"not compressed",
            headers={"Content-Encoding": encoding},
        )
        assert status == 400, error
        assert error["error"]["code"] == "bad_request"
        assert encoding in error["error"]["message"]


async def test_delete_then_404_and_recreate_continues_versions(
    metadata: MetadataHarness,
) -> None:
    await metadata.call("PUT", f"{KPIS}/orders_revenue", revenue_kpi())
    await metadata.call("PUT", f"{KPIS}/orders_revenue", revenue_kpi(unit="USD"))
    status, body, _ = await metadata.call("DELETE", f"{KPIS}/orders_revenue")
    assert status == 204
    assert body is None
    status, error, _ = await metadata.call("GET", f"{KPIS}/orders_revenue")
    assert status == 404
    assert error["error"]["code"] == "not_found"
    status, _, _ = await metadata.call("DELETE", f"{KPIS}/orders_revenue")
    assert status == 404
    _, listing, _ = await metadata.call("GET", KPIS)
    assert listing["items"] == []

    status, body, _ = await metadata.call("PUT", f"{KPIS}/orders_revenue", revenue_kpi())
    assert status == 201
    assert body["version"] == 4  # 1 created, 2 updated, 3 deleted, 4 created again
    _, history, _ = await metadata.call("GET", f"{KPIS}/orders_revenue/history")
    assert [h["action"] for h in history["items"]] == ["created", "updated", "deleted", "created"]
    status, _, _ = await metadata.call("GET", f"{KPIS}/never_existed/history")
    assert status == 404


async def test_entity_type_crud_and_referential_checks(metadata: MetadataHarness) -> None:
    payment = {"description": "A payment", "attributes": {"amount": "number", "method": "string"}}
    status, body, headers = await metadata.call("PUT", f"{ENTITIES}/payment", payment)
    assert status == 201
    assert body == {**payment, "entity_type": "payment", "version": 1}
    assert headers["ETag"] == '"1"'
    status, body, _ = await metadata.call("PUT", f"{ENTITIES}/payment", payment)
    assert (status, body["version"]) == (200, 1)

    status, error, _ = await metadata.call(
        "PUT", f"{ENTITIES}/payment", {"attributes": {"amount": "money"}}
    )
    assert status == 422
    assert error["error"]["details"][0]["field"].startswith("attributes")

    kpi = revenue_kpi(
        code="payments_total", entity_type="payment", filter="method == 'card'", group_by=[]
    )
    status, _, _ = await metadata.call("PUT", f"{KPIS}/payments_total", kpi)
    assert status == 201

    # Changing the type of an attribute a KPI sums is refused, and so is deleting the type.
    status, error, _ = await metadata.call(
        "PUT", f"{ENTITIES}/payment", {"attributes": {"amount": "string", "method": "string"}}
    )
    assert status == 409
    assert error["error"]["code"] == "conflict"
    assert error["error"]["details"][0]["field"] == "kpi:payments_total.field"
    status, error, _ = await metadata.call("DELETE", f"{ENTITIES}/payment")
    assert status == 409
    assert "payments_total" in error["error"]["message"]

    # Adding an attribute is fine.
    status, body, _ = await metadata.call(
        "PUT",
        f"{ENTITIES}/payment",
        {"attributes": {"amount": "number", "method": "string", "fee": "number"}},
        headers={"If-Match": '"1"'},
    )
    assert (status, body["version"]) == (200, 2)

    assert (await metadata.call("DELETE", f"{KPIS}/payments_total"))[0] == 204
    assert (await metadata.call("DELETE", f"{ENTITIES}/payment"))[0] == 204
    assert (await metadata.call("GET", f"{ENTITIES}/payment"))[0] == 404
    _, history, _ = await metadata.call("GET", f"{ENTITIES}/payment/history")
    assert [h["action"] for h in history["items"]] == ["created", "updated", "deleted"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"{KPIS}/orders%00revenue", None),
        ("GET", f"{KPIS}/orders%00revenue/history", None),
        ("DELETE", f"{KPIS}/orders%00revenue", None),
        ("GET", f"{KPIS}?entity_type=order%00", None),
        ("GET", f"{ENTITIES}/order%00", None),
        ("PUT", f"{KPIS}/orders_revenue", revenue_kpi(description="a\u0000b")),
        ("PUT", f"{ENTITIES}/shipment", {"attributes": {"weight": "number"}, "x\u0000": 1}),
        ("POST", KPIS, revenue_kpi(display_name="\u0000")),
    ],
)
async def test_nul_characters_are_a_client_error(
    metadata: MetadataHarness, method: str, path: str, body: Any
) -> None:
    """PostgreSQL text and jsonb cannot hold NUL. The operator calls this API directly (no
    gateway in front), so the service itself answers 400, never 500."""
    status, error, _ = await metadata.call(method, path, body)
    assert status == 400, error
    assert error["error"]["code"] == "bad_request"
    assert "NUL" in error["error"]["message"]
