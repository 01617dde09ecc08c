"""A due backfill replays only once the database has stored every event up to its end
(`unstored`, pure), and waits instead (`BackfillManager` with a stubbed progress reader)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from analytics_engine.calculation import backfill
from analytics_engine.calculation.backfill import (
    REPLAY_CHANNEL_PREFIX,
    STORED_CHANNELS,
    BackfillManager,
    GroupProgress,
    owner_tag,
    stored_bound,
    unstored,
)
from analytics_engine.core import channels
from analytics_engine.core.payloads import StreamSubscribe
from analytics_engine.kpi import KPIResult, VersionedKPIDefinition

CREATED, UPDATED = channels.ENTITY_CREATED, channels.ENTITY_UPDATED
BOUND = (1000, 0)  # entries of ms 0..999 must be stored
DONE = GroupProgress(last_generated=(2000, 0), last_delivered=(2000, 0), oldest_pending=None)


def both(created: GroupProgress, updated: GroupProgress = DONE) -> dict[str, GroupProgress]:
    return {CREATED: created, UPDATED: updated}


def test_bound_covers_the_milliseconds_up_to_and_including_until() -> None:
    until = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=1500)
    ms = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp() * 1000) + 1
    assert stored_bound(until) == (ms + 1, 0)
    assert stored_bound(until - timedelta(microseconds=500)) == (ms + 1, 0)


def test_ready_when_delivered_past_the_bound_and_nothing_before_it_pending() -> None:
    assert unstored(both(DONE), BOUND) is None
    # delivered past the bound; what is pending is after it
    assert unstored(both(GroupProgress((3000, 0), (1500, 0), (1200, 0))), BOUND) is None
    # delivered exactly at the bound
    assert unstored(both(GroupProgress((3000, 0), (1000, 0), None)), BOUND) is None


def test_ready_when_everything_there_is_was_delivered_although_before_the_bound() -> None:
    """An idle stream: its last entry is older than the bound and was delivered and stored."""
    assert unstored(both(GroupProgress((500, 3), (500, 3), None)), BOUND) is None


@pytest.mark.parametrize(
    "progress",
    [
        GroupProgress((2000, 0), (999, 0), None),  # not yet read up to the bound
        GroupProgress((999, 5), (999, 4), None),  # one entry before the bound unread
        GroupProgress((2000, 0), (2000, 0), (999, 9)),  # read, not yet stored (pending)
        GroupProgress((2000, 0), (2000, 0), (10, 0)),
        GroupProgress((500, 0), (500, 0), (500, 0)),  # idle, but its last entry pending
        GroupProgress((2000, 0), None, None),  # the database never created its group
    ],
)
def test_not_ready(progress: GroupProgress) -> None:
    assert unstored(both(progress), BOUND) is not None
    assert unstored(both(DONE, progress), BOUND) is not None
    assert CREATED in (unstored(both(progress), BOUND) or "")


def test_a_stream_never_written_needs_nothing_stored() -> None:
    assert unstored(both(GroupProgress(None, None, None)), BOUND) is None
    # created empty by another group (MKSTREAM), the database group not yet there
    assert unstored(both(GroupProgress((0, 0), None, None)), BOUND) is None


def test_deactivations_are_not_checked() -> None:
    assert channels.ENTITY_DEACTIVATED not in STORED_CHANNELS
    assert set(STORED_CHANNELS) == {CREATED, UPDATED}


class _Publisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []

    async def publish(self, channel: str, payload: dict[str, Any]) -> None:
        self.published.append((channel, payload))


def _manager(on_results: Any, *, watermark: Any, **extra: Any) -> BackfillManager:
    """A manager with no Redis (tests replace `replay`), a 1-minute horizon and no delay."""
    return BackfillManager(
        redis=None,  # type: ignore[arg-type]
        publisher=_Publisher(),  # type: ignore[arg-type]
        horizon=timedelta(minutes=1),
        delay=timedelta(0),
        max_events=1000,
        on_results=on_results,
        watermark=watermark,
        ready_retry_s=0.0,
        **extra,
    )


async def test_a_due_backfill_waits_for_the_database_then_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    progress = both(GroupProgress((2**50, 0), (1, 0), None))

    async def read(_redis: Any) -> dict[str, GroupProgress]:
        return progress

    monkeypatch.setattr(backfill, "database_progress", read)
    replays: list[str] = []

    async def replay(job: backfill.BackfillJob, _work: Any) -> None:
        replays.append(job.code)

    async def on_results(_results: Any) -> None:
        return None

    manager = _manager(on_results, watermark=lambda: None)
    monkeypatch.setattr(manager, "replay", replay)
    definition = VersionedKPIDefinition.model_validate(
        {
            "code": "orders_count",
            "display_name": "orders",
            "entity_type": "order",
            "aggregation": "count",
            "window": {"type": "tumbling", "size": "2s", "allowed_lateness": "0s"},
            "version": 1,
        }
    )
    job = manager.schedule(definition, datetime.now(UTC) - timedelta(minutes=5))
    await manager._run_due()
    await manager._run_due()
    assert replays == []
    assert manager.status("orders_count") == "backfill_pending"
    assert job.attempts == 0  # waiting is no failed attempt
    waiting = (manager.pending("orders_count") or {})["waiting_for_database"]
    assert CREATED in waiting
    progress = both(DONE)
    progress[CREATED] = GroupProgress((2**50, 0), (2**50, 0), None)
    await manager._run_due()
    assert replays == ["orders_count"]
    assert manager.status("orders_count") == "backfilled"
    assert job.waiting is None


async def test_a_backfill_too_large_is_abandoned_at_its_first_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retrying would replay the same oversized history again (up to
    CALCULATION_BACKFILL_MAX_EVENTS events each time) to the same end."""

    async def read(_redis: Any) -> dict[str, GroupProgress]:
        return both(DONE)

    monkeypatch.setattr(backfill, "database_progress", read)
    replays: list[str] = []

    async def replay(job: backfill.BackfillJob, _work: Any) -> None:
        replays.append(job.code)
        raise backfill.BackfillTooLarge("more than 1000 events held")

    async def on_results(_results: Any) -> None:
        return None

    outcomes: list[str] = []
    live_watermark: list[datetime | None] = [None]
    manager = _manager(on_results, watermark=lambda: live_watermark[0], on_outcome=outcomes.append)
    monkeypatch.setattr(manager, "replay", replay)
    definition = VersionedKPIDefinition.model_validate(
        {
            "code": "orders_count",
            "display_name": "orders",
            "entity_type": "order",
            "aggregation": "count",
            "window": {"type": "tumbling", "size": "2s", "allowed_lateness": "0s"},
            "version": 1,
        }
    )
    job = manager.schedule(definition, datetime.now(UTC) - timedelta(minutes=5))
    for _ in range(3):
        await manager._run_due()
    assert (replays, outcomes) == (["orders_count"], ["failed"])
    assert manager.status("orders_count") == "backfill_failed"
    assert manager.pending("orders_count") is None
    # kept (so the live engine's results for its windows stay suppressed) until those
    # windows can no longer close live: the watermark is past its end
    live_watermark[0] = job.until
    await manager._run_due()
    assert "orders_count" not in manager.jobs


async def test_an_abandoned_backfill_still_suppresses_the_live_results_of_its_windows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The live engine lags (a backlog after a restart) when the backfill is abandoned: the
    new version's live state holds the windows open at the cut with only the events after it.
    Before the fix the job was dropped at once, and those windows were published with the
    partial values (stored as the new version's results, which `verify` reports wrong): an
    abandoned backfill's windows get no result."""

    async def read(_redis: Any) -> dict[str, GroupProgress]:
        return both(DONE)

    monkeypatch.setattr(backfill, "database_progress", read)

    async def replay(_job: backfill.BackfillJob, _work: Any) -> None:
        raise backfill.BackfillTooLarge("more than 1000 events held")

    async def on_results(_results: Any) -> None:
        return None

    definition = VersionedKPIDefinition.model_validate(
        {
            "code": "orders_count",
            "display_name": "orders",
            "entity_type": "order",
            "aggregation": "count",
            "window": {"type": "tumbling", "size": "2s", "allowed_lateness": "0s"},
            "version": 1,
        }
    )
    cut_at = datetime.now(UTC) - timedelta(minutes=5)
    lagging = cut_at + timedelta(seconds=1)  # the live engine, reading its backlog
    manager = _manager(on_results, watermark=lambda: lagging)
    monkeypatch.setattr(manager, "replay", replay)
    job = manager.schedule(definition, cut_at)
    await manager._run_due()
    start = job.until - timedelta(seconds=2)  # the last window before the cut, open at it
    assert start < job.cut < job.until
    partial = KPIResult(
        kpi_code="orders_count",
        value=1.0,
        window_start=start,
        window_end=start + timedelta(seconds=2),
        dimensions={},
        sample_count=1,
        definition_version=1,
        computed_at=datetime.now(UTC),
    )
    assert manager.suppressed(partial)


def count_kpi(code: str, version: int) -> VersionedKPIDefinition:
    return VersionedKPIDefinition.model_validate(
        {
            "code": code,
            "display_name": code,
            "entity_type": "order",
            "aggregation": "count",
            "window": {"type": "tumbling", "size": "2s", "allowed_lateness": "0s"},
            "version": version,
        }
    )


async def test_a_job_scheduled_while_another_replays_is_not_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """KPI b's completed job is due to be dropped, and b changes while the run loop waits on
    a's replay. Before the fix the loop, reaching b's completed job in the list it started
    from, dropped the code's job, which was b's new one by then: the new version was never
    backfilled and its live results before the cut were no longer suppressed."""

    async def read(_redis: Any) -> dict[str, GroupProgress]:
        return both(DONE)

    monkeypatch.setattr(backfill, "database_progress", read)
    cut_at = datetime.now(UTC) - timedelta(minutes=5)

    async def on_results(_results: Any) -> None:
        return None

    # the live watermark is past both jobs' ends
    manager = _manager(on_results, watermark=lambda: cut_at + timedelta(minutes=1))
    changed: list[backfill.BackfillJob] = []

    async def replay(job: backfill.BackfillJob, _work: Any) -> None:
        if job.code == "a":  # b is redefined meanwhile
            changed.append(manager.schedule(count_kpi("b", 2), cut_at + timedelta(seconds=30)))

    monkeypatch.setattr(manager, "replay", replay)
    manager.schedule(count_kpi("a", 1), cut_at)
    manager.schedule(count_kpi("b", 1), cut_at).done = True
    await manager._run_due()
    assert manager.jobs["b"] is changed[0]
    assert manager.status("b") == "backfill_pending"


@pytest.mark.parametrize("owner", ["calculation-engine-0", "x.y", "a" * 300])
def test_subscription_ids_are_valid_stream_subscribe_payloads(owner: str) -> None:
    """Whatever the consumer name, the engine's subscription ids and replay channels satisfy
    the published `stream.subscribe` schema (a `:` or a long name would not)."""
    subscription_id = f"{owner_tag(owner)}-{uuid.uuid4()}"
    StreamSubscribe.model_validate(
        {
            "subscription_id": subscription_id,
            "entity_type": "order",
            "since": "2026-12-03T00:00:00Z",
            "channel": f"{REPLAY_CHANNEL_PREFIX}{subscription_id}",
        }
    )
    assert owner_tag(owner) != owner_tag(owner + "0")
