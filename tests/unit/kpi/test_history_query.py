"""The history query's checks, shared by the gateway and the calculation engine's API."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from analytics_engine.kpi.history_query import (
    HISTORY_LIMIT,
    HistoryQuery,
    InvalidHistoryQuery,
    parse_history_query,
)

RANGE = {"start": "2024-01-01T00:00:00Z", "end": "2024-01-02T00:00:00+01:00"}


def problems(query: dict[str, str]) -> dict[str, str]:
    with pytest.raises(InvalidHistoryQuery) as caught:
        parse_history_query(query)
    return {p["field"]: p["message"] for p in caught.value.problems}


def test_a_valid_query_in_utc() -> None:
    parsed = parse_history_query({**RANGE, "limit": "500", "dimension.region": "eu"})
    assert parsed == HistoryQuery(
        datetime(2024, 1, 1, tzinfo=UTC),
        datetime(2024, 1, 1, 23, tzinfo=UTC),
        500,
        {"region": "eu"},
    )
    naive = parse_history_query({"start": "2024-01-01T00:00:00", "end": "2024-01-01 01:00"})
    assert naive.start.tzinfo is UTC and naive.limit is None
    plus_as_space = parse_history_query({**RANGE, "end": "2024-01-02T00:00:00 01:00"})
    assert plus_as_space.end == datetime(2024, 1, 1, 23, tzinfo=UTC)


def test_dimensions_in_both_spellings() -> None:
    """`dimension.<name>`, and `dimension[<name>]`: the deepObject style the OpenAPI document
    declares, which generated clients and the docs page send."""
    parsed = parse_history_query(
        {**RANGE, "dimension[region]": "eu", "dimension.status": "completed"}
    )
    assert parsed.dimensions == {"region": "eu", "status": "completed"}


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"limit": "99999999999999999999999"}, "limit", f"between 1 and {HISTORY_LIMIT}"),
        ({"limit": str(HISTORY_LIMIT + 1)}, "limit", f"between 1 and {HISTORY_LIMIT}"),
        ({"limit": "0"}, "limit", "between 1"),
        ({"limit": "-3"}, "limit", "between 1"),
        ({"limit": "ten"}, "limit", "not an integer"),
        ({"limit": "²"}, "limit", "not an integer"),
        ({"start": "0001-01-01T00:00:00+14:00"}, "start", "out of range"),
        ({"end": "9999-12-31T23:59:59-14:00"}, "end", "out of range"),
        ({"start": "yesterday"}, "start", "not an ISO 8601 timestamp"),
        ({"start": ""}, "start", "required"),
        ({"end": "2023-12-31T23:59:59Z"}, "end", "must not be before start"),
        # a misspelt filter would otherwise answer every group as if it had matched
        ({"dimensions.region": "eu"}, "dimensions.region", "unknown parameter"),
        ({"region": "eu"}, "region", "unknown parameter"),
        ({"dimension[]": "eu"}, "dimension[]", "unknown parameter"),
        ({"dimension.": "eu"}, "dimension.", "unknown parameter"),
    ],
)
def test_out_of_range_parameters_are_field_problems(
    change: dict[str, str], field: str, words: str
) -> None:
    found = problems({**RANGE, **change})
    assert words in found.get(field, ""), found


def test_every_problem_at_once() -> None:
    assert set(problems({"limit": "0"})) == {"start", "end", "limit"}
    assert parse_history_query({**RANGE, "end": RANGE["start"]}).limit is None  # empty range
