"""`writer.stage_records` reuses a timestamp's conversion while it repeats; this pins it to
converting every value, including wall times that differ only by `fold`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from analytics_engine.core.storable import EntityEventRow
from analytics_engine.database.model import fold_entity_events
from analytics_engine.database.writer import epoch_microseconds, stage_records

_BERLIN = ZoneInfo("Europe/Berlin")
# A small pool, so consecutive rows often repeat a value; the Berlin pair is one wall time
# (the hour clocks go back) that is two instants an hour apart, and equal to each other.
_POOL = [
    datetime(2024, 10, 27, 2, 30, tzinfo=_BERLIN),
    datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=_BERLIN),
    datetime(2024, 10, 27, 0, 30, tzinfo=UTC),
    datetime(2024, 10, 27, 1, 30, tzinfo=UTC),
    datetime(2024, 10, 27, 2, 30, tzinfo=timezone(timedelta(hours=2))),
    datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
]
_MOMENTS = st.sampled_from(_POOL) | st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)


def _row(occurred_at: datetime, published_at: datetime) -> EntityEventRow:
    return EntityEventRow(
        "0c5c8a7f-d290-5a48-9096-000000000000",
        "updated",
        "order",
        "o-1",
        1,
        occurred_at,
        published_at,
        "{}",
        None,
        "data_simulator",
    )


def test_the_fold_pair_is_equal_yet_two_instants() -> None:
    first, second = _POOL[0], _POOL[1]
    assert first == second
    assert epoch_microseconds(second) - epoch_microseconds(first) == 3_600_000_000


@given(st.lists(st.tuples(_MOMENTS, _MOMENTS), max_size=30))
def test_stage_records_convert_every_timestamp(moments: list[tuple[datetime, datetime]]) -> None:
    rows = [_row(occurred, published) for occurred, published in moments]
    steps = fold_entity_events(rows)
    expected = [
        (
            *r[:5],
            epoch_microseconds(r[5]),
            epoch_microseconds(r[6]),
            *r[7:],
            *((steps[i][0], epoch_microseconds(steps[i][1])) if i in steps else (None, None)),
        )
        for i, r in enumerate(rows)
    ]
    assert stage_records(rows) == (expected, any(step == 2 for step, _ in steps.values()))
