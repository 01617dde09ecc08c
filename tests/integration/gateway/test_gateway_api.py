"""The gateway over real HTTP, with the real business services behind it (real Redis and
PostgreSQL): auth, validation pass-through, errors, ETags, simulator, entities, status, OpenAPI,
CORS, request ids, metrics, upstream outages and timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from gateway_stack import ADMIN_KEY, READ_KEY, Stack, StackFactory, kpi_definition

from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher
from analytics_engine.core.redis import connect

pytestmark = pytest.mark.asyncio

DEFS = "/api/v1/kpi-definitions"


def assert_error(reply_body: object, code: str) -> None:
    assert isinstance(reply_body, dict), reply_body
    error = reply_body["error"]
    assert error["code"] == code, reply_body
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], list)


# -- auth ----------------------------------------------------------------------------------------
async def test_auth_no_key_401_read_key_403_on_writes_admin_ok(stack: Stack) -> None:
    reply = await stack.call("GET", DEFS, key=None)
    assert reply.status == 401
    assert_error(reply.body, "unauthorized")
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")

    reply = await stack.call("GET", DEFS, key="not-a-valid-key-at-all")
    assert reply.status == 401

    reply = await stack.call("GET", DEFS, key=READ_KEY)
    assert reply.status == 200
    assert reply.body == {"items": []}

    body = kpi_definition("orders_count")
    reply = await stack.call("PUT", f"{DEFS}/orders_count", key=READ_KEY, json=body)
    assert reply.status == 403
    assert_error(reply.body, "forbidden")
    for method, path in (
        ("DELETE", f"{DEFS}/orders_count"),
        ("POST", "/api/v1/simulator/start"),
        ("POST", "/api/v1/simulator/stop"),
        ("PUT", "/api/v1/simulator/rate"),
    ):
        reply = await stack.call(method, path, key=READ_KEY, json={"rate": 5})
        assert reply.status == 403, (method, path)

    reply = await stack.call("PUT", f"{DEFS}/orders_count", key=ADMIN_KEY, json=body)
    assert reply.status == 201, reply.body
    assert reply.body["version"] == 1
    assert reply.headers["ETag"] == '"1"'

    # X-API-Key works as well as Authorization: Bearer
    reply = await stack.call(
        "GET", f"{DEFS}/orders_count", key=None, headers={"X-API-Key": READ_KEY}
    )
    assert reply.status == 200
    assert reply.body["code"] == "orders_count"

    reply = await stack.call("GET", "/api/v1/me", key=READ_KEY)
    assert reply.status == 200
    assert reply.body["scope"] == "read"
    assert READ_KEY not in str(reply.body)


async def test_a_key_that_is_not_utf8_is_401_not_500(make_stack: StackFactory) -> None:
    """Header bytes that are not UTF-8 (aiohttp hands them on as lone surrogates) in either
    key header: an unknown key, 401, never an 'internal error'."""
    stack = await make_stack(services=())
    port = stack.gateway.runtime.bound_port
    for header in (b"X-API-Key: \xff\xfe", b"Authorization: Bearer \xff\xfe"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /api/v1/me HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
            + header
            + b"0123456789abcdefghij\r\n\r\n"
        )
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        assert b'"code":"unauthorized"' in answer


async def test_open_routes_need_no_key(stack: Stack) -> None:
    for path in (
        "/healthz",
        "/readyz",
        "/api/v1/openapi.json",
        "/api/v1/docs",
        "/",
        "/ui/app.js",
        "/ui/app.css",
    ):
        reply = await stack.call("GET", path, key=None)
        assert reply.status == 200, path
    reply = await stack.call("GET", "/", key=None)
    assert "<title>AnalyticsEngine</title>" in reply.body
    assert "default-src 'self'" in reply.headers["Content-Security-Policy"]
    reply = await stack.call("GET", "/api/v1/docs", key=None)
    assert "/ui/docs.js" in reply.body
    reply = await stack.call("GET", "/metrics", key=None)
    assert reply.status == 200


# -- validation, 404s, ETags ---------------------------------------------------------------------
async def test_validation_errors_are_passed_through_with_field_details(stack: Stack) -> None:
    bad = kpi_definition(
        "orders_bad",
        aggregation="sum",  # needs a field
        window={"type": "tumbling", "size": "1m", "slide": "10s"},
        thresholds={"warning": 10, "critical": 20, "direction": "below"},
    )
    reply = await stack.call("PUT", f"{DEFS}/orders_bad", json=bad)
    assert reply.status == 422
    assert reply.body["error"]["code"] == "validation_error"
    fields = {d["field"] for d in reply.body["error"]["details"]}
    assert {"window.slide", "thresholds.critical"} <= fields, fields
    reply = await stack.call(
        "PUT",
        f"{DEFS}/orders_bad",
        json=kpi_definition("orders_bad", aggregation="sum", filter="amount >"),
    )
    assert reply.status == 422
    fields = {d["field"] for d in reply.body["error"]["details"]}
    assert "filter" in fields, reply.body

    reply = await stack.call(
        "PUT", f"{DEFS}/orders_bad", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert reply.status == 400
    assert_error(reply.body, "bad_request")

    reply = await stack.call("PUT", f"{DEFS}/orders_bad", data=b"")
    assert reply.status == 400

    # a body whose Content-Encoding does not decode is the client's fault: 400, not a 500
    for encoding in ("gzip", "deflate"):
        reply = await stack.call(
            "PUT",
            "/api/v1/simulator/rate",
            data=b"this is not compressed",
            headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        )
        assert reply.status == 400, (encoding, reply.body)
        assert_error(reply.body, "bad_request")
        assert encoding in reply.body["error"]["message"]
    reply = await stack.call(  # ...and one that does is read as usual
        "PUT",
        "/api/v1/simulator/rate",
        data=gzip.compress(b'{"rate": 3}'),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert (reply.status, reply.body["rate"]) == (200, 3)

    reply = await stack.call(
        "PUT", f"{DEFS}/orders_bad", json=kpi_definition("orders_bad", display_name="nul\u0000")
    )
    assert reply.status == 400  # PostgreSQL cannot store NUL: refused at the door, not a 5xx
    # ...but a backslash followed by "u0000" is legitimate text (JSON "\\u0000")
    literal = kpi_definition("orders_literal", description="C:\\u0000 is not NUL")
    reply = await stack.call("PUT", f"{DEFS}/orders_literal", json=literal)
    assert reply.status == 201, reply.body
    assert reply.body["description"] == "C:\\u0000 is not NUL"
    reply = await stack.call("GET", f"{DEFS}?entity_type=a%00b")
    assert reply.status == 400

    reply = await stack.call("PUT", "/api/v1/simulator/rate", json={"rate": -1})
    assert reply.status == 422
    assert reply.body["error"]["details"][0]["field"] == "rate"


async def test_body_size_limit_is_413(make_stack: StackFactory) -> None:
    stack = await make_stack(services=("metadata",), gateway={"max_body_bytes": 2048})
    big = kpi_definition("orders_big", description="x" * 5000)
    reply = await stack.call("PUT", f"{DEFS}/orders_big", json=big)
    assert reply.status == 413
    assert_error(reply.body, "payload_too_large")


async def test_not_found_and_method_not_allowed_are_json(stack: Stack) -> None:
    reply = await stack.call("GET", "/api/v1/nope")
    assert reply.status == 404
    assert_error(reply.body, "not_found")
    for asset in ("/ui/nope.js", "/ui/..%2Fservice.py", "/ui/"):  # not an empty octet-stream
        reply = await stack.call("GET", asset, key=None)
        assert reply.status == 404, asset
        assert_error(reply.body, "not_found")
    reply = await stack.call("GET", "/ui/app.js", key=None)
    assert "javascript" in reply.headers["Content-Type"]
    assert "default-src 'self'" in reply.headers["Content-Security-Policy"]
    reply = await stack.call("GET", f"{DEFS}/absent_kpi")
    assert reply.status == 404
    assert_error(reply.body, "not_found")
    reply = await stack.call("GET", f"{DEFS}/Not-A-Code")
    assert reply.status == 404
    reply = await stack.call("DELETE", f"{DEFS}/absent_kpi")
    assert reply.status == 404
    reply = await stack.call("GET", "/api/v1/entities/order/ord-missing")
    assert reply.status == 404
    assert_error(reply.body, "not_found")
    reply = await stack.call("PATCH", DEFS)
    assert reply.status == 405
    assert_error(reply.body, "method_not_allowed")


async def test_etag_and_if_match(stack: Stack) -> None:
    code = "orders_etag"
    reply = await stack.call("PUT", f"{DEFS}/{code}", json=kpi_definition(code))
    assert reply.status == 201
    etag = reply.headers["ETag"]
    changed = kpi_definition(code, display_name="Changed")
    reply = await stack.call("PUT", f"{DEFS}/{code}", json=changed, headers={"If-Match": '"99"'})
    assert reply.status == 412
    assert_error(reply.body, "precondition_failed")
    reply = await stack.call("PUT", f"{DEFS}/{code}", json=changed, headers={"If-Match": '"²"'})
    assert reply.status == 412  # a Unicode digit is no version (was a 500 upstream, 502 here)
    assert_error(reply.body, "precondition_failed")
    reply = await stack.call("GET", f"{DEFS}/{code}")
    assert reply.headers["Cache-Control"] == "private, no-cache"  # kept only to revalidate
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    reply = await stack.call("GET", f"{DEFS}/{code}", headers={"If-None-Match": etag})
    assert (reply.status, reply.headers["ETag"]) == (304, etag)
    reply = await stack.call("GET", DEFS)
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    reply = await stack.call("PUT", f"{DEFS}/{code}", json=changed, headers={"If-Match": etag})
    assert reply.status == 200
    assert reply.headers["ETag"] == '"2"'
    reply = await stack.call("GET", f"{DEFS}/{code}", headers={"If-None-Match": etag})
    assert (reply.status, reply.body["display_name"]) == (200, "Changed")
    reply = await stack.call("DELETE", f"{DEFS}/{code}", headers={"If-Match": etag})
    assert reply.status == 412
    reply = await stack.call("DELETE", f"{DEFS}/{code}", headers={"If-Match": '"2"'})
    assert reply.status == 204
    reply = await stack.call("GET", f"{DEFS}/{code}")
    assert reply.status == 404


# -- business routes -----------------------------------------------------------------------------
async def test_simulator_controls(stack: Stack) -> None:
    reply = await stack.call("GET", "/api/v1/simulator", key=READ_KEY)
    assert reply.status == 200
    assert reply.body["running"] is False
    reply = await stack.call("PUT", "/api/v1/simulator/rate", json={"rate": 7})
    assert reply.status == 200
    assert reply.body["rate"] == 7
    reply = await stack.call("POST", "/api/v1/simulator/start")
    assert reply.status == 200
    assert reply.body["running"] is True
    reply = await stack.call("POST", "/api/v1/simulator/stop")
    assert reply.status == 200
    assert reply.body["running"] is False


async def test_entity_state_from_the_database(stack: Stack, redis_url: str) -> None:
    redis = connect(redis_url)
    try:
        publisher = EventPublisher(redis, source="data_simulator", stream_maxlen=10_000)
        await publisher.publish(
            channels.ENTITY_CREATED,
            {
                "entity_type": "order",
                "entity_id": "ord-gw-1",
                "version": 1,
                "occurred_at": datetime.now(UTC).isoformat(),
                "attributes": {"amount": 12.5, "region": "eu", "status": "completed"},
            },
        )
    finally:
        await redis.aclose()
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        reply = await stack.call("GET", "/api/v1/entities/order/ord-gw-1", key=READ_KEY)
        if reply.status == 200 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert reply.status == 200, reply.body
    assert reply.body["entity_id"] == "ord-gw-1"
    assert reply.body["attributes"]["amount"] == 12.5


async def test_entities_listed_a_page_at_a_time(stack: Stack, database_url: str) -> None:
    pg = await asyncpg.connect(database_url)
    try:  # o-1..o-7, o-3 and o-6 deactivated; a customer that an order list never shows
        await pg.execute(
            "INSERT INTO entities SELECT t, t || '-' || g, 1, jsonb_build_object('n', g),"
            " g % 3 <> 0, now(), now(), CASE WHEN g % 3 = 0 THEN now() END, NULL,"
            " gen_random_uuid() FROM (VALUES ('o', 7), ('customer', 1)) AS v(t, n),"
            " generate_series(1, n) g"
        )
    finally:
        await pg.close()
    base = "/api/v1/entities/o"
    pages: list[list[str]] = []
    url = f"{base}?limit=3"
    while True:
        reply = await stack.call("GET", url, key=READ_KEY)
        assert reply.status == 200, reply.body
        pages.append([e["entity_id"] for e in reply.body["items"]])
        if reply.body["next_after"] is None:
            break
        url = f"{base}?limit=3&after={reply.body['next_after']}"
    assert pages == [["o-1", "o-2", "o-3"], ["o-4", "o-5", "o-6"], ["o-7"]]
    reply = await stack.call("GET", f"{base}?active=false", key=READ_KEY)
    assert reply.status == 200, reply.body
    assert [(e["entity_id"], e["active"]) for e in reply.body["items"]] == [
        ("o-3", False),
        ("o-6", False),
    ]
    assert reply.body["next_after"] is None
    reply = await stack.call("GET", f"{base}?active=true&after=o-4", key=READ_KEY)
    assert [e["entity_id"] for e in reply.body["items"]] == ["o-5", "o-7"]
    reply = await stack.call("GET", "/api/v1/entities/nothing_here", key=READ_KEY)
    assert (reply.status, reply.body) == (200, {"items": [], "next_after": None})
    for query, field in [
        ("active=yes", "active"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("after=", "after"),
        (f"after={'o' * 201}", "after"),
        ("activ=true", "activ"),  # a typo would list everything
        ("limit=1&limit=2", "limit"),
    ]:
        reply = await stack.call("GET", f"{base}?{query}", key=READ_KEY)
        assert reply.status == 422, (query, reply.body)
        assert_error(reply.body, "validation_error")
        assert [d["field"] for d in reply.body["error"]["details"]] == [field], reply.body
    reply = await stack.call("GET", f"{base}?active=maybe&limit=-1", key=READ_KEY)
    assert [d["field"] for d in reply.body["error"]["details"]] == ["active", "limit"]


async def test_latest_history_and_status_pass_through(stack: Stack) -> None:
    code = "orders_count"
    assert (await stack.call("PUT", f"{DEFS}/{code}", json=kpi_definition(code))).status == 201
    url = (
        f"/api/v1/kpis/{code}/history?start=2024-01-01T00:00:00Z&end=2024-01-02T00:00:00Z"
        "&dimension.region=eu"
    )
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # 404 until the engine has the new definition (metadata.changed)
        reply = await stack.call("GET", url)
        if reply.status != 404 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert reply.status == 200, reply.body
    assert reply.body["items"] == []
    assert reply.body["dimensions"] == {"region": "eu"}
    # The OpenAPI document declares `dimension` as a deepObject: `dimension[region]=eu`.
    reply = await stack.call("GET", url.replace("dimension.region", "dimension%5Bregion%5D"))
    assert reply.status == 200, reply.body
    assert reply.body["dimensions"] == {"region": "eu"}
    reply = await stack.call("GET", f"/api/v1/kpis/{code}/history?start=yesterday")
    assert reply.status == 422
    # a parameter given twice is ambiguous: the gateway checked the first value and passed the
    # last one on (`limit=1&limit=10000` was served 10000 rows); now it says so
    for repeated, field in [
        ("&limit=1&limit=10000", "limit"),
        ("&start=2024-01-01T12:00:00Z", "start"),
        ("&dimension.region=us", "dimension.region"),
        ("&dimension%5Bregion%5D=us", "dimension.region"),  # the other spelling of the same
    ]:
        reply = await stack.call("GET", url + repeated)
        assert reply.status == 422, (repeated, reply.body)
        assert_error(reply.body, "validation_error")
        assert [d["field"] for d in reply.body["error"]["details"]] == [field], reply.body
    # NUL in a parameter's name (a dimension's), not only in its value, is refused at the door:
    # PostgreSQL cannot hold it, so it came back as a 502 from the calculation engine
    for name in ("dimension.a%00b", "dimension%5Ba%00b%5D"):
        reply = await stack.call("GET", url.replace("dimension.region", name))
        assert reply.status == 400, (name, reply.body)
        assert reply.body["error"]["code"] == "bad_request"
    reply = await stack.call("GET", "/api/v1/status", key=READ_KEY)
    assert reply.status == 200
    statuses = {s["service"]: s["status"] for s in reply.body["services"]}
    assert statuses["api_gateway"] == "up"  # its heartbeats reached the observability service
    assert "dead_letters" in reply.body


async def test_history_parameters_out_of_range_are_422_and_unknown_kpis_404(
    stack: Stack,
) -> None:
    base = "/api/v1/kpis/orders_count/history?start=2024-01-01T00:00:00Z&end=2024-01-02T00:00:00Z"
    for query, field in [
        ("&limit=99999999999999999999999", "limit"),  # cannot even be encoded on the bus
        ("&limit=0", "limit"),
        ("&limit=10001", "limit"),
        ("&dimensions.region=eu", "dimensions.region"),  # a typo must not answer every group
    ]:
        reply = await stack.call("GET", base + query)
        assert reply.status == 422, (query, reply.body)
        assert_error(reply.body, "validation_error")
        assert [d["field"] for d in reply.body["error"]["details"]] == [field]
    for query, field in [
        ("start=0001-01-01T00:00:00%2B14:00&end=2024-01-02T00:00:00Z", "start"),  # year 0 in UTC
        ("start=2024-01-02T00:00:00Z&end=2024-01-01T00:00:00Z", "end"),  # end before start
    ]:
        reply = await stack.call("GET", f"/api/v1/kpis/orders_count/history?{query}")
        assert reply.status == 422, (query, reply.body)
        assert [d["field"] for d in reply.body["error"]["details"]] == [field]
        assert reply.body["error"]["code"] == "validation_error"
    # as /latest and the OpenAPI document: a KPI nobody defined is 404, not an empty 200
    reply = await stack.call("GET", base.replace("orders_count", "never_defined"))
    assert reply.status == 404, reply.body
    assert_error(reply.body, "not_found")
    assert (
        "404" in stack.gateway.document["paths"]["/api/v1/kpis/{code}/history"]["get"]["responses"]
    )


# -- cross-cutting -------------------------------------------------------------------------------
async def test_request_ids_are_echoed_or_generated(stack: Stack) -> None:
    reply = await stack.call("GET", DEFS, headers={"X-Request-ID": "req-123.abc"})
    assert reply.headers["X-Request-ID"] == "req-123.abc"
    reply = await stack.call("GET", DEFS)
    generated = reply.headers["X-Request-ID"]
    assert len(generated) == 32
    reply = await stack.call("GET", DEFS, headers={"X-Request-ID": "bad id\twith spaces"})
    assert reply.headers["X-Request-ID"] != "bad id\twith spaces"
    reply = await stack.call("GET", "/api/v1/nope", key=None)  # errors carry it too
    assert len(reply.headers["X-Request-ID"]) == 32


async def test_cors(make_stack: StackFactory) -> None:
    stack = await make_stack(
        services=("metadata",), gateway={"cors_origins": "https://dash.example.com"}
    )
    reply = await stack.call(
        "OPTIONS",
        DEFS,
        key=None,
        headers={
            "Origin": "https://dash.example.com",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert reply.status == 204
    assert reply.headers["Access-Control-Allow-Origin"] == "https://dash.example.com"
    assert "Authorization" in reply.headers["Access-Control-Allow-Headers"]
    reply = await stack.call("GET", DEFS, headers={"Origin": "https://dash.example.com"})
    assert reply.headers["Access-Control-Allow-Origin"] == "https://dash.example.com"
    assert "X-Request-ID" in reply.headers["Access-Control-Expose-Headers"]
    reply = await stack.call(
        "OPTIONS",
        DEFS,
        key=None,
        headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "GET"},
    )
    assert reply.status == 403
    reply = await stack.call("GET", DEFS, headers={"Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in reply.headers


async def test_rate_limit_429_with_retry_after(make_stack: StackFactory) -> None:
    stack = await make_stack(services=("metadata",), gateway={"rate_limit": 0.5, "rate_burst": 3})
    statuses = [(await stack.call("GET", "/api/v1/me", key=READ_KEY)).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    reply = await stack.call("GET", "/api/v1/me", key=READ_KEY)
    assert reply.status == 429
    assert_error(reply.body, "rate_limited")
    assert int(reply.headers["Retry-After"]) >= 1
    # buckets are per key: the admin key is not affected
    assert (await stack.call("GET", "/api/v1/me", key=ADMIN_KEY)).status == 200
    # open routes are never limited
    assert (await stack.call("GET", "/healthz", key=None)).status == 200


async def test_refused_keys_are_rate_limited_per_address(make_stack: StackFactory) -> None:
    """Requests refused for a missing or unknown key count against their address's bucket, so
    keys cannot be tried (nor the log flooded) as fast as the gateway answers; a valid key
    from the same address is not affected."""
    stack = await make_stack(services=(), gateway={"rate_limit": 0.5, "rate_burst": 3})
    guesses = [f"guess-{i:02d}-0123456789abcdef" for i in range(3)]
    statuses = [(await stack.call("GET", "/api/v1/me", key=g)).status for g in guesses]
    assert statuses == [401, 401, 401]
    reply = await stack.call("GET", "/api/v1/me", key="guess-99-0123456789abcdef")
    assert reply.status == 429
    assert_error(reply.body, "rate_limited")
    assert int(reply.headers["Retry-After"]) >= 1
    assert (await stack.call("GET", "/api/v1/me", key=None)).status == 429  # no key: the same
    assert (await stack.call("GET", "/api/v1/me", key=READ_KEY)).status == 200
    metrics = (await stack.call("GET", "/metrics", key=None)).body
    assert 'analytics_gateway_rate_limited_total{key_id="unauthenticated"} 2.0' in metrics


async def test_metrics_count_requests_by_route(stack: Stack) -> None:
    await stack.call("GET", f"{DEFS}/absent_kpi")
    reply = await stack.call("GET", "/metrics", key=None)
    text = reply.body
    assert (
        'analytics_gateway_requests_total{method="GET",'
        'route="/api/v1/kpi-definitions/{code}",status="404"} 1.0'
    ) in text
    assert "analytics_gateway_request_duration_seconds_bucket" in text
    assert "analytics_gateway_sse_clients 0.0" in text
    assert ADMIN_KEY not in text


# -- upstream failures ---------------------------------------------------------------------------
async def test_upstream_down_is_503(stack: Stack) -> None:
    assert (await stack.call("GET", "/api/v1/simulator")).status == 200
    stack.runtimes["simulator"].stop()
    deadline = asyncio.get_running_loop().time() + 40
    while True:
        reply = await stack.call("GET", "/api/v1/simulator")
        if reply.status != 200 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert reply.status == 503
    assert_error(reply.body, "upstream_unavailable")
    assert reply.headers["Retry-After"]

    stack.runtimes["database"].stop()  # entity reads go over the bus: nobody answers
    while True:
        reply = await stack.call("GET", "/api/v1/entities/order/ord-1")
        if reply.status == 503 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert reply.status == 503
    assert_error(reply.body, "upstream_unavailable")


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers (a hung upstream)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_upstream_timeout_is_504(make_stack: StackFactory) -> None:
    async with silent_server() as url:
        stack = await make_stack(
            services=(), gateway={"simulator_url": url, "upstream_timeout_s": 0.5}
        )
        started = asyncio.get_running_loop().time()
        reply = await stack.call("GET", "/api/v1/simulator")
        assert reply.status == 504
        assert_error(reply.body, "upstream_timeout")
        assert asyncio.get_running_loop().time() - started < 3
        reply = await stack.call("GET", "/api/v1/kpis")  # nothing listens there: 503
        assert reply.status == 503


# -- OpenAPI ---------------------------------------------------------------------------------------
async def test_openapi_lists_exactly_the_registered_routes(stack: Stack) -> None:
    from aiohttp import web

    reply = await stack.call("GET", "/api/v1/openapi.json", key=None)
    document = reply.body
    assert document["openapi"].startswith("3.")
    documented = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    registered = set()
    for route in stack.gateway.runtime.http.router.routes():
        resource = route.resource
        if resource is None or isinstance(resource, web.StaticResource):
            continue
        if route.method in ("HEAD", "*") or resource.canonical in ("/", "/ui/{name}"):
            continue  # HEAD mirrors GET; `/` is the UI page, `/ui/{name}` its assets
        registered.add((route.method, resource.canonical))
    assert registered == documented
    for path, item in document["paths"].items():
        for operation in item.values():
            assert operation["responses"], path
            assert "security" in operation, path
    put = document["paths"]["/api/v1/kpi-definitions/{code}"]["put"]
    assert put["x-required-scope"] == "admin"
    assert put["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/KPIDefinition"
    }
    assert "KPIDefinition" in document["components"]["schemas"]
