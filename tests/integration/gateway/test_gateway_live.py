"""Live KPI values over Server-Sent Events, from real `kpi.calculated.*` pub/sub messages:
delivery latency, Last-Event-ID replay, gaps, stream tokens, heartbeats, and the whole pipeline
(simulator -> calculation engine -> gateway)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from gateway_stack import ADMIN_KEY, READ_KEY, Stack, StackFactory, kpi_definition

from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher
from analytics_engine.core.redis import connect

pytestmark = pytest.mark.asyncio


@dataclass
class SseMessage:
    event: str = "message"
    id: str | None = None
    data: str = ""
    comments: list[str] = field(default_factory=list)
    retry: int | None = None

    def json(self) -> Any:
        return orjson.loads(self.data)


async def sse_messages(resp: aiohttp.ClientResponse) -> AsyncIterator[SseMessage]:
    """Parse an event stream (the subset the gateway emits: id, event, data, retry, comments)."""
    current = SseMessage()
    while True:
        raw = await resp.content.readline()
        if not raw:
            return
        line = raw.decode().rstrip("\n")
        if not line:
            yield current
            current = SseMessage()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            current.comments.append(value)
        elif name == "data":
            current.data = f"{current.data}\n{value}" if current.data else value
        elif name == "id":
            current.id = value
        elif name == "event":
            current.event = value
        elif name == "retry":
            current.retry = int(value)


async def next_event(
    stream: AsyncIterator[SseMessage], event: str = "kpi", timeout: float = 5.0
) -> SseMessage:
    async with asyncio.timeout(timeout):
        async for message in stream:
            if message.event == event and message.data:
                return message
    raise AssertionError("stream ended")


def result(code: str, value: float, minute: int, **dims: Any) -> dict[str, Any]:
    start = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=minute)
    return {
        "kpi_code": code,
        "value": value,
        "window_start": start.isoformat(),
        "window_end": (start + timedelta(minutes=1)).isoformat(),
        "dimensions": dims,
        "sample_count": 1,
        "definition_version": 1,
        "computed_at": datetime.now(UTC).isoformat(),
    }


class Results:
    """Publishes KPI results exactly as the calculation engine does."""

    def __init__(self, redis_url: str) -> None:
        self.redis = connect(redis_url)
        self.publisher = EventPublisher(
            self.redis, source="calculation_engine", stream_maxlen=10_000
        )

    async def publish(self, payload: dict[str, Any]) -> None:
        await self.publisher.publish_many(
            [
                (channels.KPI_CALCULATED, payload),
                (channels.kpi_channel(payload["kpi_code"]), payload),
            ]
        )


@pytest.fixture
async def results(redis_url: str) -> AsyncIterator[Results]:
    r = Results(redis_url)
    yield r
    await r.redis.aclose()


async def open_stream(
    stack: Stack, path: str, *, key: str | None = READ_KEY, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    send = dict(headers or {})
    if key is not None:
        send["Authorization"] = f"Bearer {key}"
    resp = await stack.http.get(
        f"{stack.base}{path}", headers=send, timeout=aiohttp.ClientTimeout(total=None, sock_read=30)
    )
    return resp


async def test_stream_delivers_a_result_within_a_second(
    make_stack: StackFactory, results: Results
) -> None:
    stack = await make_stack(services=())
    resp = await open_stream(stack, "/api/v1/kpis/orders_count/stream")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    stream = sse_messages(resp)
    first = await anext(stream)
    assert first.retry == 3000
    await results.publish(result("other_kpi", 1.0, 0))  # filtered out
    sent = time.perf_counter()
    await results.publish(result("orders_count", 42.0, 1, region="eu"))
    message = await next_event(stream)
    latency = time.perf_counter() - sent
    assert latency < 1.0
    body = message.json()
    assert body["kpi_code"] == "orders_count"
    assert body["value"] == 42.0
    assert body["dimensions"] == {"region": "eu"}
    assert message.id is not None and message.id.isdigit()
    gauge = (await stack.call("GET", "/metrics", key=None)).body
    assert "analytics_gateway_sse_clients 1.0" in gauge
    resp.close()


async def test_stream_of_an_undefined_kpi_is_404(
    make_stack: StackFactory, results: Results
) -> None:
    """A typo in a client's URL must not open a stream that stays silent forever: 404 naming
    the code, without using a stream slot. A defined KPI streams as before."""
    stack = await make_stack(services=("metadata",), gateway={"sse_max_per_key": 1})
    reply = await stack.call(
        "PUT", "/api/v1/kpi-definitions/orders_count", json=kpi_definition("orders_count")
    )
    assert reply.status == 201
    for _ in range(2):  # the key's only slot stays free
        refused = await open_stream(stack, "/api/v1/kpis/orders_cuont/stream")
        assert refused.status == 404
        assert refused.content_type == "application/json"
        error = (await refused.json())["error"]
        assert error["code"] == "not_found"
        assert "orders_cuont" in error["message"]
        refused.close()

    await streams_a_value(stack, results, "orders_count", 7.0)


async def test_stream_of_a_kpi_opens_while_metadata_is_down(
    make_stack: StackFactory, results: Results
) -> None:
    """Whether a KPI exists is metadata's to say; live values must not depend on it being up:
    unreachable, the stream opens unchecked and delivers."""
    stack = await make_stack(services=())  # metadata's URL: nothing listens
    await streams_a_value(stack, results, "orders_cuont", 3.0)


async def streams_a_value(stack: Stack, results: Results, code: str, value: float) -> None:
    """`/api/v1/kpis/{code}/stream` opens and delivers a result of `code` published now."""
    resp = await open_stream(stack, f"/api/v1/kpis/{code}/stream")
    assert resp.status == 200
    stream = sse_messages(resp)
    await anext(stream)  # connected
    await results.publish(result(code, value, 0))
    assert (await next_event(stream)).json()["value"] == value
    resp.close()


async def test_last_event_id_replays_what_was_missed(
    make_stack: StackFactory, results: Results
) -> None:
    stack = await make_stack(services=())
    resp = await open_stream(stack, "/api/v1/stream")
    stream = sse_messages(resp)
    await results.publish(result("orders_count", 1.0, 0))
    first = await next_event(stream)
    resp.close()  # the client goes away; results keep coming
    await results.publish(result("orders_count", 2.0, 1))
    await results.publish(result("orders_revenue", 3.0, 1))
    await results.publish(result("orders_count", 4.0, 2))
    await asyncio.sleep(0.3)

    assert first.id is not None
    resp = await open_stream(stack, "/api/v1/stream", headers={"Last-Event-ID": first.id})
    stream = sse_messages(resp)
    replayed = [await next_event(stream) for _ in range(3)]
    assert [m.json()["value"] for m in replayed] == [2.0, 3.0, 4.0]
    ids = [int(m.id or 0) for m in replayed]
    assert ids == sorted(ids) and ids[0] > int(first.id)
    await results.publish(result("orders_count", 5.0, 3))  # and then live again
    assert (await next_event(stream)).json()["value"] == 5.0
    resp.close()

    # the per-KPI stream replays only its KPI; ?last_event_id= works like the header
    resp = await open_stream(stack, f"/api/v1/kpis/orders_revenue/stream?last_event_id={first.id}")
    stream = sse_messages(resp)
    message = await next_event(stream)
    assert message.json()["kpi_code"] == "orders_revenue"
    assert message.json()["value"] == 3.0
    resp.close()


async def test_gap_when_the_buffer_no_longer_holds_the_last_id(
    make_stack: StackFactory, results: Results
) -> None:
    stack = await make_stack(services=(), gateway={"sse_buffer": 10})
    resp = await open_stream(stack, "/api/v1/stream")
    stream = sse_messages(resp)
    await results.publish(result("orders_count", 0.0, 0))
    first = await next_event(stream)
    resp.close()
    for i in range(1, 16):
        await results.publish(result("orders_count", float(i), i))
    await asyncio.sleep(0.3)
    resp = await open_stream(stack, "/api/v1/stream", headers={"Last-Event-ID": first.id or ""})
    stream = sse_messages(resp)
    gap = await next_event(stream, event="gap")
    assert "oldest_id" in gap.json()
    replayed = [await next_event(stream) for _ in range(10)]
    assert [m.json()["value"] for m in replayed] == [float(i) for i in range(6, 16)]
    resp.close()


async def test_last_event_id_beyond_the_counter_resumes_from_now_after_a_gap(
    make_stack: StackFactory, results: Results
) -> None:
    """An id this gateway never issued (another replica's, a clock ahead) must not silence
    the stream until the counter catches up: gap, then live results."""
    stack = await make_stack(services=())
    await results.publish(result("orders_count", 1.0, 0))
    await asyncio.sleep(0.2)
    future = stack.gateway.hub.ring.last_id + 3_600_000_000  # an hour of clock ahead
    resp = await open_stream(stack, "/api/v1/stream", headers={"Last-Event-ID": str(future)})
    stream = sse_messages(resp)
    gap = await next_event(stream, event="gap")
    assert "oldest_id" in gap.json()
    await results.publish(result("orders_count", 2.0, 1))
    message = await next_event(stream)
    assert message.json()["value"] == 2.0  # live, not the replayed 1.0, not silence
    resp.close()
    resp = await open_stream(stack, "/api/v1/stream?last_event_id=%C2%B2")  # "²": not an id
    assert resp.status == 200
    resp.close()


async def test_stream_token_heartbeat_and_auth(make_stack: StackFactory, results: Results) -> None:
    stack = await make_stack(services=(), gateway={"sse_heartbeat_s": 0.2})
    resp = await open_stream(stack, "/api/v1/stream", key=None)
    assert resp.status == 401
    resp.close()

    reply = await stack.call("POST", "/api/v1/sse-token", key=READ_KEY)
    assert reply.status == 201
    token = reply.body["token"]
    assert reply.body["expires_in"] == 300
    assert READ_KEY not in token and ADMIN_KEY not in token

    resp = await open_stream(stack, f"/api/v1/stream?token={token}", key=None)
    assert resp.status == 200
    stream = sse_messages(resp)
    async with asyncio.timeout(3):
        async for message in stream:
            if "ping" in message.comments:
                break
    await results.publish(result("orders_count", 9.0, 0))
    assert (await next_event(stream)).json()["value"] == 9.0
    resp.close()

    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    resp = await open_stream(stack, f"/api/v1/stream?token={tampered}", key=None)
    assert resp.status == 401
    resp.close()
    # a stream token opens streams only, never the rest of the API
    reply = await stack.call("GET", f"/api/v1/me?token={token}", key=None)
    assert reply.status == 401


async def test_pipeline_simulator_to_dashboard_stream(stack: Stack) -> None:
    """The real path: a KPI created through the gateway, events from the simulator, windows
    closed by the calculation engine, values on the gateway's stream."""
    code = "orders_per_second"
    definition = kpi_definition(
        code, window={"type": "tumbling", "size": "1s", "allowed_lateness": "0s"}
    )
    reply = await stack.call("PUT", f"/api/v1/kpi-definitions/{code}", json=definition)
    assert reply.status == 201
    resp = await open_stream(stack, f"/api/v1/kpis/{code}/stream")
    stream = sse_messages(resp)
    assert (await stack.call("PUT", "/api/v1/simulator/rate", json={"rate": 200})).status == 200
    assert (await stack.call("POST", "/api/v1/simulator/start")).status == 200
    message = await next_event(stream, timeout=20)
    body = message.json()
    assert body["kpi_code"] == code
    assert body["value"] >= 1
    received = datetime.now(UTC)
    window_end = datetime.fromisoformat(body["window_end"])
    assert received - window_end < timedelta(seconds=5)
    await stack.call("POST", "/api/v1/simulator/stop")
    resp.close()
    latest = await stack.call("GET", f"/api/v1/kpis/{code}/latest")
    assert latest.status == 200
    assert latest.body["items"]


async def test_open_streams_are_capped_per_key_and_in_total(make_stack: StackFactory) -> None:
    """One key (or a token of it) cannot hold an unbounded number of streams open: past its
    share it gets 429 with a clear error, past the gateway's total everyone gets 503."""
    stack = await make_stack(
        services=(),
        gateway={"sse_max_per_key": 2, "sse_max_clients": 3, "sse_heartbeat_s": 0.2},
    )
    held = [await open_stream(stack, "/api/v1/stream", key=READ_KEY) for _ in range(2)]
    assert [r.status for r in held] == [200, 200]
    refused = await open_stream(stack, "/api/v1/kpis/orders_count/stream", key=READ_KEY)
    assert refused.status == 429
    body = await refused.json()
    assert body["error"]["code"] == "too_many_streams"
    assert "Retry-After" in refused.headers
    refused.close()
    # a stream token counts against the key that issued it
    token = (await stack.call("POST", "/api/v1/sse-token", key=READ_KEY)).body["token"]
    refused = await open_stream(stack, f"/api/v1/stream?token={token}", key=None)
    assert refused.status == 429
    refused.close()
    held.append(await open_stream(stack, "/api/v1/stream", key=ADMIN_KEY))
    assert held[-1].status == 200
    full = await open_stream(stack, "/api/v1/stream", key=ADMIN_KEY)
    assert full.status == 503
    assert (await full.json())["error"]["code"] == "too_many_streams"
    full.close()
    # a closed stream frees its slot (the gateway notices at its next write, a heartbeat)
    held.pop(0).close()
    async with asyncio.timeout(5):
        while True:
            again = await open_stream(stack, "/api/v1/stream", key=READ_KEY)
            if again.status == 200:
                break
            again.close()
            await asyncio.sleep(0.05)
    held.append(again)
    for resp in held:
        resp.close()


async def stalled_stream(stack: Stack) -> socket.socket:
    """A raw connection that opens `/api/v1/stream` and never reads, with the gateway's
    writes to it blocked: ~13 MB of results sent, more than the socket buffers hold."""
    port = stack.gateway.runtime.bound_port
    assert port is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, never read
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    request = (
        f"GET /api/v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {READ_KEY}\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    async with asyncio.timeout(5):
        while True:
            if stack.gateway.hub.clients:
                break
            await asyncio.sleep(0.01)
    big = orjson.dumps(result("orders_count", 1.0, 0, padding="x" * 64_000))
    for _ in range(200):
        stack.gateway.hub.publish("orders_count", big)
        await asyncio.sleep(0)
    return sock


async def test_a_client_that_stops_reading_frees_its_stream_slot(make_stack: StackFactory) -> None:
    """A client that opens a stream and never reads (a hung browser tab, a slow-loris) fills
    the socket buffers until the gateway's writes block. It must still be cut off and its
    slot freed, not hold a connection and a slot for good."""
    stack = await make_stack(
        services=(),
        gateway={"sse_max_per_key": 1, "sse_heartbeat_s": 0.5, "sse_client_queue": 10},
    )
    sock = await stalled_stream(stack)
    try:
        assert stack.gateway.hub.clients == 0  # the hub gave up on the client...
        # ...and the stream ends, so the key can open another one
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            again = await open_stream(stack, "/api/v1/stream", key=READ_KEY)
            if again.status == 200 or asyncio.get_running_loop().time() > deadline:
                break
            again.close()
            await asyncio.sleep(0.1)
        assert again.status == 200, "the stalled stream still holds the key's only slot"
        again.close()
    finally:
        sock.close()


async def test_a_client_gone_while_a_write_waits_is_no_server_error(
    make_stack: StackFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that disconnects while the gateway waits to write to it (its buffers full)
    is a client going away like any other: no 'unhandled error' with a traceback, no 500."""
    stack = await make_stack(services=(), gateway={"sse_heartbeat_s": 30.0})
    sock = await stalled_stream(stack)
    assert stack.gateway.hub.clients == 1  # still connected, its handler waiting to write
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset
    async with asyncio.timeout(5):  # the request ends: counted with its status
        while True:
            metrics = (await stack.call("GET", "/metrics", key=None)).body
            if 'route="/api/v1/stream",status=' in metrics:
                break
            await asyncio.sleep(0.05)
    assert 'route="/api/v1/stream",status="500"' not in metrics
    assert 'route="/api/v1/stream",status="200"' in metrics
    assert not [r for r in caplog.records if r.getMessage() == "unhandled error"]
