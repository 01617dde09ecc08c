"""The backfill's computation as the replay arrives: the same results as sorting the whole
replay by publication time, while holding only the events published later than events that
occurred after them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from analytics_engine.calculation.backfill import computation, plan
from analytics_engine.calculation.events import EntityEvent
from analytics_engine.kpi import KPIEngine, KPIResult, VersionedKPIDefinition

T0 = datetime(2024, 1, 1, tzinfo=UTC)
S = timedelta(seconds=1)


def definition(window: dict[str, str], aggregation: str = "sum") -> VersionedKPIDefinition:
    return VersionedKPIDefinition.model_validate(
        {
            "code": "revenue",
            "display_name": "Revenue",
            "entity_type": "order",
            "aggregation": aggregation,
            "field": "amount",
            "group_by": ["region"],
            "window": window,
            "version": 1,
        }
    )


def event(i: int, occurred: float, delay: float, amount: int, region: str) -> EntityEvent:
    return EntityEvent(
        f"00000000-0000-4000-8000-{i:012d}",
        "created",
        "order",
        f"o{i}",
        1,
        T0 + occurred * S,
        T0 + (occurred + delay) * S,
        {"amount": amount, "region": region},
    )


def in_replay_order(events: list[EntityEvent]) -> list[EntityEvent]:
    """As the database replays: by occurred_at, published_at, event_id."""
    return sorted(events, key=lambda e: (e.occurred_at, e.published_at, e.event_id))


def reference(job_definition: VersionedKPIDefinition, events: list[EntityEvent]) -> list[KPIResult]:
    """The whole replay sorted by publication time, then fed (what a backfill did before)."""
    engine = KPIEngine(clock=lambda: T0, idle_close_grace=timedelta(0))
    engine.set_definitions([job_definition])
    for e in sorted(events, key=lambda e: (e.published_at, e.occurred_at, e.event_id)):
        engine.process(e)
    engine.advance(T0 + timedelta(days=3650))
    return engine.drain_results()


def keyed(results: list[KPIResult]) -> dict[tuple[object, ...], tuple[float, int]]:
    return {
        (r.window_start, r.window_end, tuple(r.dimensions.items())): (r.value, r.sample_count)
        for r in results
    }


windows = st.sampled_from(
    [
        {"type": "tumbling", "size": "10s"},
        {"type": "tumbling", "size": "10s", "allowed_lateness": "3s"},
        {"type": "sliding", "size": "20s", "slide": "5s", "allowed_lateness": "2s"},
    ]
)
events_strategy = st.lists(
    st.tuples(
        st.integers(0, 300),  # occurred, seconds after T0
        st.sampled_from([0, 0, 0.5, 1, 2, 4, 30, 120]),  # publication delay: late ones too
        st.integers(-5, 50),
        st.sampled_from(["eu", "us"]),
    ),
    max_size=150,
)


@settings(max_examples=150, deadline=None)
@given(window=windows, raw=events_strategy, cut=st.integers(0, 320), horizon=st.integers(0, 400))
def test_fed_as_replayed_equals_the_whole_replay_sorted_by_publication(
    window: dict[str, str],
    raw: list[tuple[int, float, int, str]],
    cut: int,
    horizon: int,
) -> None:
    kpi = definition(window)
    job = plan(kpi, T0 + cut * S, horizon * S)
    events = [event(i, *row) for i, row in enumerate(raw)]
    work = computation(job)
    for e in in_replay_order(events):
        work.add(e)
    got = keyed(work.finish())
    expected = {
        key: value
        for key, value in keyed(reference(kpi, events)).items()
        if job.since <= key[0] < job.cut  # type: ignore[operator]
    }
    assert got == expected
    assert work.events == len(events)
    assert work.out_of_order == 0


def test_memory_holds_only_the_events_published_after_later_ones_occurred() -> None:
    """An hour at 100 events/s, each published within 2 s, one in a thousand 5 minutes late:
    the computation holds a few hundred events at most, not the 360,000 of the replay."""
    kpi = definition({"type": "tumbling", "size": "1m", "allowed_lateness": "10s"})
    job = plan(kpi, T0 + timedelta(hours=1), timedelta(hours=1))
    work = computation(job)
    most = 0
    for i in range(360_000):
        occurred = i / 100
        delay = 300.0 if i % 1000 == 0 else (i % 7) * 0.3
        work.add(event(i, occurred, delay, amount=1, region="eu"))
        most = max(most, work.held)
    results = work.finish()
    assert most < 1000
    assert work.held == 0
    assert sum(r.sample_count for r in results) == 360_000 - 360  # the late ones, counted late
    assert {r.window_start for r in results} == {T0 + timedelta(minutes=m) for m in range(60)}


def test_skewed_events_beyond_the_margin_are_counted_out_of_order() -> None:
    """A producer clock ahead by 5 s: with a skew margin of 10 s the order is exact; without,
    the event comes after events published later than it, and that is counted."""
    kpi = definition({"type": "tumbling", "size": "10s"})
    job = plan(kpi, T0 + 60 * S, 60 * S)
    events = [event(i, i, 0, 1, "eu") for i in range(40)]
    events.append(event(99, 20, -5, 1, "eu"))  # occurred at 20 s, published at 15 s
    for skew, expected in ((timedelta(0), 1), (10 * S, 0)):
        work = computation(job, skew=skew)
        for e in in_replay_order(events):
            work.add(e)
        work.finish()
        assert work.out_of_order == expected
