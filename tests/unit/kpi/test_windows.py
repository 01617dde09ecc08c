from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from analytics_engine.kpi.definitions import Window
from analytics_engine.kpi.windows import from_micros, to_micros, window_starts, windows_for

T = datetime(2024, 5, 1, 12, 0, 7, 250_000, tzinfo=UTC)


def test_tumbling_is_epoch_aligned() -> None:
    window = Window(type="tumbling", size=timedelta(minutes=1))
    assert windows_for(T, window) == [
        (datetime(2024, 5, 1, 12, 0, tzinfo=UTC), datetime(2024, 5, 1, 12, 1, tzinfo=UTC))
    ]


def test_sliding_lists_every_containing_window_ascending() -> None:
    window = Window(type="sliding", size=timedelta(seconds=30), slide=timedelta(seconds=10))
    starts = [s for s, _ in windows_for(T, window)]
    assert starts == [
        T.replace(minute=59, hour=11, second=40, microsecond=0),
        T.replace(minute=59, hour=11, second=50, microsecond=0),
        T.replace(second=0, microsecond=0),
    ]


def test_boundaries_and_timezones() -> None:
    window = Window(type="tumbling", size=timedelta(seconds=10))
    edge = datetime(2024, 1, 1, 0, 0, 10, tzinfo=UTC)
    assert windows_for(edge, window)[0][0] == edge  # start is inclusive
    assert windows_for(edge - timedelta(microseconds=1), window)[0][1] == edge  # end exclusive
    cet = edge.astimezone(timezone(timedelta(hours=1)))
    assert windows_for(cet, window) == windows_for(edge, window)
    assert windows_for(edge.replace(tzinfo=None), window) == windows_for(edge, window)
    assert windows_for(edge, window)[0][0].tzinfo is UTC


def test_before_the_epoch() -> None:
    window = Window(type="tumbling", size=timedelta(seconds=10))
    t = datetime(1969, 12, 31, 23, 59, 55, tzinfo=UTC)
    assert windows_for(t, window) == [
        (datetime(1969, 12, 31, 23, 59, 50, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC))
    ]


@given(st.integers(-(10**15), 10**15))
def test_micros_round_trip(us: int) -> None:
    assert to_micros(from_micros(us)) == us


@given(t=st.integers(-(10**13), 10**13), slide=st.integers(1, 10**6), factor=st.integers(1, 12))
def test_each_event_is_in_exactly_size_over_slide_windows(t: int, slide: int, factor: int) -> None:
    size = slide * factor
    starts = list(window_starts(t, size, slide))
    assert len(starts) == factor
    assert all(s % slide == 0 and s <= t < s + size for s in starts)
    assert starts == sorted(set(starts))
    # and no other aligned window contains t
    assert not (starts[0] - slide <= t < starts[0] - slide + size)
    assert not (starts[-1] + slide <= t)


@given(t=st.integers(-(10**13), 10**13), size=st.integers(1, 10**9))
def test_tumbling_window_contains_the_event(t: int, size: int) -> None:
    (start,) = window_starts(t, size)
    assert start % size == 0 and start <= t < start + size


@given(
    st.datetimes(
        min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    st.sampled_from([(1, None), (60, None), (60, 15), (3600, 60), (86400, 3600)]),
)
def test_windows_for_datetimes(t: datetime, spec: tuple[int, int | None]) -> None:
    size, slide = spec
    window = Window(
        type="tumbling" if slide is None else "sliding",
        size=timedelta(seconds=size),
        slide=None if slide is None else timedelta(seconds=slide),
    )
    result = windows_for(t, window)
    assert len(result) == (1 if slide is None else size // slide)
    assert all(s <= t < e and e - s == timedelta(seconds=size) for s, e in result)
