"""Definitions across a restart of the Calculation Engine, against a real Redis checkpoint: the
`KPI_DEFINITIONS_DIR` as it is now wins for the definitions that came from it (an edit is a new
version, backfilled; a deleted file stops its KPI), while the metadata service's definitions the
checkpoint ran with stand in until it answers. Checkpoints written before origins were recorded
(`legacy`) restore the same way."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from calc_helpers import StandInMetadata, kpi, published_results, tumbling, wait_for, write_kpi_dir
from redis.asyncio import Redis

from analytics_engine.calculation.backfill import cut_after
from analytics_engine.calculation.service import CalculationService, Settings, build
from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher
from analytics_engine.core.envelopes import Event, utcnow
from analytics_engine.kpi import VersionedKPIDefinition

pytestmark = pytest.mark.asyncio

CHECKPOINT_KEY = "ae:calc:checkpoint"
BIG = kpi("big_orders", "order", "count", tumbling("1s", "0s"), filter="amount > 100")
GONE = kpi("gone_orders", "order", "count", tumbling("1s", "0s"))


def settings(redis_url: str, kpi_dir: str, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "calculation_port": 0,
        "instance_id": "calc-restart-test",
        "kpi_definitions_dir": kpi_dir,
        "checkpoint_key": CHECKPOINT_KEY,
        "metadata_timeout_s": 0.5,
        "heartbeat_interval_s": 60,
        "backfill_enabled": True,
        "backfill_delay": "1h",  # scheduled, never run here (no database to replay from)
        **over,
    }
    return Settings(**values)


@contextlib.asynccontextmanager
async def serving(s: Settings) -> AsyncIterator[CalculationService]:
    """The engine, started; stopped (with its final checkpoint) on leaving."""
    service = build(s)
    task = asyncio.create_task(service.runtime.run())
    ready = asyncio.create_task(service.runtime.ready.wait())
    done, _ = await asyncio.wait([ready, task], timeout=10, return_when="FIRST_COMPLETED")
    if task in done:
        task.result()
    assert ready in done, "runtime did not become ready"
    try:
        yield service
    finally:
        service.runtime.stop()
        await asyncio.wait_for(task, 30)


def order(event_id: str, at: datetime, amount: float) -> Event:
    payload = {
        "entity_type": "order",
        "entity_id": event_id,
        "version": 1,
        "occurred_at": at.isoformat(),
        "attributes": {"amount": amount},
    }
    return Event(
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, event_id)),  # entity events: UUIDs
        event_type=channels.ENTITY_CREATED,
        source="data_simulator",
        timestamp=at,
        payload=payload,
    )


async def publish(redis: Redis, events: list[Event]) -> None:
    publisher = EventPublisher(redis, source="data_simulator", stream_maxlen=10_000)
    await publisher.publish_events(events)


async def stored_checkpoint(redis: Redis, *, legacy: bool) -> dict[str, Any]:
    """The checkpoint as stored; with `legacy`, rewritten as a version before origins were
    recorded wrote it."""
    raw = await redis.get(CHECKPOINT_KEY)
    assert raw is not None, "no checkpoint"
    data: dict[str, Any] = orjson.loads(raw)
    if legacy:
        old = {k: v for k, v in data.items() if k != "definition_origins"}
        await redis.set(CHECKPOINT_KEY, orjson.dumps(old))
    return data


@pytest.mark.parametrize("legacy", [False, True])
async def test_directory_edits_and_deletions_take_effect_at_a_restart(
    redis: Redis, redis_url: str, tmp_path: Path, legacy: bool
) -> None:
    s = settings(redis_url, write_kpi_dir(tmp_path, [BIG, GONE]))
    async with serving(s) as first:
        await publish(redis, [order("e-1", utcnow(), 300.0)])
        await wait_for(lambda: first.processor.events_processed == 1, timeout=15)
    checkpoint = await stored_checkpoint(redis, legacy=legacy)
    assert checkpoint["definition_origins"] == {
        "big_orders": "directory",
        "gone_orders": "directory",
    }

    # while the engine is down: one file edited, the other deleted
    (tmp_path / "big_orders.yaml").write_text(yaml.safe_dump({**BIG, "filter": "amount > 500"}))
    (tmp_path / "gone_orders.yaml").unlink()
    async with serving(s) as second:
        running = second.processor.engine.definitions
        assert set(running) == {"big_orders"}
        edited = running["big_orders"]
        assert (edited.filter, edited.version) == ("amount > 500", 1)
        assert second.registry.source_of("big_orders") == "directory"
        # a definition change: backfilled from where the checkpoint's state ended
        job = second.backfills.jobs["big_orders"]
        assert job.definition == edited
        assert job.cut == cut_after(second.processor.engine.watermark)
        # and counted with the file's filter from then on
        later = max(utcnow(), job.cut + timedelta(seconds=1))
        await publish(redis, [order("e-2", later, 300.0), order("e-3", later, 600.0)])
        await wait_for(lambda: bool(second.cache.latest("big_orders")), timeout=15)
        [result] = second.cache.latest("big_orders")
        assert (result["value"], result["definition_version"]) == (1.0, 1)
    assert all(
        datetime.fromisoformat(r["window_start"]) < job.cut
        for r in await published_results(redis)
        if r["kpi_code"] == "gone_orders"
    )

    # a restart with the directory unchanged is no redefinition: same version, same backfill
    async with serving(s) as third:
        assert third.processor.engine.definitions == {"big_orders": edited}
        assert third.backfills.jobs["big_orders"].cut == job.cut

    # edited again while its backfill is still pending: the new one reaches back to where the
    # pending one began (nothing published the windows it was to publish)
    (tmp_path / "big_orders.yaml").write_text(yaml.safe_dump({**BIG, "filter": "amount > 700"}))
    async with serving(s) as fourth:
        assert fourth.processor.engine.definitions["big_orders"].version == 2
        again = fourth.backfills.jobs["big_orders"]
        assert again.definition.version == 2
        assert again.cut >= job.cut
        assert again.since == job.since


async def test_a_directory_definition_deleted_or_disabled_keeps_counting_its_versions(
    redis: Redis, redis_url: str, tmp_path: Path
) -> None:
    """A file deleted and re-created, or disabled and enabled again, across restarts: each
    different definition is a new version. Before the fix the checkpoint held the versions of
    the running definitions only, so a code the directory stopped or disabled started again
    from version 0, a number its earlier results already carried for another definition."""
    s = settings(redis_url, write_kpi_dir(tmp_path, [BIG]))
    path = tmp_path / "big_orders.yaml"
    seen: list[tuple[int, str | None, bool]] = []

    async def restart() -> None:
        async with serving(s) as service:
            running = service.processor.engine.definitions.get("big_orders")
            definition = service.registry.effective().get("big_orders")
            if definition is not None:
                assert running in (None, definition)
                seen.append((definition.version, definition.filter, definition.enabled))

    await restart()  # v0
    path.write_text(yaml.safe_dump({**BIG, "filter": "amount > 200"}))
    await restart()  # v1
    path.unlink()
    await restart()  # stopped
    path.write_text(yaml.safe_dump({**BIG, "filter": "amount > 300"}))
    await restart()  # re-created: v2
    path.write_text(yaml.safe_dump({**BIG, "filter": "amount > 300", "enabled": False}))
    await restart()  # disabled: v3
    await restart()  # still disabled: v3
    path.write_text(yaml.safe_dump({**BIG, "filter": "amount > 400"}))
    await restart()  # enabled again: v4
    assert seen == [
        (0, "amount > 100", True),
        (1, "amount > 200", True),
        (2, "amount > 300", True),
        (3, "amount > 300", False),
        (3, "amount > 300", False),
        (4, "amount > 400", True),
    ]


@pytest.mark.parametrize("legacy", [False, True])
async def test_metadata_definitions_stand_in_until_the_metadata_service_answers(
    redis: Redis, redis_url: str, tmp_path: Path, legacy: bool
) -> None:
    # the directory defines the code too: the metadata service's definition wins for it
    own = kpi("orders_meta", "order", "count", tumbling("1s", "0s"), filter="amount > 1")
    dir_only = kpi("dir_only", "order", "count", tumbling("1s", "0s"))
    s = settings(redis_url, write_kpi_dir(tmp_path, [own, dir_only]), resync_interval_s=0.5)
    v3 = {**own, "filter": "amount > 100", "version": 3}
    metadata = StandInMetadata(redis, {"orders_meta": v3})
    await metadata.server.start()
    try:
        async with serving(s) as first:
            assert first.processor.engine.definitions["orders_meta"].version == 3
            await publish(redis, [order("e-1", utcnow(), 300.0)])
            await wait_for(lambda: first.processor.events_processed == 1, timeout=15)
    finally:
        await metadata.server.stop()
    checkpoint = await stored_checkpoint(redis, legacy=legacy)
    assert checkpoint["definition_origins"] == {"dir_only": "directory", "orders_meta": "metadata"}

    async with serving(s) as second:  # no metadata service
        running = second.processor.engine.definitions
        assert running["orders_meta"] == VersionedKPIDefinition.model_validate(v3)
        assert second.registry.source_of("orders_meta") == "metadata"
        assert running["dir_only"].version == 0
        assert second.backfills.jobs == {}  # resumed, not redefined
        metadata = StandInMetadata(redis, {"orders_meta": {**v3, "version": 4}})
        await metadata.server.start()
        try:
            await wait_for(
                lambda: second.processor.engine.definitions["orders_meta"].version == 4,
                timeout=15,
            )
        finally:
            await metadata.server.stop()
        assert set(second.backfills.jobs) == {"orders_meta"}
