"""Request/reply against a real Redis: matching, timeouts, error replies, replicas, hand-made
requests, malformed input."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from analytics_engine.core import channels
from analytics_engine.core.bus import DeadLetters
from analytics_engine.core.envelopes import Request
from analytics_engine.core.errors import HandlerError, NoResponder, RemoteError, RequestTimeout
from analytics_engine.core.logs import correlation_id_var
from analytics_engine.core.request_reply import RequestReplyClient, RequestReplyServer

pytestmark = pytest.mark.asyncio
CHANNEL = channels.DATABASE_QUERY


class Responders:
    """Runs responder replicas that record every request they execute."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.executed: list[tuple[str, str]] = []
        self.servers: list[RequestReplyServer] = []

    async def start(self, replicas: int = 1, *, delay: float = 0.0, concurrency: int = 64) -> None:
        for n in range(replicas):
            instance = f"replica-{n}"

            async def echo(req: Request, instance: str = instance) -> Mapping[str, Any]:
                self.executed.append((req.correlation_id, instance))
                await asyncio.sleep(delay or float(req.payload.get("sleep", 0)))
                return {"echo": req.payload.get("value"), "by": instance}

            async def fail(req: Request) -> Mapping[str, Any]:
                raise HandlerError("only SELECT statements are allowed", code="read_only")

            async def crash(req: Request) -> Mapping[str, Any]:
                raise RuntimeError("boom")

            server = RequestReplyServer(
                self.redis,
                channel=CHANNEL,
                source="database_service",
                instance=instance,
                handlers={"echo": echo, "fail": fail, "crash": crash},
                dead_letters=DeadLetters(self.redis, service="database_service"),
                concurrency=concurrency,
            )
            await server.start()
            self.servers.append(server)

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()


@pytest.fixture
async def responders(redis: Redis) -> AsyncIterator[Responders]:
    r = Responders(redis)
    yield r
    await r.stop()


@pytest.fixture
async def client(redis: Redis) -> AsyncIterator[RequestReplyClient]:
    c = RequestReplyClient(redis, service="calculation_engine", instance="test-1")
    await c.start()
    yield c
    await c.close()


async def test_happy_path(responders: Responders, client: RequestReplyClient) -> None:
    await responders.start()
    reply = await client.request(CHANNEL, "echo", {"value": 42})
    assert reply == {"echo": 42, "by": "replica-0"}


async def test_error_reply_raises_a_typed_error(
    responders: Responders, client: RequestReplyClient
) -> None:
    await responders.start()
    with pytest.raises(RemoteError) as err:
        await client.request(CHANNEL, "fail", {})
    assert err.value.code == "read_only"
    assert "only SELECT" in str(err.value)
    with pytest.raises(RemoteError) as err:
        await client.request(CHANNEL, "crash", {})
    assert err.value.code == "internal"
    with pytest.raises(RemoteError) as err:
        await client.request(CHANNEL, "no_such_type", {})
    assert err.value.code == "unknown_request_type"
    assert "echo" in str(err.value)


async def test_every_request_of_one_handler_is_executed(
    responders: Responders, client: RequestReplyClient
) -> None:
    """A consumer's handler runs with the event's id as the log correlation id: each of its
    requests still gets a correlation id of its own (responders claim requests by it), joined to
    the event's id in the logs."""
    await responders.start()
    token = correlation_id_var.set("event-" + "e" * 194)  # as long as an event id may be
    try:
        replies = [await client.request(CHANNEL, "echo", {"value": n}, timeout=2) for n in range(3)]
    finally:
        correlation_id_var.reset(token)
    assert [r["echo"] for r in replies] == [0, 1, 2]
    cids = [cid for cid, _ in responders.executed]
    assert len(set(cids)) == 3
    assert all(cid.startswith("event-eee") for cid in cids)


async def test_no_responder_fails_fast(client: RequestReplyClient) -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(NoResponder):
        await client.request("metadata.lookup", "list_kpi_definitions", {}, timeout=5)
    assert asyncio.get_running_loop().time() - started < 1


async def test_timeout_and_the_request_is_not_executed_afterwards(
    responders: Responders, client: RequestReplyClient
) -> None:
    await responders.start()
    gate = asyncio.Semaphore(0)
    # occupy the responder's handler with a slow request, then time out a second one whose
    # deadline passes before it is executed
    slow = asyncio.create_task(client.request(CHANNEL, "echo", {"sleep": 0.5}, timeout=5))
    await asyncio.sleep(0.05)
    responders.servers[0]._limit = gate  # no free slot: the next request waits
    with pytest.raises(RequestTimeout):
        await client.request(CHANNEL, "echo", {"value": "late"}, timeout=0.2)
    for _ in range(5):
        gate.release()
    await slow
    await asyncio.sleep(0.3)
    assert all(cid for cid, _ in responders.executed)
    assert len(responders.executed) == 1, "the timed-out request must not run"


async def test_cancelled_call_is_not_executed(
    responders: Responders, client: RequestReplyClient, redis: Redis
) -> None:
    await responders.start()
    responders.servers[0]._limit = asyncio.Semaphore(0)
    call = asyncio.create_task(client.request(CHANNEL, "echo", {}, correlation_id="cid-cancel"))
    await asyncio.sleep(0.1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    claim = await redis.get(channels.request_claim_key("cid-cancel"))
    assert claim == b"abandoned"  # the caller took the claim: no responder will run it
    assert responders.executed == []


async def test_200_concurrent_requests_reach_the_right_callers(
    responders: Responders, client: RequestReplyClient
) -> None:
    await responders.start(replicas=2, delay=0.01)
    replies = await asyncio.gather(
        *(client.request(CHANNEL, "echo", {"value": i}) for i in range(200))
    )
    assert [r["echo"] for r in replies] == list(range(200))


async def test_three_replicas_execute_each_request_exactly_once(
    responders: Responders, client: RequestReplyClient
) -> None:
    # 10 slots each: no replica can take all 150 (a replica claims only with a free slot)
    await responders.start(replicas=3, delay=0.002, concurrency=10)
    await asyncio.gather(*(client.request(CHANNEL, "echo", {"value": i}) for i in range(150)))
    await asyncio.sleep(0.2)
    per_request = Counter(cid for cid, _ in responders.executed)
    assert len(per_request) == 150
    assert set(per_request.values()) == {1}
    assert len({instance for _, instance in responders.executed}) == 3


async def test_a_request_published_by_hand_is_answered_on_its_reply_to(
    responders: Responders, redis: Redis
) -> None:
    await responders.start()
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("reply.cli.manual")
    cid = str(uuid.uuid4())
    envelope = {
        "correlation_id": cid,
        "reply_to": "reply.cli.manual",
        "request_type": "echo",
        "source": "redis-cli",
        "timestamp": "2024-01-01T00:00:00Z",
        "payload": {"value": "hi"},
    }
    assert await redis.publish(CHANNEL, orjson.dumps(envelope)) == 1
    message = None
    for _ in range(50):
        message = await pubsub.get_message(timeout=0.1)
        if message:
            break
    await pubsub.aclose()
    assert message is not None
    reply = orjson.loads(message["data"])
    assert reply["correlation_id"] == cid
    assert reply["source"] == "database_service"
    assert reply["payload"] == {"echo": "hi", "by": "replica-0"}
    assert "error" not in reply and "timestamp" in reply


async def test_malformed_requests_get_error_replies_and_dead_letters(
    responders: Responders, client: RequestReplyClient, redis: Redis
) -> None:
    await responders.start(replicas=2)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe("reply.cli.bad")
    await redis.publish(CHANNEL, b"{broken json")
    await redis.publish(
        CHANNEL, orjson.dumps({"correlation_id": "c-1", "reply_to": "reply.cli.bad"})
    )
    await redis.publish(  # reply_to that is not a reply channel: never published to
        CHANNEL,
        orjson.dumps(
            {
                "correlation_id": "c-2",
                "reply_to": channels.ENTITY_CREATED,
                "request_type": "echo",
                "source": "x",
                "payload": {},
            }
        ),
    )
    message = None
    for _ in range(50):
        message = await pubsub.get_message(timeout=0.1)
        if message:
            break
    await pubsub.aclose()
    assert message is not None
    reply = orjson.loads(message["data"])
    assert reply["correlation_id"] == "c-1"
    assert reply["error_code"] == "invalid_request"
    assert "request_type" in reply["error"]
    await asyncio.sleep(0.2)
    dlq = await redis.xrange(channels.dead_letter_key(CHANNEL))
    assert len(dlq) == 3  # once each, although two replicas received them
    # and the service keeps serving
    assert (await client.request(CHANNEL, "echo", {"value": 1}))["echo"] == 1
