"""Crashes and outages: a killed service or a stopped PostgreSQL loses and duplicates nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher
from analytics_engine.database.service import create

from .conftest import Start, count, entity_event, make_settings, wait_for


class ServiceProcess:
    """`analytics-engine run database` as a child process, to SIGKILL it for real."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "analytics_engine.cli", "run", "database"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def service_process(redis_url: str, database_url: str) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(
        {
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "DATABASE_SERVICE_PORT": "0",
            "SERVICE_INSTANCE_ID": "db-proc",
            "DATABASE_ARCHIVAL_INTERVAL": "0",
            "DATABASE_WRITE_BATCH": "500",
            "DATABASE_REPLAY_PAGE_ROWS": "200",
            "LOG_LEVEL": "WARNING",
        }
    )
    yield proc
    proc.stop()


async def no_dead_letters(redis: Redis) -> None:
    for ch in (*channels.ENTITY_CHANNELS, channels.STREAM_SUBSCRIBE):
        assert await redis.xlen(channels.dead_letter_key(ch)) == 0


async def test_killing_the_service_mid_stream_loses_and_duplicates_nothing(
    service_process: ServiceProcess,
    publisher: EventPublisher,
    pg: asyncpg.Connection,
    redis: Redis,
) -> None:
    t0 = datetime(2024, 6, 1, tzinfo=UTC)
    events = [
        entity_event(
            publisher,
            "created" if i % 4 == 0 else "updated",
            f"k-{i % 997}",
            i,
            occurred_at=t0 + timedelta(milliseconds=i),
        )
        for i in range(30_000)
    ]
    for i in range(0, len(events), 2000):
        await publisher.publish_events(events[i : i + 2000])
    service_process.start()

    async def some_stored() -> bool:
        try:
            return await count(pg, "SELECT count(*) FROM entity_events") >= 3000
        except asyncpg.exceptions.UndefinedTableError:
            return False

    await wait_for(some_stored, timeout=60)
    service_process.kill()
    stored_at_kill = await count(pg, "SELECT count(*) FROM entity_events")
    assert stored_at_kill < 30_000, "too fast to interrupt; use more events"
    service_process.start()

    async def all_stored() -> bool:
        return await count(pg, "SELECT count(*) FROM entity_events") >= 30_000

    await wait_for(all_stored, timeout=120)
    await asyncio.sleep(0.5)
    assert await count(pg, "SELECT count(*) FROM entity_events") == 30_000
    assert await count(pg, "SELECT count(DISTINCT event_id) FROM entity_events") == 30_000
    # entity state is the newest version of each entity, whatever the interruption
    wrong = await count(
        pg,
        "SELECT count(*) FROM entities e WHERE version <>"
        " (SELECT max(version) FROM entity_events v WHERE v.entity_id = e.entity_id)",
    )
    assert wrong == 0
    await no_dead_letters(redis)

    # now a replay, killed mid-way: every event exactly once, then one end marker
    channel = "stream.replay.kill"
    await publisher.publish(
        channels.STREAM_SUBSCRIBE,
        {
            "subscription_id": "kill",
            "entity_type": "order",
            "since": t0.isoformat(),
            "until": (t0 + timedelta(days=1)).isoformat(),
            "channel": channel,
        },
    )

    async def some_replayed() -> bool:
        return await redis.xlen(channels.stream_key(channel)) >= 2000

    await wait_for(some_replayed, timeout=60)
    service_process.kill()
    assert await redis.xlen(channels.stream_key(channel)) < 30_001
    service_process.start()

    async def replay_done() -> bool:
        last = await redis.xrevrange(channels.stream_key(channel), count=1)
        return bool(last) and orjson.loads(last[0][1][b"m"])["payload"].get("done") is True

    await wait_for(replay_done, timeout=120)
    entries = await redis.xrange(channels.stream_key(channel))
    payloads: list[dict[str, Any]] = [orjson.loads(f[b"m"])["payload"] for _, f in entries]
    ids = [p["event"]["event_id"] for p in payloads[:-1]]
    assert len(ids) == len(set(ids)) == 30_000
    assert payloads[-1] == {"subscription_id": "kill", "done": True, "count": 30_000}
    order = [p["event"]["payload"]["version"] for p in payloads[:-1]]
    assert order == sorted(order)  # occurred_at grows with the version here
    await no_dead_letters(redis)


async def test_a_postgresql_outage_mid_stream_loses_nothing_and_dead_letters_nothing(  # noqa: PLR0917
    start_service: Start,
    postgres_server: Any,
    publisher: EventPublisher,
    pg: asyncpg.Connection,
    redis: Redis,
    database_url: str,
) -> None:
    if not hasattr(postgres_server, "stop"):
        pytest.skip("an external PostgreSQL cannot be stopped")
    await start_service()
    total = 12_000

    async def produce() -> None:
        for i in range(0, total, 500):
            await publisher.publish_events(
                [entity_event(publisher, "created", f"x-{j}", 1) for j in range(i, i + 500)]
            )
            await asyncio.sleep(0.05)

    producer = asyncio.create_task(produce())
    await asyncio.sleep(0.4)
    await pg.close()
    try:
        await asyncio.to_thread(postgres_server.stop)
        await asyncio.sleep(3)
    finally:
        await asyncio.to_thread(postgres_server.start)
    await producer
    conn = await asyncpg.connect(database_url)
    try:

        async def all_stored() -> bool:
            return await count(conn, "SELECT count(*) FROM entity_events") >= total

        await wait_for(all_stored, timeout=60)
        await asyncio.sleep(0.5)
        assert await count(conn, "SELECT count(*) FROM entity_events") == total
        assert await count(conn, "SELECT count(*) FROM entities") == total
    finally:
        await conn.close()
    await no_dead_letters(redis)


async def test_a_stop_while_waiting_for_postgresql_at_start_is_obeyed(
    redis_url: str, unused_tcp_port: int
) -> None:
    """PostgreSQL not up: the service retries its migrations, and a SIGTERM meanwhile ends it
    at once instead of after the pod's grace period."""
    settings = make_settings(
        redis_url, f"postgresql://nobody:secret@127.0.0.1:{unused_tcp_port}/analytics"
    )
    service = create(settings)
    task = asyncio.create_task(service.run())
    await asyncio.sleep(1.0)  # a few connection attempts
    assert not task.done()
    started = time.monotonic()
    service.stop()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 3.0
    assert not service.ready.is_set()
