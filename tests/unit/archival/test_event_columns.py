"""The column-by-column event-batch builder gives exactly the row-by-row builder's table (or
leaves the batch to it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analytics_engine.archival.event_columns import events_columns
from analytics_engine.archival.tables import (
    ENTITY_EVENTS_SCHEMA,
    PayloadError,
    events_table,
    events_table_by_row,
)

BASE = datetime(2024, 3, 1, 10, tzinfo=UTC)


def row(i: int, **over: Any) -> dict[str, Any]:
    """A row as the database sends it."""
    when = BASE + timedelta(seconds=i, microseconds=i * 7)
    base: dict[str, Any] = {
        "event_id": f"e-{i}",
        "event_kind": "created" if i % 2 else "updated",
        "entity_type": "order",
        "entity_id": f"o-{i % 7}",
        "version": i,
        "occurred_at": when.isoformat(),
        "published_at": (when + timedelta(milliseconds=5)).isoformat(),
        "attributes": '{"amount":1.5,"region":"eu"}',
        "reason": None,
        "source": "data_simulator",
    }
    base.update(over)
    return base


def outcome(build: Any, rows: list[Any]) -> Any:
    try:
        return build(rows)
    except PayloadError as exc:
        return f"rejected: {exc}"


def test_database_rows_take_the_column_path() -> None:
    rows = [row(i) for i in range(100)]
    table = events_columns(rows, ENTITY_EVENTS_SCHEMA)
    assert table is not None
    assert table.equals(events_table_by_row(rows))


@pytest.mark.parametrize(
    "odd",
    [
        {"occurred_at": "2024-03-01T10:00:00"},  # naive: UTC
        {"occurred_at": "2024-03-01 10:00:00+00:00"},
        {"published_at": "2024-02-30T10:00:00Z"},
        {"version": True},
        {"version": 2.0},
        {"entity_id": 17},
        {"attributes": {"b": 1, "a": [1, 2]}},
        {"event_id": "e-0"},
        {"event_id": ""},
    ],
)
def test_other_shapes_give_the_row_path_result(odd: dict[str, Any]) -> None:
    rows = [row(i) for i in range(20)] + [row(99, **odd)]
    assert str(outcome(events_table, rows)) == str(outcome(events_table_by_row, rows))


TIMES = [
    "2024-03-01T10:00:00Z",
    "2024-03-01T10:00:00.5+00:00",
    "2024-03-01T10:00:00.123456-05:30",
    "2024-03-01T10:00:00.1234567Z",
    "2024-03-01T23:59:59+23:59",
    "2024-03-01T10:00:00+24:00",
    "2024-12-31T23:30:00-01:00",
    "2024-03-01T10:00:00",
    "2024-03-01",
    "2024-13-01T10:00:00Z",
    "0999-03-01T10:00:00Z",
    "yesterday",
    None,
    5,
]
FIELDS = {
    "event_id": st.sampled_from(["a", "b", "c", "", None, 3]),
    "event_kind": st.sampled_from(["created", None, 1, True]),
    "entity_id": st.sampled_from(["o-1", None, 12, 1.5]),
    "version": st.sampled_from([0, 5, None, True, 2.0, 2.5, -1, 2**63, "3"]),
    "occurred_at": st.sampled_from(TIMES),
    "published_at": st.sampled_from(TIMES),
    "attributes": st.sampled_from([None, "{}", '{"a":1}', {"b": 2, "a": 1}, {}, [1], 7]),
    "reason": st.sampled_from([None, "gone", 0]),
}
plain = st.integers(0, 10_000).map(row)
changed = st.builds(
    lambda i, change: row(i, **dict([change])),
    st.integers(0, 10_000),
    st.sampled_from(sorted(FIELDS)).flatmap(lambda f: FIELDS[f].map(lambda v: (f, v))),
)
junk = st.one_of(st.fixed_dictionaries(FIELDS), st.sampled_from([None, [], "row"]))
rows_strategy = st.one_of(
    st.lists(plain, max_size=30),
    st.lists(st.one_of(plain, plain, plain, changed), max_size=30),
    st.lists(st.one_of(plain, changed, junk), max_size=30),
)


@settings(max_examples=300, deadline=None)
@given(rows_strategy)
def test_columns_equal_rows(rows: list[Any]) -> None:
    fast = outcome(events_table, rows)
    slow = outcome(events_table_by_row, rows)
    if isinstance(slow, str):
        assert fast == slow
    else:
        assert not isinstance(fast, str) and fast.equals(slow)


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(2999, 12, 30)),
    st.sampled_from(["Z", "+00:00", "-05:30", "+23:59", "+01:00", "-12:00"]),
    st.sampled_from(["seconds", "milliseconds", "microseconds"]),
)
def test_iso_times_read_as_python_reads_them(when: datetime, zone: str, spec: str) -> None:
    text = when.isoformat(timespec=spec) + zone
    rows = [row(i, occurred_at=text) for i in range(3)]
    table = events_columns(rows, ENTITY_EVENTS_SCHEMA)
    assert table is not None
    assert table.equals(events_table_by_row(rows))
