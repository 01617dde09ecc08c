"""Shared by the calculation engine tests: KPI definitions, a reproducible event history with
out-of-order, late and duplicate events, an independent straightforward recomputation of the
KPI semantics, readers of the published results, and a stand-in metadata service."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import yaml
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from analytics_engine.calculation.backfill import DATABASE_GROUP
from analytics_engine.core import channels
from analytics_engine.core.bus import DeadLetters, EventPublisher
from analytics_engine.core.envelopes import Event, Request
from analytics_engine.core.errors import HandlerError
from analytics_engine.core.request_reply import RequestReplyServer
from analytics_engine.simulator.config import GeneratorConfig
from analytics_engine.simulator.generator import EventGenerator

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def kpi(
    code: str, entity_type: str, aggregation: str, window: dict[str, Any], **over: Any
) -> dict[str, Any]:
    return {
        "code": code,
        "display_name": code,
        "entity_type": entity_type,
        "aggregation": aggregation,
        "window": window,
        **over,
    }


def tumbling(size: str, lateness: str) -> dict[str, Any]:
    return {"type": "tumbling", "size": size, "allowed_lateness": lateness}


KPIS: list[dict[str, Any]] = [
    kpi("orders_count", "order", "count", tumbling("2s", "1s")),
    kpi(
        "revenue_by_region",
        "order",
        "sum",
        tumbling("2s", "1s"),
        field="amount",
        filter="status != 'cancelled'",
        group_by=["region"],
    ),
    kpi("max_amount", "order", "max", tumbling("5s", "0s"), field="amount", group_by=["currency"]),
    kpi("distinct_customers", "order", "count_distinct", tumbling("5s", "2s"), field="customer_id"),
    kpi(
        "sensor_avg_temp",
        "sensor",
        "avg",
        {"type": "sliding", "size": "4s", "slide": "2s", "allowed_lateness": "1s"},
        field="temperature",
        group_by=["site"],
    ),
]

# the filters above, written independently of the CEL evaluator
FILTERS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "revenue_by_region": lambda a: a.get("status") != "cancelled",
    "orders_with_status_new": lambda a: a.get("status") == "new",
}


def write_kpi_dir(path: Any, kpis: Iterable[dict[str, Any]] = KPIS) -> str:
    for d in kpis:
        (path / f"{d['code']}.yaml").write_text(yaml.safe_dump(d))
    return str(path)


def history(
    n: int, start: datetime, span_s: float, *, seed: int = 7, duplicate_every: int = 50
) -> list[Event]:
    """`n` simulator events published evenly over `span_s` seconds from `start` (10% out of
    order, 5% late by up to 10 s), plus a re-sent copy (same envelope) of every
    `duplicate_every`-th event a few positions later, as a publisher retry would."""
    gen = EventGenerator(
        GeneratorConfig(
            seed=seed,
            out_of_order_ratio=0.1,
            late_ratio=0.05,
            max_lateness=timedelta(seconds=10),
            out_of_order_span=timedelta(seconds=2),
            max_live_entities=2000,
        )
    )
    events: list[Event] = []
    for i in range(n):
        published = start + timedelta(seconds=span_s * i / n)
        channel, payload = gen.next_batch(1, published)[0]
        events.append(
            Event(
                event_id=gen.event_id(i),
                event_type=channel,
                source="data_simulator",
                timestamp=published,
                payload=payload,
            )
        )
    out: list[Event] = []
    for i, event in enumerate(events):
        out.append(event)
        if duplicate_every and i % duplicate_every == 3:
            out.append(events[i - 3])
    return out


def micros(value: datetime | timedelta) -> int:
    if isinstance(value, timedelta):
        return value // timedelta(microseconds=1)
    return (value - EPOCH) // timedelta(microseconds=1)


def parse_duration(text: str) -> int:
    units = {"ms": 1_000, "s": 1_000_000, "m": 60_000_000}
    for unit in ("ms", "s", "m"):
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return int(text[: -len(unit)]) * units[unit]
    raise ValueError(text)


Key = tuple[str, str, str, tuple[tuple[str, Any], ...]]


@dataclass
class Expected:
    value: float
    sample_count: int


def recompute(
    definitions: Iterable[dict[str, Any]], events: Iterable[Event]
) -> dict[Key, Expected]:
    """KPI semantics, straight from docs/architecture.md: W gets event e iff
    W.start <= occurred < W.end and published < W.end + allowed_lateness; duplicates
    (same event_id) count once."""
    seen: set[str] = set()
    unique = []
    for e in events:
        if e.event_id not in seen and e.event_type in (
            channels.ENTITY_CREATED,
            channels.ENTITY_UPDATED,
        ):
            seen.add(e.event_id)
            unique.append(e)
    out: dict[Key, Expected] = {}
    for d in definitions:
        w = d["window"]
        size = parse_duration(w["size"])
        slide = parse_duration(w["slide"]) if w.get("slide") else size
        lateness = parse_duration(w.get("allowed_lateness", "0s"))
        keep = FILTERS.get(d["code"], lambda a: True)
        groups: dict[tuple[int, tuple[Any, ...]], list[Any]] = {}
        for e in unique:
            p = e.payload
            attrs = p.get("attributes", {})
            if p["entity_type"] != d["entity_type"] or not keep(attrs):
                continue
            t = micros(datetime.fromisoformat(p["occurred_at"]))
            published = micros(e.timestamp)
            dims = tuple(attrs.get(g) for g in d.get("group_by", []))
            first = t - t % slide - size + slide
            for start in range(first, t + 1, slide):
                if not start <= t < start + size or published >= start + size + lateness:
                    continue
                groups.setdefault((start, dims), []).append(attrs.get(d.get("field", "")))
        for (start, dims), values in groups.items():
            agg = d["aggregation"]
            present = [v for v in values if v is not None]
            if agg == "count":
                value = float(len(values))
            elif agg == "count_distinct":
                value = float(len(set(present)))
            elif not present:
                continue
            elif agg == "sum":
                value = math.fsum(present)
            elif agg == "avg":
                value = math.fsum(present) / len(present)
            elif agg == "max":
                value = float(max(present))
            else:
                value = float(min(present))
            key = (
                d["code"],
                _iso(start),
                _iso(start + size),
                tuple(zip(d.get("group_by", []), dims, strict=True)),
            )
            out[key] = Expected(value, len(values))
    return out


def _iso(us: int) -> str:
    return (EPOCH + timedelta(microseconds=us)).isoformat()


def key_of(payload: dict[str, Any]) -> Key:
    return (
        payload["kpi_code"],
        datetime.fromisoformat(payload["window_start"]).isoformat(),
        datetime.fromisoformat(payload["window_end"]).isoformat(),
        tuple(sorted(payload["dimensions"].items())),
    )


async def published_results(redis: Redis) -> list[dict[str, Any]]:
    """Every result on the durable `kpi.calculated` stream, in order."""
    entries = await redis.xrange(channels.stream_key(channels.KPI_CALCULATED))
    return [orjson.loads(fields[b"m"])["payload"] for _, fields in entries]


def compare(
    results: list[dict[str, Any]], expected: dict[Key, Expected], *, allow_duplicates: bool
) -> None:
    by_key: dict[Key, list[dict[str, Any]]] = {}
    for r in results:
        by_key.setdefault(key_of(r), []).append(r)
    expected_sorted = {k: expected[k] for k in sorted(expected, key=repr)}
    missing = [k for k in expected_sorted if k not in by_key]
    extra = [k for k in by_key if k not in expected]
    assert not missing, f"{len(missing)} windows never emitted, e.g. {missing[:3]}"
    assert not extra, f"{len(extra)} unexpected windows, e.g. {extra[:3]}"
    for key, emitted in by_key.items():
        if not allow_duplicates:
            assert len(emitted) == 1, f"{key} emitted {len(emitted)} times"
        want = expected[key]
        for r in emitted:
            assert r["sample_count"] == want.sample_count, (key, r, want)
            assert math.isclose(r["value"], want.value, rel_tol=1e-9, abs_tol=1e-9), (key, r, want)
        assert len({(r["value"], r["sample_count"]) for r in emitted}) == 1


async def wait_for(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


class StandInMetadata:
    """A stand-in `metadata.lookup` responder (the real one needs PostgreSQL)."""

    def __init__(self, redis: Redis, definitions: dict[str, dict[str, Any]]) -> None:
        self.definitions = definitions
        self.server = RequestReplyServer(
            redis,
            channel=channels.METADATA_LOOKUP,
            source="metadata_stand_in",
            instance="t",
            handlers={"list_kpi_definitions": self.list, "get_kpi_definition": self.get},
            dead_letters=DeadLetters(redis, service="metadata_stand_in"),
        )
        self.publisher = EventPublisher(redis, source="metadata_service", stream_maxlen=10_000)

    async def list(self, _: Request) -> dict[str, Any]:
        return {"items": list(self.definitions.values())}

    async def get(self, request: Request) -> dict[str, Any]:
        code = request.payload["code"]
        if code not in self.definitions:
            raise HandlerError("not found", code="not_found")
        return self.definitions[code]

    async def put(self, definition: dict[str, Any]) -> None:
        self.definitions[definition["code"]] = definition
        await self.publisher.publish(
            channels.METADATA_CHANGED,
            {
                "kind": "kpi_definition",
                "code": definition["code"],
                "action": "upserted",
                "version": definition["version"],
            },
        )


class StandInReplayer:
    """A stand-in for the database service's stream subscriptions: replays the events stored
    in the Redis streams (what the database would have stored) into the requested channel."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.publisher = EventPublisher(redis, source="database_stand_in", stream_maxlen=10**6)
        self.requests: list[dict[str, Any]] = []
        self.heartbeats = 0
        self.unsubscribed: list[str] = []

    async def stored_everything(self) -> None:
        """Make the database service's group on the entity streams say it has stored every
        event in them (what a due backfill waits for)."""
        for channel in channels.ENTITY_CHANNELS:
            key = channels.stream_key(channel)
            with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                await self.redis.xgroup_create(key, DATABASE_GROUP, "0", mkstream=True)
            await self.redis.xgroup_setid(key, DATABASE_GROUP, "$")

    async def run(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(
            channels.STREAM_SUBSCRIBE, channels.STREAM_HEARTBEAT, channels.STREAM_UNSUBSCRIBE
        )
        try:
            async for message in pubsub.listen():
                event = orjson.loads(message["data"])
                if event["event_type"] == channels.STREAM_HEARTBEAT:
                    self.heartbeats += 1
                elif event["event_type"] == channels.STREAM_UNSUBSCRIBE:
                    self.unsubscribed.append(event["payload"]["subscription_id"])
                else:
                    self.requests.append(event["payload"])
                    await self.replay(event["payload"])
        finally:
            await pubsub.aclose()

    async def replay(self, request: dict[str, Any]) -> None:
        since = datetime.fromisoformat(request["since"])
        until = datetime.fromisoformat(request["until"])
        stored = []
        for channel in channels.ENTITY_CHANNELS:
            for _, fields in await self.redis.xrange(channels.stream_key(channel)):
                e = orjson.loads(fields[b"m"])
                occurred = datetime.fromisoformat(e["payload"]["occurred_at"])
                if (
                    e["payload"]["entity_type"] == request["entity_type"]
                    and since <= occurred <= until
                ):
                    stored.append((occurred, e))
        stored.sort(key=lambda x: x[0])  # event-time order, like the database
        items = [(request["channel"], {"event": e}) for _, e in stored]
        for i in range(0, len(items), 500):
            await self.publisher.publish_many(items[i : i + 500])
        await self.publisher.publish(
            request["channel"],
            {"subscription_id": request["subscription_id"], "done": True, "count": len(items)},
        )
