from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analytics_engine.kpi.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("500ms", timedelta(milliseconds=500)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("1d", timedelta(days=1)),
        ("60", timedelta(seconds=60)),
        (" 10s ", timedelta(seconds=10)),
        (45, timedelta(seconds=45)),
        (2.0, timedelta(seconds=2)),
        (0, timedelta(0)),
        (timedelta(milliseconds=1500), timedelta(milliseconds=1500)),
    ],
)
def test_parse(text: object, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "1.5s",
        "-1s",
        "10 minutes",
        "1w",
        "s",
        True,
        None,
        -5,
        1.5,
        "99999999999999d",
        timedelta(microseconds=1),
        [1],
    ],
)
def test_parse_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=90), "90s"),
        (timedelta(seconds=120), "2m"),
        (timedelta(hours=48), "2d"),
        (timedelta(milliseconds=1500), "1500ms"),
    ],
)
def test_format_is_canonical(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@given(st.integers(0, 3650 * 86_400_000))
def test_round_trip(millis: int) -> None:
    value = timedelta(milliseconds=millis)
    assert parse_duration(format_duration(value)) == value
