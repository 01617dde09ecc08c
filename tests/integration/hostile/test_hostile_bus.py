"""Property-based fuzzing of every bus channel and request type against the whole platform.

Hypothesis generates hostile messages (garbage bytes, wrong types, missing fields, unicode edge
cases, deep nesting, huge strings, forged ids) and each example is sent to the real services,
running in-process on real Redis, PostgreSQL and S3. Per example:

- no service crashes: every runtime task still runs and its `/healthz` answers;
- a bad event (one the core's envelope parser or the channel's payload model rejects) on a
  durable channel lands in `ae:dlq:{channel}` with a reason, found by its stream entry id;
  other events are acknowledged by every consumer group (nothing stays stuck);
- a bad request gets an error reply on its `reply_to` when that is usable, and malformed
  envelopes land in the request channel's dead-letter stream;
- good traffic keeps flowing: valid entity events published between hostile ones are stored
  in PostgreSQL, valid requests are answered.

Hypothesis runs in a worker thread and drives coroutines on the test's loop (`Bridge`), so
failures shrink against the live services. Bounded: `EXAMPLES` per channel and request type.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from hostile_platform import Bridge, Platform
from hostile_strategies import (
    LIVE_KPI_CHANNEL,
    NASTY_STRINGS,
    deep,
    encode,
    event_model,
    hostile_text,
    hostile_value,
    model_rejects,
    mutated_payload,
    request_model,
    valid_event_payload,
    valid_request_payload,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher, LiveSubscription
from analytics_engine.core.channels import (
    channel_spec,
    dead_letter_key,
    request_claim_key,
    stream_key,
)
from analytics_engine.core.envelopes import MalformedMessage, parse_event, parse_request
from analytics_engine.core.payloads import EVENT_PAYLOADS, REQUEST_PAYLOADS
from analytics_engine.core.request_reply import RequestReplyClient, hash_bytes

EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "20"))
DEADLINE = timedelta(seconds=20)
SETTLE_TIMEOUT = 12.0

DURABLE_CHANNELS = sorted(c for c in EVENT_PAYLOADS if "{" not in c and channel_spec(c).durable)
LIVE_CHANNELS = (LIVE_KPI_CHANNEL, channels.SERVICE_HEARTBEAT)
REQUEST_TYPES = sorted(REQUEST_PAYLOADS)
# Payloads their consumers once skipped or patched instead of dead-lettering them.
GAP_EXAMPLES = {
    channels.METADATA_CHANGED: {"kind": "kpi_definition", "code": "orders_count", "version": 1},
    channels.ARCHIVE_KPI_RESULTS: {
        "kpi_code": "hostile_kpi",
        "value": 1.0,
        "window_start": "2024-06-01T12:00:00+00:00",
        "window_end": "2024-06-01T12:01:00+00:00",
        "dimensions": {"region": {"nested": ["not", "a", "scalar"]}},
        "sample_count": 1,
        "definition_version": 1,
    },
}
OTHER_REPLY_CHANNELS = (
    "reply.database_service.database-hostile",
    "reply.api_gateway.gateway-hostile",
    "reply.calculation_engine.calculation-hostile",
)

HYPOTHESIS = settings(
    max_examples=EXAMPLES,
    deadline=DEADLINE,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


def fresh(value: Any) -> Any:
    """Placeholders `<id>` in generated messages become fresh UUIDs (so retries stay unique)."""
    if value == "<id>":
        return str(uuid.uuid4())
    if isinstance(value, dict):
        return {k: fresh(v) for k, v in value.items()}
    return value


# -- strategies ------------------------------------------------------------------------------
GARBAGE = st.one_of(
    st.binary(max_size=200),
    st.sampled_from(
        [
            b"",
            b"{",
            b"null",
            b"[]",
            b'"just a string"',
            b"12345678901234567890123456789",
            b"{}",
            b"\xff\xfe\x00",
            b'{"payload": NaN}',
            deep(5000).encode(),
            b'{"event_id": "\\ud800"}',
        ]
    ),
    hostile_text(200).map(lambda s: s.encode("utf-8", errors="surrogatepass")),
)


def envelope(channel: str, payload: Any) -> dict[str, Any]:
    return {
        "event_id": "<id>",
        "event_type": channel,
        "source": "hostile_fuzzer",
        "timestamp": "2024-06-01T12:00:00+00:00",
        "payload": payload,
    }


@st.composite
def hostile_event(draw: st.DrawFn, channel: str, base: dict[str, Any]) -> bytes:
    kind = draw(st.sampled_from(["garbage", "envelope", "payload", "payload", "deep"]))
    if kind == "garbage":
        return draw(GARBAGE)
    if kind == "deep":
        eid = str(uuid.uuid4())
        depth = draw(st.sampled_from([200, 1100, 5000]))
        return (
            f'{{"event_id":"{eid}","event_type":"{channel}","source":"x",'
            f'"timestamp":"2024-06-01T12:00:00Z","payload":{{"attributes":{deep(depth)}}}}}'
        ).encode()
    if kind == "envelope":
        env = envelope(channel, base)
        env = draw(mutated_payload(env, EVENT_PAYLOADS[channels.ENTITY_CREATED]))
        for name in draw(st.lists(st.sampled_from(sorted(env) or ["x"]), max_size=2)):
            env[name] = draw(hostile_value())
        value: Any = fresh(env)
    else:
        value = fresh(envelope(channel, draw(mutated_payload(base, event_model(channel)))))
    return encode(value, ascii_only=draw(st.booleans()))


# -- bus probes ------------------------------------------------------------------------------
def _id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def send_event(platform: Platform, channel: str, raw: bytes) -> bytes | None:
    """Append to the channel's stream (durable) and PUBLISH, as the bus does; the entry id."""
    entry_id = None
    pipe = platform.redis.pipeline(transaction=True)
    if channel_spec(channel).durable:
        pipe.xadd(stream_key(channel), {b"m": raw}, maxlen=100_000, approximate=True)
    pipe.publish(channel, raw)
    replies = await pipe.execute()
    if channel_spec(channel).durable:
        entry_id = replies[0]
    return entry_id


async def all_groups_acked(platform: Platform, channel: str, entry_id: bytes) -> bool:
    key = stream_key(channel)
    groups = await platform.redis.xinfo_groups(key)
    if not groups:
        return False
    for group in groups:
        if _id_tuple(group["last-delivered-id"]) < _id_tuple(entry_id):
            return False
        pending = await platform.redis.xpending_range(
            key, group["name"], min=entry_id, max=entry_id, count=1
        )
        if pending:
            return False
    return True


async def dead_letters_of(
    platform: Platform, channel: str, match: Callable[[dict[bytes, bytes]], bool]
) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await platform.dead_letters(channel) if match(fields)]


async def settle_event(
    platform: Platform, channel: str, entry_id: bytes
) -> list[dict[bytes, bytes]]:
    """Wait until the entry is dead-lettered or acknowledged by every group; its dead letters."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        dead = await dead_letters_of(platform, channel, lambda f: f.get(b"stream_id") == entry_id)
        if dead:
            return dead
        if await all_groups_acked(platform, channel, entry_id):
            # acknowledged: a dead letter written in the same MULTI is visible already
            return await dead_letters_of(
                platform, channel, lambda f: f.get(b"stream_id") == entry_id
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{channel} entry {entry_id!r} neither handled nor dead-lettered")
        await asyncio.sleep(0.02)


def is_bad_event(channel: str, raw: bytes) -> str | None:
    """Why the protocol rejects this event, or None when it is valid."""
    try:
        event = parse_event(raw)
    except MalformedMessage as exc:
        return f"envelope: {exc}"
    if model_rejects(event_model(channel), event.payload):
        return "payload"
    return None


class GoodTraffic:
    """Valid events and requests sent between hostile ones; checked at the end."""

    def __init__(self, platform: Platform, client: RequestReplyClient) -> None:
        self.platform = platform
        self.client = client
        self.publisher = EventPublisher(
            platform.redis, source="data_simulator", stream_maxlen=1_000_000
        )
        self.entity_ids: list[str] = []
        self.requests = 0

    async def one_round(self) -> None:
        payload = valid_event_payload(channels.ENTITY_CREATED)
        await self.publisher.publish(channels.ENTITY_CREATED, payload)
        self.entity_ids.append(payload["entity_id"])
        answer = await self.client.request(
            channels.METADATA_LOOKUP, "get_entity_definition", {"entity_type": "order"}, timeout=10
        )
        assert answer.get("entity_type") == "order", answer
        answer = await self.client.request(
            channels.DATABASE_QUERY, "execute_query", {"sql": "SELECT 41 + 1 AS x"}, timeout=10
        )
        assert answer["rows"] == [[42]], answer
        self.requests += 2

    async def all_stored(self) -> None:
        conn = await asyncpg.connect(self.platform.database_url)
        try:
            deadline = time.monotonic() + 20
            while True:
                stored = await conn.fetchval(
                    "SELECT count(*) FROM entities WHERE entity_id = ANY($1::text[])",
                    self.entity_ids,
                )
                if stored == len(self.entity_ids):
                    return
                assert time.monotonic() < deadline, (
                    f"only {stored} of {len(self.entity_ids)} valid entity events stored"
                )
                await asyncio.sleep(0.1)
        finally:
            await conn.close()


@pytest.fixture
async def probe_client(platform: Platform) -> Any:
    client = RequestReplyClient(platform.redis, service="cli", instance="p1", default_timeout=10)
    yield client
    await client.close()


def check_dead_letter(fields: dict[bytes, bytes], channel: str, kind: str) -> None:
    assert fields[b"channel"].decode() == channel
    assert fields[b"kind"].decode() == kind
    assert fields[b"reason"].strip(), fields
    assert fields[b"service"], fields
    assert fields[b"failed_at"], fields
    assert b"original" in fields


# -- tests -----------------------------------------------------------------------------------
async def test_hostile_events_on_every_durable_channel(
    platform: Platform, bridge: Bridge, probe_client: RequestReplyClient
) -> None:
    """Every durable event channel: bad events are dead-lettered, nothing crashes, nothing is
    stuck, and valid traffic published in between is stored."""
    started = time.monotonic()
    good = GoodTraffic(platform, probe_client)
    for channel in DURABLE_CHANNELS:
        assert await platform.redis.xinfo_groups(stream_key(channel)), f"nobody reads {channel}"
    stats: dict[str, dict[str, int]] = {}
    before = {c: len(await platform.dead_letters(c)) for c in DURABLE_CHANNELS}

    def fuzz(channel: str) -> None:
        base = valid_event_payload(channel)
        counts = stats.setdefault(channel, {"examples": 0, "bad": 0})

        @HYPOTHESIS
        @given(raw=hostile_event(channel, base))
        def check(raw: bytes) -> None:
            counts["examples"] += 1
            why = is_bad_event(channel, raw)
            entry_id = bridge.run(send_event(platform, channel, raw))
            assert entry_id is not None
            dead = bridge.run(settle_event(platform, channel, entry_id))
            if why is not None:
                counts["bad"] += 1
                assert dead, f"bad event ({why}) on {channel} was not dead-lettered: {raw[:300]!r}"
                for fields in dead:
                    check_dead_letter(fields, channel, "event")
            bridge.run(good.one_round())
            bridge.run(platform.assert_alive())

        check()

    for channel in DURABLE_CHANNELS:
        await asyncio.to_thread(fuzz, channel)
    await good.all_stored()
    await platform.assert_alive()
    after = {c: len(await platform.dead_letters(c)) for c in DURABLE_CHANNELS}
    for channel in DURABLE_CHANNELS:
        assert after[channel] - before[channel] >= stats[channel]["bad"], channel
    total = sum(s["examples"] for s in stats.values())
    print(
        f"\nevent fuzz: {total} hostile events on {len(stats)} channels "
        f"({sum(s['bad'] for s in stats.values())} bad), {len(good.entity_ids)} valid events "
        f"stored, {good.requests} valid requests answered, {time.monotonic() - started:.1f}s"
    )


@pytest.mark.parametrize(
    "channel",
    [pytest.param(c, id=c) for c in sorted(GAP_EXAMPLES)],
)
async def test_invalid_payload_is_dead_lettered(platform: Platform, channel: str) -> None:
    """An event whose payload its model rejects is dead-lettered, not acknowledged silently
    (these consumers once skipped or patched such payloads)."""
    payload = GAP_EXAMPLES[channel]
    assert model_rejects(event_model(channel), payload)
    raw = orjson.dumps(fresh(envelope(channel, payload)))
    entry_id = await send_event(platform, channel, raw)
    assert entry_id is not None
    dead = await settle_event(platform, channel, entry_id)
    await platform.assert_alive()
    assert dead, f"{channel}: invalid payload acknowledged without a dead letter"


async def test_hostile_messages_on_live_channels(platform: Platform, bridge: Bridge) -> None:
    """Pub/sub-only channels (no stream, so no dead letters): the observability service and
    the gateway's SSE hub survive anything, and still take valid messages afterwards."""
    hub = platform.gateway.hub
    examples = 0

    def fuzz(channel: str) -> None:
        base = valid_event_payload(channel)

        @HYPOTHESIS
        @given(raw=hostile_event(channel, base))
        def check(raw: bytes) -> None:
            nonlocal examples
            examples += 1
            bridge.run(send_event(platform, channel, raw))

        check()

    for channel in LIVE_CHANNELS:
        await asyncio.to_thread(fuzz, channel)
    await asyncio.sleep(0.2)
    await platform.assert_alive()
    # valid messages still get through to both readers
    received = hub.received
    beat = valid_event_payload(channels.SERVICE_HEARTBEAT)
    await send_event(
        platform,
        channels.SERVICE_HEARTBEAT,
        orjson.dumps(fresh(envelope(channels.SERVICE_HEARTBEAT, beat))),
    )
    await send_event(
        platform,
        LIVE_KPI_CHANNEL,
        orjson.dumps(fresh(envelope(LIVE_KPI_CHANNEL, valid_event_payload(LIVE_KPI_CHANNEL)))),
    )
    deadline = time.monotonic() + 10
    while True:
        async with platform.http.get(f"{platform.url('observability')}/api/v1/status") as resp:
            assert resp.status == 200
            status = await resp.json()
        instances = [
            i["instance"]
            for s in status["services"]
            if s["service"] == "hostile_probe"
            for i in s.get("instances", [])
        ]
        if beat["instance"] in instances and hub.received > received:
            break
        assert time.monotonic() < deadline, (status["services"], hub.received, received)
        await asyncio.sleep(0.05)
    print(f"\nlive fuzz: {examples} hostile messages on {len(LIVE_CHANNELS)} channels")


# -- requests --------------------------------------------------------------------------------
EVENT_CHANNEL_NAMES = sorted(c for c in EVENT_PAYLOADS if "{" not in c)
REPLY_TARGETS = st.one_of(
    st.just("reply.hostile.<reply>"),
    st.just("reply.hostile.<reply>"),
    st.just("<missing>"),
    st.sampled_from(EVENT_CHANNEL_NAMES),
    st.sampled_from(OTHER_REPLY_CHANNELS),
    st.sampled_from(["reply.", "REPLY.hostile.x", " reply.hostile.x", "database.query"]),
    hostile_value(),
)
CORRELATION_IDS = st.one_of(
    st.just("<id>"),
    st.just("<id>"),
    st.sampled_from(NASTY_STRINGS),
    st.sampled_from(["<missing>", "x" * 201]),
    hostile_value(),
)


@st.composite
def hostile_request(
    draw: st.DrawFn, channel: str, request_type: str, base: dict[str, Any]
) -> dict[str, Any] | bytes:
    kind = draw(st.sampled_from(["garbage", "envelope", "payload", "payload", "unknown_type"]))
    if kind == "garbage":
        return draw(GARBAGE)
    body: dict[str, Any] = {
        "correlation_id": "<id>",
        "reply_to": "reply.hostile.<reply>",
        "request_type": request_type,
        "source": "hostile_fuzzer",
        "timestamp": "2024-06-01T12:00:00+00:00",
        "payload": base,
    }
    if kind == "payload":
        body["payload"] = draw(mutated_payload(base, request_model(channel, request_type)))
    elif kind == "unknown_type":
        body["request_type"] = draw(hostile_text(40))
    else:
        for name in draw(st.lists(st.sampled_from(sorted(body)), min_size=1, max_size=3)):
            body[name] = draw(hostile_value())
    body["reply_to"] = draw(REPLY_TARGETS) if draw(st.booleans()) else body["reply_to"]
    body["correlation_id"] = draw(CORRELATION_IDS) if draw(st.booleans()) else "<id>"
    for name in ("reply_to", "correlation_id"):
        if body[name] == "<missing>":
            del body[name]
    return body


def materialise(message: dict[str, Any] | bytes, *, ascii_only: bool) -> bytes:
    if isinstance(message, bytes):
        return message
    body = dict(message)
    if body.get("correlation_id") == "<id>":
        body["correlation_id"] = str(uuid.uuid4())
    if body.get("reply_to") == "reply.hostile.<reply>":
        body["reply_to"] = f"reply.hostile.{uuid.uuid4().hex}"
    return encode(body, ascii_only=ascii_only)


class EventChannelWatch:
    """Records anything that looks like a reply on an event channel (it never should)."""

    def __init__(self, platform: Platform) -> None:
        self.leaks: list[tuple[bytes, bytes]] = []
        self._sub = LiveSubscription(
            platform.redis, self._on, channels=EVENT_CHANNEL_NAMES, with_channel=True
        )

    def _on(self, channel: bytes, data: bytes) -> None:
        if b'"correlation_id"' in data and b'"error' in data:
            self.leaks.append((channel, data))

    async def start(self) -> None:
        await self._sub.start()

    async def stop(self) -> None:
        await self._sub.stop()


async def send_request(platform: Platform, channel: str, raw: bytes) -> int:
    """PUBLISH a request after clearing any claim it could collide with (a repeated example
    must be judged again, not skipped as a duplicate)."""
    keys = [request_claim_key(f"malformed:{hash_bytes(raw)}")]
    try:
        cid = orjson.loads(raw).get("correlation_id")
        if isinstance(cid, str):
            keys.append(request_claim_key(cid))
    except (orjson.JSONDecodeError, AttributeError):
        pass
    await platform.redis.delete(*keys)
    return int(await platform.redis.publish(channel, raw))


async def last_dead_letter_id(platform: Platform, channel: str) -> bytes:
    last: Any = await platform.redis.xrevrange(dead_letter_key(channel), count=1)
    return bytes(last[0][0]) if last else b"0-0"


async def request_dead_letters(
    platform: Platform, channel: str, raw: bytes, after: bytes
) -> list[Any]:
    """Dead letters of `raw` written after entry `after` (waits up to 5 s for the first)."""
    deadline = time.monotonic() + 5
    while True:
        entries: Any = await platform.redis.xrange(dead_letter_key(channel), min=b"(" + after)
        found = [f for _, f in entries if f.get(b"original") == raw[:1_000_000]]
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.02)


async def judge_request(platform: Platform, channel: str, raw: bytes) -> str:
    """Send one request and check how it was answered; returns its category."""
    after = await last_dead_letter_id(platform, channel)
    assert await send_request(platform, channel, raw) >= 1, f"nobody listens on {channel}"
    try:
        request = parse_request(raw)
    except MalformedMessage:
        request = None
    data: Any = None
    with contextlib.suppress(orjson.JSONDecodeError):
        data = orjson.loads(raw)
    reply_to = data.get("reply_to") if isinstance(data, dict) else None
    ours = isinstance(reply_to, str) and reply_to.startswith("reply.hostile.")

    def on_ours(ch: bytes, _: bytes) -> bool:
        return isinstance(reply_to, str) and ch == reply_to.encode()

    if request is None or not request.reply_to.startswith("reply."):
        dead = await request_dead_letters(platform, channel, raw, after)
        assert len(dead) == 1, f"malformed request dead-lettered {len(dead)} times: {raw[:300]!r}"
        check_dead_letter(dead[0], channel, "request")
        if ours and request is None:
            got = await platform.inbox.wait_for(on_ours, 10)
            assert got is not None, f"no error reply to a malformed request: {raw[:300]!r}"
            reply = orjson.loads(got[1])
            assert reply["error_code"] == "invalid_request", reply
            assert reply["error"], reply
            return "malformed, answered"
        return "malformed" if request is None else "bad reply_to"
    if request.deadline is not None and request.deadline.timestamp() <= time.time():
        return "expired"
    if not ours:
        return "reply elsewhere"
    got = await platform.inbox.wait_for(on_ours, 15)
    assert got is not None, f"no reply to {request.request_type!r}: {raw[:300]!r}"
    reply = orjson.loads(got[1])
    assert reply["correlation_id"] == request.correlation_id, (reply, request.correlation_id)
    known = (channel, request.request_type) in REQUEST_PAYLOADS
    if not known:
        assert reply.get("error_code") == "unknown_request_type", reply
        return "unknown type"
    model = request_model(channel, request.request_type)
    known_fields = {k: v for k, v in request.payload.items() if k in model.model_fields}
    if model_rejects(model, known_fields):
        assert reply.get("error") and reply.get("error_code"), (
            f"{channel}/{request.request_type} accepted a payload its model rejects: "
            f"{request.payload!r:.300} -> {reply!r:.300}"
        )
        return "bad payload"
    if model_rejects(model, request.payload):
        # unknown payload fields: handlers ignore them though the models forbid them (report)
        return "extra fields tolerated"
    return "valid"


async def test_hostile_requests_on_every_request_type(
    platform: Platform, bridge: Bridge, probe_client: RequestReplyClient
) -> None:
    started = time.monotonic()
    good = GoodTraffic(platform, probe_client)
    watch = EventChannelWatch(platform)
    await watch.start()
    outcomes: dict[str, int] = {}

    def fuzz(channel: str, request_type: str) -> None:
        base = valid_request_payload(channel, request_type)

        @HYPOTHESIS
        @given(message=hostile_request(channel, request_type, base), ascii_only=st.booleans())
        def check(message: dict[str, Any] | bytes, ascii_only: bool) -> None:
            raw = materialise(message, ascii_only=ascii_only)
            outcome = bridge.run(judge_request(platform, channel, raw))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            bridge.run(good.one_round())
            bridge.run(platform.assert_alive())

        check()

    try:
        for channel, request_type in REQUEST_TYPES:
            await asyncio.to_thread(fuzz, channel, request_type)
        await asyncio.sleep(0.2)
    finally:
        await watch.stop()
    assert not watch.leaks, watch.leaks[:3]
    await good.all_stored()
    await platform.assert_alive()
    print(
        f"\nrequest fuzz: {sum(outcomes.values())} hostile requests on {len(REQUEST_TYPES)} "
        f"request types {outcomes}, {good.requests} valid requests answered, "
        f"{time.monotonic() - started:.1f}s"
    )


def _huge(base: dict[str, Any], size: int) -> dict[str, Any]:
    """`base` with its first string field made `size` bytes long (UTF-8: ASCII with an emoji
    and an RTL mark every kilobyte), or an extra field of that size when it has none."""
    chunk = "\U0001f600\u202e" + "x" * (1024 - 7)
    filler = (chunk * (size // 1024 + 1)).encode()[:size].decode(errors="ignore")
    out = dict(base)
    name = next((k for k, v in base.items() if isinstance(v, str)), "huge_extra")
    out[name] = filler
    return out


async def test_huge_messages_everywhere(
    platform: Platform, probe_client: RequestReplyClient
) -> None:
    """1 MB and 5 MB messages on every durable channel and every request type: dead-lettered
    or answered like any other message, and the platform keeps working."""
    started = time.monotonic()
    good = GoodTraffic(platform, probe_client)
    sent = 0
    for size in (1_000_000, 5_000_000):
        for channel in DURABLE_CHANNELS:
            raw = orjson.dumps(fresh(envelope(channel, _huge(valid_event_payload(channel), size))))
            entry_id = await send_event(platform, channel, raw)
            assert entry_id is not None
            dead = await settle_event(platform, channel, entry_id)
            why = is_bad_event(channel, raw)
            if why is not None:
                assert dead, f"huge bad event on {channel} not dead-lettered"
            sent += 1
        for channel, request_type in REQUEST_TYPES:
            body = {
                "correlation_id": str(uuid.uuid4()),
                "reply_to": f"reply.hostile.{uuid.uuid4().hex}",
                "request_type": request_type,
                "source": "hostile_fuzzer",
                "payload": _huge(valid_request_payload(channel, request_type), size),
            }
            await judge_request(platform, channel, orjson.dumps(body))
            sent += 1
        garbage = b"\x00not json" + b"z" * (size - 10)
        await judge_request(platform, channels.DATABASE_QUERY, garbage)
        await good.one_round()
        await platform.assert_alive()
    await good.all_stored()
    print(f"\nhuge messages: {sent + 2} of 1-5 MB in {time.monotonic() - started:.1f}s")


async def test_an_oversized_request_is_refused_to_its_sender_and_breaks_nothing(
    platform: Platform,
) -> None:
    """Redis refuses a message over `proto-max-bulk-len` (8 MB) to its sender, so it can never
    overflow the subscribers' output buffers (which would drop every responder's subscription
    and lose whatever else is in flight)."""
    body = {
        "correlation_id": str(uuid.uuid4()),
        "reply_to": f"reply.hostile.{uuid.uuid4().hex}",
        "request_type": "get_entity",
        "source": "hostile_fuzzer",
        "payload": {"entity_type": "order", "entity_id": "x" * 40_000_000},
    }
    # Redis answers a protocol error and closes the sender's connection
    with pytest.raises((ResponseError, RedisConnectionError)):
        await send_request(platform, channels.DATABASE_QUERY, orjson.dumps(body))
    await platform.assert_alive()
    # every responder is still subscribed
    small = {**body, "payload": {"entity_type": "order", "entity_id": "x"}}
    assert await send_request(platform, channels.DATABASE_QUERY, orjson.dumps(small)) >= 1
