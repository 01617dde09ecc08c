"""Benchmark of the core bus against raw Redis baselines measured in the same run.

Run: `.venv/bin/python bench/bus_bench.py [--loop service|asyncio]` (starts its own Redis on a
free port; bus and baselines run on the services' event loop, uvloop, unless `--loop asyncio`).
Prints, for each measure, the bus figure, the raw baseline and their ratio:
- durable event throughput (publish -> consume -> ack) vs raw XADD/XREADGROUP/XACK;
- request/reply latency p50/p99 one at a time vs raw PUBLISH/SUBSCRIBE request/reply;
- request/reply throughput with 64 in flight vs the raw equivalent.
Targets (issue "platform core"): p99 <= 1.5x raw; 64-in-flight >= 0.85x raw; durable >= 0.7x raw.
The machine is shared and noisy: each measure runs `--rounds` times and the median is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson
from redis.asyncio import Redis

from analytics_engine.core import channels, eventloop
from analytics_engine.core.bus import DeadLetters, Delivery, DurableConsumer, EventPublisher
from analytics_engine.core.envelopes import Request
from analytics_engine.core.redis import connect
from analytics_engine.core.request_reply import RequestReplyClient, RequestReplyServer
from analytics_engine.localstack import RedisServer

BATCH = 500


async def raw_streams(redis: Redis, n: int) -> float:
    key = f"bench:raw:{uuid.uuid4().hex}"
    await redis.xgroup_create(key, "g", id="0", mkstream=True)
    payload = orjson.dumps({"event_id": str(uuid.uuid4()), "payload": {"amount": 12.5, "x": "y"}})
    done = asyncio.Event()
    consumed = 0

    async def consume() -> None:
        nonlocal consumed
        while consumed < n:
            reply = await redis.xreadgroup("g", "c", {key: ">"}, count=BATCH, block=1000)
            for _, entries in reply or []:
                ids = [entry_id for entry_id, _ in entries]
                for _, fields in entries:
                    orjson.loads(fields[b"m"])
                await redis.xack(key, "g", *ids)
                consumed += len(ids)
        done.set()

    started = time.perf_counter()
    task = asyncio.create_task(consume())
    for i in range(0, n, BATCH):
        pipe = redis.pipeline(transaction=True)
        for _ in range(min(BATCH, n - i)):
            pipe.xadd(key, {b"m": payload}, maxlen=1_000_000, approximate=True)
            pipe.publish("bench.raw", payload)
        await pipe.execute()
    await done.wait()
    await task
    elapsed = time.perf_counter() - started
    await redis.delete(key)
    return n / elapsed


async def bus_streams(redis: Redis, n: int) -> float:
    channel = channels.ENTITY_CREATED
    await redis.delete(channels.stream_key(channel))
    publisher = EventPublisher(redis, source="bench", stream_maxlen=1_000_000)
    consumed = 0
    done = asyncio.Event()

    async def handle(batch: Sequence[Delivery]) -> None:
        nonlocal consumed
        consumed += len(batch)
        if consumed >= n:
            done.set()

    consumer = DurableConsumer(
        redis,
        channels=[channel],
        group=f"bench-{uuid.uuid4().hex[:8]}",
        consumer="c",
        handler=handle,
        dead_letters=DeadLetters(redis, service="bench"),
        batch_size=BATCH,
    )
    started = time.perf_counter()
    task = asyncio.create_task(consumer.run())
    payload = {"amount": 12.5, "x": "y"}
    for i in range(0, n, BATCH):
        events = [publisher.make_event(channel, payload) for _ in range(min(BATCH, n - i))]
        await publisher.publish_events(events)
    await done.wait()
    elapsed = time.perf_counter() - started
    consumer.stop()
    await task
    await redis.delete(channels.stream_key(channel))
    return n / elapsed


class RawResponder:
    """The baseline: a bare pub/sub responder that parses JSON and answers."""

    def __init__(self, redis: Redis, channel: str) -> None:
        self.redis = redis
        self.channel = channel
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.channel)

        async def loop() -> None:
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                request = orjson.loads(message["data"])
                reply = {"correlation_id": request["correlation_id"], "payload": {"ok": 1}}
                await self.redis.publish(request["reply_to"], orjson.dumps(reply))

        self.task = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


class RawClient:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.reply_to = f"reply.rawbench.{uuid.uuid4().hex[:6]}"
        self.pending: dict[str, asyncio.Future[Any]] = {}
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.reply_to)

        async def loop() -> None:
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                reply = orjson.loads(message["data"])
                future = self.pending.pop(reply["correlation_id"], None)
                if future is not None:
                    future.set_result(reply["payload"])

        self.task = asyncio.create_task(loop())

    async def request(self, channel: str, payload: Mapping[str, Any]) -> Any:
        cid = str(uuid.uuid4())
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[cid] = future
        body = {"correlation_id": cid, "reply_to": self.reply_to, "payload": payload}
        await self.redis.publish(channel, orjson.dumps(body))
        return await asyncio.wait_for(future, 10)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


async def latencies(call: Callable[[], Awaitable[Any]], n: int) -> tuple[float, float]:
    for _ in range(50):  # warm-up
        await call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2] * 1000, samples[int(len(samples) * 0.99)] * 1000


async def throughput(call: Callable[[], Awaitable[Any]], n: int, in_flight: int) -> float:
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return n / (time.perf_counter() - started)


async def bench(url: str, *, events: int, requests: int, rounds: int) -> dict[str, list[float]]:
    # separate connections for client and server side, as separate services would have
    server_redis, client_redis = connect(url), connect(url)
    results: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    raw_channel, bus_channel = "bench.raw.query", channels.DATABASE_QUERY
    raw_server = RawResponder(server_redis, raw_channel)
    await raw_server.start()
    raw_client = RawClient(client_redis)
    await raw_client.start()

    async def ok(_: Request) -> Mapping[str, Any]:
        return {"ok": 1}

    server = RequestReplyServer(
        server_redis,
        channel=bus_channel,
        source="bench",
        instance="s1",
        handlers={"ping": ok},
        dead_letters=DeadLetters(server_redis, service="bench"),
        concurrency=64,
    )
    await server.start()
    client = RequestReplyClient(client_redis, service="bench", instance="c1")
    await client.start()

    def raw_call() -> Awaitable[Any]:
        return raw_client.request(raw_channel, {"q": 1})

    def bus_call() -> Awaitable[Any]:
        return client.request(bus_channel, "ping", {"q": 1})

    for _ in range(rounds):
        record("durable events/s raw", await raw_streams(client_redis, events))
        record("durable events/s bus", await bus_streams(client_redis, events))
        p50, p99 = await latencies(raw_call, requests)
        record("rr p50 ms raw", p50)
        record("rr p99 ms raw", p99)
        p50, p99 = await latencies(bus_call, requests)
        record("rr p50 ms bus", p50)
        record("rr p99 ms bus", p99)
        record("rr 64-in-flight req/s raw", await throughput(raw_call, requests * 3, 64))
        record("rr 64-in-flight req/s bus", await throughput(bus_call, requests * 3, 64))

    await client.close()
    await server.stop()
    await raw_client.stop()
    await raw_server.stop()
    await server_redis.aclose()
    await client_redis.aclose()
    return results


def report(results: dict[str, list[float]]) -> None:
    median = {k: statistics.median(v) for k, v in results.items()}
    rows = [
        ("durable delivery (events/s)", "durable events/s", ">= 0.70x raw", True),
        ("request/reply p50 (ms)", "rr p50 ms", "(info)", False),
        ("request/reply p99 (ms)", "rr p99 ms", "<= 1.50x raw", False),
        ("request/reply 64 in flight (req/s)", "rr 64-in-flight req/s", ">= 0.85x raw", True),
    ]
    print(f"{'measure':38} {'bus':>12} {'raw':>12} {'ratio':>7}  target")
    for label, key, target, higher_better in rows:
        bus, raw = median[f"{key} bus"], median[f"{key} raw"]
        ratio = bus / raw if raw else float("nan")
        print(f"{label:38} {bus:12.2f} {raw:12.2f} {ratio:7.2f}  {target}")
        del higher_better
    rounds = len(next(iter(results.values())))
    print(f"(medians of {rounds} rounds; raw = bare redis-py on the same server, same run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    parser.add_argument(
        "--loop",
        choices=("service", "asyncio"),
        default="service",
        help="the services' event loop (uvloop), or asyncio's default loop",
    )
    args = parser.parse_args()
    run = eventloop.run if args.loop == "service" else asyncio.run
    if args.redis_url:
        results = run(
            bench(args.redis_url, events=args.events, requests=args.requests, rounds=args.rounds)
        )
    else:
        with tempfile.TemporaryDirectory() as tmp, RedisServer(tmp, appendonly=False) as server:
            results = run(
                bench(server.url, events=args.events, requests=args.requests, rounds=args.rounds)
            )
    report(results)


if __name__ == "__main__":
    main()
