"""Pure helpers of the calculation engine: backfill planning/computation, query values,
result events, the definition registry, the latest-result cache."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from analytics_engine.calculation.backfill import (
    BackfillJob,
    BackfillManager,
    Coverage,
    backfill_since,
    compute,
    needed_attributes,
    plan,
)
from analytics_engine.calculation.cache import LatestResults
from analytics_engine.calculation.events import EntityEvent, result_events
from analytics_engine.calculation.queries import first_value, slot_params
from analytics_engine.calculation.registry import DefinitionRegistry
from analytics_engine.core import channels
from analytics_engine.kpi import KPIDefinition, KPIEngine, KPIResult, VersionedKPIDefinition
from analytics_engine.kpi.windows import to_micros

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def revenue(version: int = 1, **over: object) -> VersionedKPIDefinition:
    data = {
        "code": "revenue",
        "display_name": "Revenue",
        "entity_type": "order",
        "aggregation": "sum",
        "field": "amount",
        "filter": "status != 'cancelled'",
        "group_by": ["region"],
        "window": {"type": "tumbling", "size": "10s", "allowed_lateness": "2s"},
        "version": version,
        **over,
    }
    return VersionedKPIDefinition.model_validate(data)


def test_plan_covers_whole_windows_before_the_cut() -> None:
    job = plan(revenue(), T0 + timedelta(seconds=125), timedelta(seconds=60))
    assert job.since == T0 + timedelta(seconds=60)  # 65 s aligned down to the 10 s grid
    assert job.until == T0 + timedelta(seconds=132)  # last window [120,130) closes at 132
    sliding = revenue(window={"type": "sliding", "size": "10s", "slide": "5s"})
    job = plan(sliding, T0 + timedelta(seconds=125), timedelta(seconds=60))
    assert job.since == T0 + timedelta(seconds=65)
    assert job.until == T0 + timedelta(seconds=130)  # window [120,130) closes at 130
    assert needed_attributes(revenue()) == {"amount", "region", "status"}


def test_plan_reaches_back_to_the_first_window_still_open_at_the_cut() -> None:
    """The live engine suppresses every window starting before the cut, so the backfill must
    cover all of those still open there, even when they start before `cut - horizon`."""
    hour, minute = timedelta(hours=1), timedelta(minutes=1)
    sliding = revenue(window={"type": "sliding", "size": "2h", "slide": "5m"})
    job = plan(sliding, T0 + 3 * hour + 6 * minute, hour)  # horizon alone: 02:05
    assert job.since == T0 + hour + 10 * minute  # [01:10, 03:10) closes after 03:06
    assert job.until == T0 + 5 * hour + 5 * minute  # the last one, [03:05, 05:05)
    late = revenue(window={"type": "tumbling", "size": "30m", "allowed_lateness": "5h"})
    job = plan(late, T0 + 8 * hour + 6 * minute, hour)  # horizon alone: 07:00
    assert job.since == T0 + 3 * hour  # [03:00, 03:30) closes at 08:30
    # a window closing exactly at the watermark is closed: the first open one is the next
    watermark = to_micros(T0 + timedelta(seconds=132))
    window = revenue().definition().window
    assert window is not None
    assert backfill_since(window, watermark + 1, 0) == to_micros(T0 + timedelta(seconds=130))
    assert backfill_since(window, watermark + 2, 0) == to_micros(T0 + timedelta(seconds=130))
    assert backfill_since(window, watermark, 0) == to_micros(T0 + timedelta(seconds=120))


def cut_over(
    definition: dict[str, object], minutes: int, cut_after: int, horizon: timedelta
) -> tuple[BackfillJob, dict[datetime, float], dict[datetime, float]]:
    """One event a minute for `minutes`; the KPI changes to version 2 after `cut_after`
    events. Returns the job, what the engine publishes for version 2 (live results not
    suppressed + the backfill) and the reference (version 2 over every event)."""
    v1 = VersionedKPIDefinition.model_validate({**definition, "version": 1})
    v2 = VersionedKPIDefinition.model_validate({**definition, "version": 2, "filter": "n > 0"})
    events = [ev(i, i * 60, i * 60, n=1) for i in range(minutes)]
    live = KPIEngine(clock=lambda: T0)
    live.set_definitions([v1])
    for e in events[:cut_after]:
        live.process(e)
    live.drain_results()
    live.set_definitions([v2])
    assert live.watermark is not None
    manager = backfill_manager(horizon)
    job = manager.schedule(v2, live.watermark)
    for e in events[cut_after:]:
        live.process(e)
    live.advance(T0 + timedelta(days=30))
    published = {r.window_start: r.value for r in live.drain_results() if not manager.suppressed(r)}
    backfilled = compute(job, list(events))
    assert not published.keys() & {r.window_start for r in backfilled}  # each window once
    published |= {r.window_start: r.value for r in backfilled}
    reference = KPIEngine(clock=lambda: T0)
    reference.set_definitions([v2])
    for e in events:
        reference.process(e)
    reference.advance(T0 + timedelta(days=30))
    return job, published, {r.window_start: r.value for r in reference.drain_results()}


@pytest.mark.parametrize(
    ("window", "minutes", "cut_after", "lost_before_the_fix"),
    [
        ({"type": "sliding", "size": "2h", "slide": "5m"}, 6 * 60, 3 * 60 + 7, 11),
        ({"type": "tumbling", "size": "30m", "allowed_lateness": "5h"}, 12 * 60, 8 * 60 + 7, 8),
        ({"type": "tumbling", "size": "5m", "allowed_lateness": "1m"}, 3 * 60, 60 + 3, 0),
    ],
)
def test_no_window_open_at_a_definition_change_is_lost(
    window: dict[str, str], minutes: int, cut_after: int, lost_before_the_fix: int
) -> None:
    """The reviewer's cases: every window of the new version starting at or after the
    backfill's `since` is published once, with the reference value; that includes every
    window still open at the cut (before the fix, a 1h horizon lost some)."""
    definition = {
        "code": "orders",
        "display_name": "Orders",
        "entity_type": "order",
        "aggregation": "count",
        "window": window,
    }
    job, published, reference = cut_over(definition, minutes, cut_after, timedelta(hours=1))
    w = job.definition.window
    assert w is not None
    close_offset = w.size + w.allowed_lateness
    open_at_cut = {s for s in reference if s < job.cut < s + close_offset}
    step = to_micros(w.slide or w.size)
    horizon_only = to_micros(job.cut - timedelta(hours=1))
    horizon_only -= horizon_only % step  # where the backfill started before the fix
    assert len({s for s in open_at_cut if to_micros(s) < horizon_only}) == lost_before_the_fix
    assert open_at_cut <= published.keys()
    assert published == {s: v for s, v in reference.items() if s >= job.since}


def test_an_event_at_the_watermark_on_the_window_grid_is_counted_once() -> None:
    """The change comes right after the live engine took in an event that occurred and was
    published at a window's start (producers stamping whole seconds or milliseconds). The
    window starting there must come from the backfill: the new version's live state never saw
    that event (before the fix the cut was the watermark itself, the window was left to the
    live engine and published without the event)."""
    definition: dict[str, object] = {
        "code": "orders",
        "display_name": "Orders",
        "entity_type": "order",
        "aggregation": "count",
        "window": {"type": "tumbling", "size": "5m", "allowed_lateness": "1m"},
    }
    job, published, reference = cut_over(definition, 3 * 60, 60 + 1, timedelta(hours=1))
    on_grid = T0 + timedelta(hours=1)  # the last event before the change, a window's start
    assert published[on_grid] == reference[on_grid] == 5
    assert job.cut > on_grid
    assert published == {s: v for s, v in reference.items() if s >= job.since}


def test_a_window_closing_just_after_the_watermark_is_backfilled() -> None:
    """The last event before the change was published 1 µs before a window's close: the
    window is still open at the watermark (dropped with the old version's state, suppressed
    live), so it is the backfill's, though it closes exactly at the cut (the watermark + 1
    µs). Before the fix the first open window was computed as for a cut at the watermark:
    with a horizon short of it that window got no result."""
    v1, v2 = (revenue(version=v, window={"type": "tumbling", "size": "10s"}) for v in (1, 2))
    order = {"amount": 1, "region": "eu", "status": "new"}
    events = [ev(i, 2 * i, 2 * i, **order) for i in range(1, 5)]
    events.append(ev(5, 9.999999, 9.999999, **order))
    assert events[-1].published_at == T0 + timedelta(seconds=10, microseconds=-1)
    later = [ev(i, 2 * i, 2 * i, **order) for i in range(6, 15)]
    live = KPIEngine(clock=lambda: T0)
    live.set_definitions([v1])
    for e in events:
        live.process(e)
    assert live.drain_results() == []  # [0, 10) open at the watermark
    live.set_definitions([v2])
    assert live.watermark is not None
    backfills = backfill_manager(timedelta(0))
    job = backfills.schedule(v2, live.watermark)
    for e in later:
        live.process(e)
    live.advance(T0 + timedelta(days=1))
    published = {
        r.window_start: r.value for r in live.drain_results() if not backfills.suppressed(r)
    }
    published |= {r.window_start: r.value for r in compute(job, events + later)}
    assert published == {T0: 5.0, T0 + timedelta(seconds=10): 4.0, T0 + timedelta(seconds=20): 5.0}


def test_a_change_before_the_previous_backfill_ran_loses_no_window() -> None:
    """Two changes in quick succession (or one while the engine was down with a backfill
    pending): the first version's backfill never runs, and its live results for windows
    starting before its cut were suppressed, so the second backfill must reach back to where
    the first one began. Before the fix it began at its own `since`: a window open at the
    first cut and closed by the second one (here [01:10, 03:10), 2 h windows sliding by 5 min,
    the second change 5 min after the first) got no result from any version."""
    window = {"type": "sliding", "size": "2h", "slide": "5m"}
    versions = [
        VersionedKPIDefinition.model_validate(
            {
                "code": "orders",
                "display_name": f"Orders v{v}",
                "entity_type": "order",
                "aggregation": "count",
                "window": window,
                "version": v,
            }
        )
        for v in (1, 2, 3)
    ]
    events = [ev(i, i * 60, i * 60, n=1) for i in range(6 * 60)]
    backfills = backfill_manager(timedelta(hours=1))
    live = KPIEngine(clock=lambda: T0)
    published: dict[datetime, float] = {}

    def run(upto: int, start: int) -> None:
        for e in events[start:upto]:
            live.process(e)
        published.update(
            (r.window_start, r.value) for r in live.drain_results() if not backfills.suppressed(r)
        )

    live.set_definitions(versions[:1])
    run(187, 0)
    for v, (start, upto) in zip(versions[1:], [(187, 192), (192, len(events))], strict=True):
        live.set_definitions([v])
        assert live.watermark is not None
        job = backfills.schedule(v, live.watermark)
        run(upto, start)
    live.advance(T0 + timedelta(days=30))
    published.update((r.window_start, r.value) for r in live.drain_results())
    backfilled = compute(job, events)
    published.update((r.window_start, r.value) for r in backfilled)

    reference = KPIEngine(clock=lambda: T0)
    reference.set_definitions(versions[-1:])
    for e in events:
        reference.process(e)
    reference.advance(T0 + timedelta(days=30))
    expected = {r.window_start: r.value for r in reference.drain_results()}
    lost = sorted(s for s in expected if s not in published)
    assert lost == []
    assert published == expected
    assert job.since == backfills.coverage["orders"].since == T0 + timedelta(hours=1, minutes=10)


def backfill_manager(horizon: timedelta = timedelta(seconds=60)) -> BackfillManager:
    async def ignore(_: list[KPIResult]) -> None:
        return None

    return BackfillManager(
        None,  # type: ignore[arg-type]  # no I/O in these calls
        None,  # type: ignore[arg-type]
        horizon=horizon,
        delay=timedelta(seconds=1),
        max_events=10,
        on_results=ignore,
        watermark=lambda: None,
    )


def test_coverage_outlives_the_job_and_the_checkpoint() -> None:
    """What `verify` learns through the KPI list: where the current version's results begin,
    after its backfill is done and dropped, and across a restart."""
    backfills = backfill_manager()
    backfills.schedule(revenue(version=3), T0 + timedelta(seconds=125))
    covered = {"definition_version": 3, "since": (T0 + timedelta(seconds=60)).isoformat()}
    assert backfills.coverage_of("revenue") == covered
    backfills.jobs.clear()  # done, then dropped once its windows can no longer appear live
    assert backfills.pending("revenue") is None
    assert backfills.coverage_of("revenue") == covered
    restarted = backfill_manager()
    restarted.restore(backfills.checkpoint_section())
    assert restarted.coverage_of("revenue") == covered
    restarted.cancel("revenue")  # removed, or changed with no backfill to follow
    assert restarted.coverage_of("revenue") is None
    # a checkpoint from before coverage was recorded: its pending jobs say where they start
    older = backfill_manager()
    older.schedule(revenue(version=4), T0 + timedelta(seconds=125))
    section = older.checkpoint_section()
    del section["backfill_coverage"]
    restored = backfill_manager()
    restored.restore(section)
    assert restored.coverage["revenue"] == Coverage(4, T0 + timedelta(seconds=60))


def ev(i: int, occurred: float, published: float, **attrs: object) -> EntityEvent:
    return EntityEvent(
        f"e{i}",
        "created",
        "order",
        f"o{i}",
        1,
        T0 + timedelta(seconds=occurred),
        T0 + timedelta(seconds=published),
        attrs,
    )


def test_backfill_compute_uses_publication_order_and_keeps_windows_before_the_cut() -> None:
    job = plan(revenue(), T0 + timedelta(seconds=25), timedelta(seconds=20))
    events = [
        ev(1, 1, 1.5, amount=10.0, region="eu", status="new"),
        ev(2, 9, 9.5, amount=5.0, region="eu", status="new"),
        ev(3, 5, 13.0, amount=100.0, region="eu", status="new"),  # late: [0,10) closed at 12
        ev(4, 11, 12.5, amount=7.0, region="us", status="cancelled"),
        ev(5, 12, 12.6, amount=1.0, region="us", status="new"),
        ev(6, 25, 26.0, amount=3.0, region="eu", status="new"),  # [20,30) starts before the cut
        ev(7, 31, 31.5, amount=4.0, region="eu", status="new"),  # [30,40): the live engine's
    ]
    results = compute(job, list(reversed(events)))  # replay order is not publication order
    got = {
        (r.window_start, tuple(r.dimensions.items())): (r.value, r.sample_count) for r in results
    }
    assert got == {
        (T0, (("region", "eu"),)): (15.0, 2),
        (T0 + timedelta(seconds=10), (("region", "us"),)): (1.0, 1),
        (T0 + timedelta(seconds=20), (("region", "eu"),)): (3.0, 1),
    }


def test_first_value() -> None:
    assert first_value({"columns": ["n"], "rows": [[3, 4]]}) == 3.0
    assert first_value({"columns": [{"name": "x"}], "rows": [{"x": "2.5"}]}) == 2.5
    assert first_value({"rows": []}) is None
    assert first_value({"rows": [[None]]}) is None


def test_slot_params_append_the_window_with_bind_window() -> None:
    def query_kpi(**query: object) -> VersionedKPIDefinition:
        return VersionedKPIDefinition.model_validate(
            {
                "code": "q",
                "display_name": "Q",
                "entity_type": "order",
                "query": {"schedule": "60s", **query},
                "version": 1,
            }
        )

    start, end = to_micros(T0), to_micros(T0 + timedelta(seconds=60))
    plain = query_kpi(sql="SELECT $1::text", params=["order"])
    assert slot_params(plain, start, end) == ["order"]
    bound = query_kpi(
        sql="SELECT count(*) FROM t WHERE k = $1 AND at >= $2 AND at < $3",
        params=["order"],
        bind_window=True,
    )
    assert slot_params(bound, start, end) == [
        "order",
        "2024-01-01T00:00:00Z",
        "2024-01-01T00:01:00Z",
    ]
    assert slot_params(bound, start + 1, end)[1] == "2024-01-01T00:00:00.000001Z"


def test_result_events_go_to_both_channels_with_stable_ids() -> None:
    r = KPIResult("revenue", 1.5, T0, T0 + timedelta(seconds=10), {"region": "eu"}, 2, 3, T0)
    a = result_events(r, source="calculation_engine", now=T0)
    b = result_events(r, source="calculation_engine", now=T0 + timedelta(seconds=5))
    assert [e.event_type for e in a] == [channels.KPI_CALCULATED, "kpi.calculated.revenue"]
    assert [e.event_id for e in a] == [e.event_id for e in b]
    assert a[0].payload == r.to_dict()
    other = KPIResult("revenue", 1.5, T0, T0 + timedelta(seconds=10), {"region": "us"}, 2, 3, T0)
    assert result_events(other, source="x", now=T0)[0].event_id != a[0].event_id


def test_registry_metadata_wins_and_falls_back_to_the_directory() -> None:
    seed = KPIDefinition.model_validate(revenue().definition().model_dump())
    reg = DefinitionRegistry([seed])
    assert reg.effective()["revenue"].version == 0
    reg.replace_remote([revenue(4).model_dump(mode="json"), {"code": "bad"}])
    assert reg.effective()["revenue"].version == 4 and reg.source_of("revenue") == "metadata"
    assert not reg.upsert_remote(revenue(3).model_dump(mode="json"))
    assert reg.upsert_remote(revenue(5).model_dump(mode="json"))
    reg.delete_remote("revenue")
    assert reg.effective()["revenue"].version == 0


def test_latest_cache_keeps_the_latest_window_per_group() -> None:
    cache = LatestResults()
    for i, region in [(0, "eu"), (1, "eu"), (0, "us")]:
        start = T0 + timedelta(seconds=10 * i)
        cache.add(
            KPIResult(
                "k", float(i), start, start + timedelta(seconds=10), {"region": region}, 1, 1, T0
            )
        )
    cache.add(KPIResult("k", 9.0, T0, T0 + timedelta(seconds=10), {"region": "eu"}, 1, 1, T0))
    latest = {r["dimensions"]["region"]: r["value"] for r in cache.latest("k")}
    assert latest == {"eu": 1.0, "us": 0.0}


def test_latest_cache_holds_the_newest_definition_versions_groups_only() -> None:
    """A changed KPI (here `group_by` region -> currency) replaces the earlier definition's
    groups with its first result; a late result of the earlier version changes nothing."""
    cache = LatestResults()

    def add(version: int, start_s: int, **dimensions: str) -> None:
        start = T0 + timedelta(seconds=start_s)
        end = start + timedelta(seconds=10)
        cache.add(KPIResult("k", float(start_s), start, end, dimensions, 1, version, T0))

    add(1, 0, region="eu")
    add(1, 0, region="us")
    add(2, 10, currency="EUR")
    add(1, 20, region="eu")
    assert [(r["definition_version"], r["dimensions"]) for r in cache.latest("k")] == [
        (2, {"currency": "EUR"})
    ]
