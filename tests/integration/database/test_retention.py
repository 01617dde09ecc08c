"""Retention: old events go to the archival service and are deleted only once it confirms."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher
from analytics_engine.core.request_reply import RequestReplyClient

from .conftest import Start, count, entity_event, wait_for


async def sent_batches(redis: Redis) -> list[dict[str, Any]]:
    entries = await redis.xrange(channels.stream_key(channels.ARCHIVAL_EVENTS))
    return [orjson.loads(f[b"m"])["payload"] for _, f in entries]


async def seed(publisher: EventPublisher, pg: asyncpg.Connection) -> datetime:
    now = datetime.now(UTC)
    old_a = (now - timedelta(days=10)).replace(hour=10)
    old_b = (now - timedelta(days=9)).replace(hour=10)
    events = [
        *(
            entity_event(
                publisher, "created", f"o-{i}", 1, occurred_at=old_a + timedelta(seconds=i)
            )
            for i in range(5)
        ),
        *(
            entity_event(
                publisher,
                "created",
                f"c-{i}",
                1,
                entity_type="customer",
                occurred_at=old_a + timedelta(seconds=i),
            )
            for i in range(2)
        ),
        *(entity_event(publisher, "updated", f"o-{i}", 2, occurred_at=old_b) for i in range(2)),
        *(entity_event(publisher, "created", f"n-{i}", 1, occurred_at=now) for i in range(4)),
    ]
    await publisher.publish_events(events)  # stored once the service runs
    return now


async def all_stored(pg: asyncpg.Connection) -> None:
    async def stored() -> bool:
        return await count(pg, "SELECT count(*) FROM entity_events") == 13

    await wait_for(stored)


async def confirm(publisher: EventPublisher, batch: dict[str, Any], **override: Any) -> None:
    await publisher.publish(
        channels.ARCHIVAL_CONFIRMED,
        {
            "batch_id": batch["batch_id"],
            "object_key": f"events/{batch['batch_id']}.parquet",
            "row_count": len(batch["rows"]),
            **override,
        },
    )


async def test_old_events_are_archived_in_batches_and_deleted_only_after_confirmation(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    now = await seed(publisher, pg)
    await start_service(
        archival_interval=timedelta(seconds=0.2),
        archival_batch_rows=3,
        archival_confirm_timeout=timedelta(seconds=1),
        archival_max_inflight=2,
    )
    await all_stored(pg)

    async def n_sent(n: int) -> bool:
        return len(await sent_batches(redis)) >= n

    await wait_for(lambda: n_sent(2))
    await asyncio.sleep(0.6)
    first = await sent_batches(redis)
    assert len({b["batch_id"] for b in first}) == 2  # in-flight limit holds
    # nothing is deleted without a confirmation
    assert await count(pg, "SELECT count(*) FROM entity_events") == 13
    # unconfirmed batches are re-sent, same id, same rows
    await wait_for(lambda: n_sent(4), timeout=10)
    again = await sent_batches(redis)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for b in again:
        by_id.setdefault(b["batch_id"], []).append(b)
    assert len(by_id) == 2
    for copies in by_id.values():
        assert all(c == copies[0] for c in copies)
    b0 = again[0]
    assert set(b0) == {"batch_id", "entity_type", "date", "rows"}
    assert len(b0["rows"]) <= 3
    assert set(b0["rows"][0]) == {
        "event_id",
        "event_kind",
        "entity_type",
        "entity_id",
        "version",
        "occurred_at",
        "published_at",
        "attributes",
        "reason",
        "source",
    }
    # confirm everything as it comes, like the archival service would
    confirmed: set[str] = set()

    async def confirm_all() -> bool:
        for b in await sent_batches(redis):
            if b["batch_id"] not in confirmed:
                confirmed.add(b["batch_id"])
                await confirm(publisher, b)
        return await count(pg, "SELECT count(*) FROM entity_events") == 4

    await wait_for(confirm_all, timeout=20, interval=0.2)
    batches = {b["batch_id"]: b for b in await sent_batches(redis)}
    archived = [r for b in batches.values() for r in b["rows"]]
    assert len(archived) == 9 and len({r["event_id"] for r in archived}) == 9
    for b in batches.values():  # one entity type and one UTC day per batch
        assert {r["entity_type"] for r in b["rows"]} == {b["entity_type"]}
        assert {r["occurred_at"][:10] for r in b["rows"]} == {b["date"]}
    assert {b["entity_type"] for b in batches.values()} == {"order", "customer"}
    remaining = await pg.fetch("SELECT occurred_at FROM entity_events")
    assert all(r["occurred_at"] >= now - timedelta(seconds=1) for r in remaining)
    status = await pg.fetch("SELECT DISTINCT status FROM archival_batches")
    assert [r["status"] for r in status] == ["deleted"]
    # the emptied day partitions are dropped
    old_day = (now - timedelta(days=10)).strftime("%Y%m%d")
    await wait_for(lambda: _no_table(pg, f"entity_events_p{old_day}"), timeout=10)


async def _no_table(pg: asyncpg.Connection, name: str) -> bool:
    return bool(await pg.fetchval("SELECT to_regclass($1) IS NULL", name))


async def test_a_wrong_row_count_confirms_nothing(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    await seed(publisher, pg)
    await start_service(archival_interval=timedelta(seconds=0.2), archival_max_inflight=1)
    await all_stored(pg)

    async def one_sent() -> bool:
        return len(await sent_batches(redis)) >= 1

    await wait_for(one_sent)
    batch = (await sent_batches(redis))[0]
    await confirm(publisher, batch, row_count=len(batch["rows"]) + 1)
    await confirm(publisher, batch, batch_id="00000000-0000-0000-0000-000000000000")

    async def dead_lettered() -> bool:
        return await redis.xlen(channels.dead_letter_key(channels.ARCHIVAL_CONFIRMED)) == 1

    await wait_for(dead_lettered)
    assert await count(pg, "SELECT count(*) FROM entity_events") == 13


async def test_request_archival_command_archives_now(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    await seed(publisher, pg)
    await start_service(archival_interval=timedelta(0), archival_max_inflight=10)
    await all_stored(pg)
    client = RequestReplyClient(redis, service="tester", instance="t2")
    try:
        out = await client.request(
            channels.DATABASE_COMMAND, "request_archival", {"older_than": "0s"}
        )
    finally:
        await client.close()
    assert out["rows"] == 13
    assert out["batches"] == len(await sent_batches(redis)) == 4  # (type, day) groups


async def test_batches_of_large_events_stay_under_redis_message_limit(
    start_service: Start, publisher: EventPublisher, pg: asyncpg.Connection, redis: Redis
) -> None:
    """Events with large attributes make batches of fewer rows: a batch of `batch_rows` of them
    would exceed Redis's `proto-max-bulk-len`, be refused on every send, and wedge retention."""
    old = datetime.now(UTC) - timedelta(days=10)
    big = {"blob": "x" * 100_000}
    events = [
        entity_event(publisher, "created", f"big-{i}", 1, occurred_at=old + timedelta(seconds=i))
        for i in range(30)
    ]
    for event in events:
        event.payload["attributes"] = big
        await publisher.publish_events([event])
    limit = (await redis.config_get("proto-max-bulk-len"))["proto-max-bulk-len"]
    await redis.config_set("proto-max-bulk-len", 1024 * 1024)  # 1mb, the least Redis takes
    try:
        await start_service(archival_interval=timedelta(0), archival_batch_bytes=512 * 1024)

        async def stored() -> bool:
            return await count(pg, "SELECT count(*) FROM entity_events") == 30

        await wait_for(stored)
        client = RequestReplyClient(redis, service="tester", instance="t3")
        try:
            out = await client.request(
                channels.DATABASE_COMMAND, "request_archival", {"older_than": "0s"}, timeout=30
            )
        finally:
            await client.close()
    finally:
        await redis.config_set("proto-max-bulk-len", limit)
    batches = await sent_batches(redis)
    assert out["rows"] == 30
    assert sum(len(b["rows"]) for b in batches) == 30
    assert {r["entity_id"] for b in batches for r in b["rows"]} == {f"big-{i}" for i in range(30)}
    assert all(1 <= len(b["rows"]) <= 5 for b in batches)  # ~100 KB each, 512 KiB a batch
