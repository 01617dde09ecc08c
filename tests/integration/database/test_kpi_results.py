"""KPIResultConsumer: results upserted by key and forwarded once to archive.kpi_results."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher
from analytics_engine.core.errors import RemoteError
from analytics_engine.core.request_reply import RequestReplyClient

from .conftest import Start, count, wait_for


def result(
    value: float,
    *,
    region: str = "eu",
    start: str = "2024-01-01T00:00:00Z",
    computed_at: str = "2024-01-01T00:01:10Z",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "kpi_code": "orders_revenue",
        "value": value,
        "window_start": start,
        "window_end": start.replace("00:00:00", "00:01:00"),
        "dimensions": {"region": region, "channel": "web"},
        "sample_count": 3,
        "definition_version": 1,
        "computed_at": computed_at,
        **extra,
    }


async def forwarded(redis: Redis) -> list[dict[str, Any]]:
    entries = await redis.xrange(channels.stream_key(channels.ARCHIVE_KPI_RESULTS))
    return [orjson.loads(fields[b"m"]) for _, fields in entries]


async def test_results_are_upserted_by_key_and_forwarded_once_per_change(
    start_service: Start, redis: Redis, pg: asyncpg.Connection
) -> None:
    publisher = EventPublisher(redis, source="calculation_engine", stream_maxlen=10_000)
    await start_service()
    first = await publisher.publish(channels.KPI_CALCULATED, result(10.0))
    await publisher.publish(channels.KPI_CALCULATED, result(5.0, region="us"))
    await wait_for(lambda: _n_forwarded(redis, 2))
    # redelivery of the same event, and a recomputation with the same value: no new forward
    await publisher.publish_events([first])
    await publisher.publish(
        channels.KPI_CALCULATED, result(10.0, computed_at="2024-01-01T00:02:00Z")
    )
    # a changed value: stored and forwarded again
    await publisher.publish(
        channels.KPI_CALCULATED, result(12.5, computed_at="2024-01-01T00:03:00Z")
    )
    await wait_for(lambda: _n_forwarded(redis, 3))
    await wait_for(lambda: _all_forwarded(pg))
    assert await count(pg, "SELECT count(*) FROM kpi_results") == 2
    row = await pg.fetchrow("SELECT * FROM kpi_results WHERE dimensions->>'region' = 'eu'")
    assert row["value"] == 12.5
    assert row["dims_key"] == '{"channel":"web","region":"eu"}'
    assert orjson.loads(row["dimensions"]) == {"region": "eu", "channel": "web"}
    assert row["forwarded"] is True
    out = await forwarded(redis)
    assert len(out) == 3
    assert [e["payload"]["value"] for e in out] == [10.0, 5.0, 12.5]
    assert out[0]["source"] == "database_service"
    assert out[0]["payload"]["dimensions"] == {"region": "eu", "channel": "web"}
    assert out[0]["payload"]["window_start"] == "2024-01-01T00:00:00+00:00"


async def test_an_older_computation_does_not_replace_a_newer_one(
    start_service: Start, redis: Redis, pg: asyncpg.Connection
) -> None:
    publisher = EventPublisher(redis, source="calculation_engine", stream_maxlen=10_000)
    await start_service()
    await publisher.publish(
        channels.KPI_CALCULATED, result(7.0, computed_at="2024-01-01T01:00:00Z")
    )
    await wait_for(lambda: _n_forwarded(redis, 1))
    await publisher.publish(
        channels.KPI_CALCULATED, result(1.0, computed_at="2024-01-01T00:30:00Z")
    )
    await publisher.publish(channels.KPI_CALCULATED, result(8.0, region="x"))
    await wait_for(lambda: _n_forwarded(redis, 2))
    assert await pg.fetchval("SELECT value FROM kpi_results WHERE dims_key LIKE '%eu%'") == 7.0


async def test_invalid_results_are_dead_lettered_and_valid_ones_in_the_batch_stored(
    start_service: Start, redis: Redis, pg: asyncpg.Connection
) -> None:
    publisher = EventPublisher(redis, source="calculation_engine", stream_maxlen=10_000)
    await publisher.publish_many(
        [
            (channels.KPI_CALCULATED, result(1.0)),
            (channels.KPI_CALCULATED, result(1.0, kpi_code="Bad Code")),
            (channels.KPI_CALCULATED, result(1.0, window_end="2023-01-01T00:00:00Z")),
            (channels.KPI_CALCULATED, result(2.0, region="us")),
        ]
    )
    await start_service()
    await wait_for(lambda: _n_forwarded(redis, 2))
    dlq = await redis.xrange(channels.dead_letter_key(channels.KPI_CALCULATED))
    assert len(dlq) == 2
    reasons = " ".join(f[b"reason"].decode() for _, f in dlq)
    assert "kpi_code" in reasons and "window_end" in reasons
    assert await count(pg, "SELECT count(*) FROM kpi_results") == 2


def _window(start_minute: int, minutes: int, version: int, **dimensions: str) -> dict[str, Any]:
    start = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=start_minute)
    return {
        "kpi_code": "orders_revenue",
        "value": float(start_minute),
        "window_start": start.isoformat(),
        "window_end": (start + timedelta(minutes=minutes)).isoformat(),
        "dimensions": dimensions,
        "sample_count": 1,
        "definition_version": version,
        "computed_at": "2024-01-02T00:00:00Z",
    }


async def test_history_and_latest_values_leave_out_what_a_newer_version_recomputed(
    start_service: Start, redis: Redis, pg: asyncpg.Connection
) -> None:
    """Version 1: one-minute windows by region. Version 2 (five-minute windows by currency)
    first publishes a live window from minute 10, then its backfill from minute 5: the history
    holds, for each moment, the results of the version that covers it, and the latest values
    only version 2's groups."""
    publisher = EventPublisher(redis, source="calculation_engine", stream_maxlen=10_000)
    client = RequestReplyClient(redis, service="cli", instance="t1", default_timeout=15)
    await start_service()

    async def history() -> list[tuple[int, str, int]]:
        return await _history(client)

    async def latest() -> set[tuple[str, int]]:
        reply = await client.request(
            channels.DATABASE_QUERY, "latest_kpi_values", {"kpi_code": "orders_revenue"}
        )
        return {
            (next(iter(r["dimensions"].values())), r["definition_version"]) for r in reply["rows"]
        }

    try:
        await publisher.publish_many(
            [
                (channels.KPI_CALCULATED, _window(minute, 1, 1, region=region))
                for minute in range(10)
                for region in ("eu", "us")
            ]
        )
        await wait_for(lambda: _n_forwarded(redis, 20))
        assert len(await history()) == 20
        assert await latest() == {("eu", 1), ("us", 1)}

        await publisher.publish(channels.KPI_CALCULATED, _window(10, 5, 2, currency="EUR"))
        await wait_for(lambda: _n_forwarded(redis, 21))
        assert len(await history()) == 21  # no version 1 window starts at minute 10 or later
        assert await latest() == {("EUR", 2)}

        await publisher.publish(channels.KPI_CALCULATED, _window(5, 5, 2, currency="EUR"))
        await wait_for(lambda: _n_forwarded(redis, 22))
        assert await history() == [
            *((minute, region, 1) for minute in range(5) for region in ("eu", "us")),
            (5, "EUR", 2),
            (10, "EUR", 2),
        ]
        # the superseded results stay stored (and archived), with their version
        assert await count(pg, "SELECT count(*) FROM kpi_results") == 22

        # a late version 1 result (a lagging engine) does not come back into the history
        await publisher.publish(channels.KPI_CALCULATED, _window(7, 1, 1, region="asia"))
        await wait_for(lambda: _n_forwarded(redis, 23))
        assert ("asia" in {region for _, region, _ in await history()}) is False

        deleted = await client.request(
            channels.DATABASE_COMMAND, "purge_kpi_results", {"kpi_code": "orders_revenue"}
        )
        assert deleted["deleted"] == 23
        assert await count(pg, "SELECT count(*) FROM kpi_result_versions") == 0
    finally:
        await client.close()


async def test_a_version_begins_where_its_publisher_says(
    start_service: Start, redis: Redis, pg: asyncpg.Connection
) -> None:
    """Version 2's backfill reached back to minute 2 but found results only from minute 7 (a
    filter matching nothing before): its results say where it begins (`version_since`), so
    the history leaves out version 1's results from minute 2 on, not only from minute 7."""
    publisher, client = await _version_1_stored(start_service, redis, minutes=10)
    try:
        since = datetime(2024, 1, 1, 0, 2, tzinfo=UTC).isoformat()
        await publisher.publish(
            channels.KPI_CALCULATED, {**_window(7, 1, 2, region="eu"), "version_since": since}
        )
        await wait_for(lambda: _n_forwarded(redis, 11))
        assert await _history(client) == [(0, "eu", 1), (1, "eu", 1), (7, "eu", 2)]
        # a later result of the version without it (a live one) does not move it forward
        await publisher.publish(channels.KPI_CALCULATED, _window(8, 1, 2, region="eu"))
        await wait_for(lambda: _n_forwarded(redis, 12))
        assert await _history(client) == [(0, "eu", 1), (1, "eu", 1), (7, "eu", 2), (8, "eu", 2)]
    finally:
        await client.close()


async def test_record_kpi_version_supersedes_without_a_result(
    start_service: Start, redis: Redis, pg: asyncpg.Connection
) -> None:
    """Version 2's backfill found no window at all from minute 4 on: `record_kpi_version` says
    where it begins, the history leaves version 1 out from there; an earlier `since` moves the
    beginning back, a later one does not move it forward; a bad command gets a clear error."""
    _, client = await _version_1_stored(start_service, redis, minutes=6)
    try:

        async def record(minute: int, version: int = 2) -> dict[str, Any]:
            return dict(
                await client.request(
                    channels.DATABASE_COMMAND,
                    "record_kpi_version",
                    {
                        "kpi_code": "orders_revenue",
                        "definition_version": version,
                        "since": datetime(2024, 1, 1, 0, minute, tzinfo=UTC).isoformat(),
                    },
                )
            )

        reply = await record(4)
        assert reply["definition_version"] == 2
        assert datetime.fromisoformat(reply["since"]) == datetime(2024, 1, 1, 0, 4, tzinfo=UTC)
        assert [m for m, _, _ in await _history(client)] == [0, 1, 2, 3]
        await record(5)  # later: the version still begins at minute 4
        assert [m for m, _, _ in await _history(client)] == [0, 1, 2, 3]
        await record(2)
        assert [m for m, _, _ in await _history(client)] == [0, 1]
        with pytest.raises(RemoteError, match="definition_version"):
            await record(1, version=0)
        assert [m for m, _, _ in await _history(client)] == [0, 1]
    finally:
        await client.close()


async def _version_1_stored(
    start_service: Start, redis: Redis, *, minutes: int
) -> tuple[EventPublisher, RequestReplyClient]:
    """A database service holding version 1 of `orders_revenue` for the first `minutes` minutes
    of 2024-01-01 (value = the minute), all forwarded; the engine's publisher and a client."""
    publisher = EventPublisher(redis, source="calculation_engine", stream_maxlen=10_000)
    client = RequestReplyClient(redis, service="cli", instance="t1", default_timeout=15)
    await start_service()
    await publisher.publish_many(
        [(channels.KPI_CALCULATED, _window(minute, 1, 1, region="eu")) for minute in range(minutes)]
    )
    await wait_for(lambda: _n_forwarded(redis, minutes))
    return publisher, client


async def _history(client: RequestReplyClient) -> list[tuple[int, str, int]]:
    """`orders_revenue`'s history on 2024-01-01: (value, the dimension's value, version)."""
    reply = await client.request(
        channels.DATABASE_QUERY,
        "kpi_history",
        {"kpi_code": "orders_revenue", "start": "2024-01-01T00:00Z", "end": "2024-01-02"},
    )
    return [
        (int(r["value"]), next(iter(r["dimensions"].values())), r["definition_version"])
        for r in reply["rows"]
    ]


async def _n_forwarded(redis: Redis, n: int) -> bool:
    return len(await forwarded(redis)) >= n


async def _all_forwarded(pg: asyncpg.Connection) -> bool:
    return await count(pg, "SELECT count(*) FROM kpi_results WHERE NOT forwarded") == 0
