"""Retention under races: a pass and the confirmations it waits for run at the same time."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from analytics_engine.core.bus import DeadLetters, EventPublisher
from analytics_engine.database.archival import Archiver
from analytics_engine.database.metrics import DatabaseMetrics
from analytics_engine.database.partitions import PartitionManager

from .conftest import Start, count, entity_event, wait_for
from .test_retention import all_stored, seed


class RecordingPublisher:
    """Records what the archiver publishes; `before_publish` runs first (a race injected)."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.before_publish: Any = None

    async def publish(self, channel: str, payload: Mapping[str, Any]) -> None:
        if self.before_publish is not None:
            hook, self.before_publish = self.before_publish, None
            await hook(dict(payload))
        self.published.append(dict(payload))


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


def make_archiver(pool: asyncpg.Pool, publisher: RecordingPublisher, redis: Redis) -> Archiver:
    return Archiver(
        pool=pool,
        publisher=publisher,  # type: ignore[arg-type]
        dead_letters=DeadLetters(redis, service="database_service"),
        metrics=DatabaseMetrics(CollectorRegistry()),
        partitions=PartitionManager(enabled=False),
        retention=timedelta(days=7),
        interval=timedelta(0),
        batch_rows=3,
        batch_bytes=2_000_000,
        confirm_timeout=timedelta(0),  # every sent batch is due again at once
        max_inflight=2,
    )


async def test_a_batch_confirmed_during_a_re_send_pass_is_not_re_sent_without_its_rows(
    start_service: Start,
    publisher: EventPublisher,
    pg: asyncpg.Connection,
    redis: Redis,
    pool: asyncpg.Pool,
) -> None:
    """A pass picks its overdue batches, then reads and publishes them one by one. A batch
    confirmed in between (its rows deleted) was re-sent with no rows, to the same object key:
    the archival service overwrote the archived object with an empty file."""
    await seed(publisher, pg)
    await start_service()  # migrates and stores the events; runs no retention pass
    await all_stored(pg)
    recorder = RecordingPublisher()
    archiver = make_archiver(pool, recorder, redis)
    await archiver.run_pass()
    first, second = recorder.published
    assert first["rows"] and second["rows"]

    async def confirm_second(_: dict[str, Any]) -> None:
        # the archival service confirms `second` while the pass re-sends `first`
        key = f"entity_events/batch-{second['batch_id']}.parquet"
        await archiver._confirm(uuid.UUID(second["batch_id"]), key, len(second["rows"]))

    recorder.before_publish = confirm_second
    await archiver.run_pass()
    resent = [b for b in recorder.published[2:] if b["batch_id"] == second["batch_id"]]
    assert all(b["rows"] == second["rows"] for b in resent), "re-sent without its rows"
    status = await pg.fetchval(
        "SELECT status FROM archival_batches WHERE batch_id = $1", uuid.UUID(second["batch_id"])
    )
    assert status == "deleted"


async def test_an_event_stored_again_after_it_was_archived_is_not_archived_twice(
    start_service: Start,
    publisher: EventPublisher,
    pg: asyncpg.Connection,
    redis: Redis,
    pool: asyncpg.Pool,
) -> None:
    """A writer that committed a batch of old events (a backlog, a late source) and died before
    acknowledging it has them re-delivered; if a retention pass archived and deleted them
    meanwhile, they were stored again, archived again in a new batch (another object), and the
    lake held them twice."""
    old = datetime.now(UTC) - timedelta(days=10)
    events = [
        entity_event(publisher, "created", f"r-{i}", 1, occurred_at=old + timedelta(seconds=i))
        for i in range(3)
    ]
    await publisher.publish_events(events)
    await start_service()

    async def stored(n: int) -> bool:
        return await count(pg, "SELECT count(*) FROM entity_events") == n

    await wait_for(lambda: stored(3))
    recorder = RecordingPublisher()
    archiver = make_archiver(pool, recorder, redis)
    await archiver.run_pass()
    (batch,) = recorder.published
    assert len(batch["rows"]) == 3
    key = f"entity_events/batch-{batch['batch_id']}.parquet"
    await archiver._confirm(uuid.UUID(batch["batch_id"]), key, 3)
    assert await stored(0)

    await publisher.publish_events(events)  # the same events, delivered again
    await wait_for(lambda: stored(3))
    await archiver.run_pass()
    again = [r["event_id"] for b in recorder.published[1:] for r in b["rows"]]
    assert again == [], "archived a second time"
    assert await stored(0)  # already in the lake: deleted, not kept forever
