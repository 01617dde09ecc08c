"""Which query KPI slots are due (`calculation.query_slots`): given the last slot handled, the
clock, the grace delay and the catch-up cap."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from analytics_engine.calculation.query_slots import SlotMark, due_slots, latest_due_end
from analytics_engine.kpi.windows import to_micros

S = 1_000_000  # one second in microseconds
MIN = 60 * S
T0 = to_micros(datetime(2024, 1, 1, tzinfo=UTC))


def ends(*minutes: int) -> list[int]:
    return [T0 + m * MIN for m in minutes]


def test_the_newest_slot_is_due_once_its_end_plus_the_delay_has_passed() -> None:
    assert latest_due_end(T0 + 2 * MIN + 5 * S, MIN) == T0 + 2 * MIN
    assert latest_due_end(T0 + 2 * MIN, MIN) == T0 + 2 * MIN  # at its end, without delay
    # with a 2s delay the slot ending at 2m is due at 2m02s, not a microsecond earlier
    assert latest_due_end(T0 + 2 * MIN + 2 * S - 1, MIN, 2 * S) == T0 + MIN
    assert latest_due_end(T0 + 2 * MIN + 2 * S, MIN, 2 * S) == T0 + 2 * MIN


@pytest.mark.parametrize(
    ("last", "now", "delay", "cap", "expected", "skipped"),
    [
        (T0 + 2 * MIN, T0 + 2 * MIN + 30 * S, 0, 10, [], 0),  # nothing new
        (T0 + MIN, T0 + 2 * MIN + 30 * S, 0, 10, ends(2), 0),  # the next slot
        (T0 + MIN, T0 + 2 * MIN + S, 2 * S, 10, [], 0),  # it ended, but is still in its grace
        (T0 + MIN, T0 + 2 * MIN + 2 * S, 2 * S, 10, ends(2), 0),  # its grace is over
        (T0, T0 + 4 * MIN + 10 * S, 0, 10, ends(1, 2, 3, 4), 0),  # missed ones, oldest first
        (T0, T0 + 4 * MIN + S, 2 * S, 10, ends(1, 2, 3), 0),  # the newest still in its grace
        (T0, T0 + 6 * MIN, 0, 2, ends(5, 6), 4),  # the cap keeps the newest
        (T0, T0 + 6 * MIN, 0, 1, ends(6), 5),  # cap 1: only the newest (no catch-up)
        (T0 + 30 * S, T0 + 2 * MIN, 0, 10, ends(1, 2), 0),  # an unaligned mark: slots after it
        (T0 + 5 * MIN, T0 + 2 * MIN, 0, 10, [], 0),  # a mark ahead of the clock: none
    ],
)
def test_due_slots(
    *, last: int, now: int, delay: int, cap: int, expected: list[int], skipped: int
) -> None:
    due = due_slots(last, now, MIN, delay, cap)
    assert list(due.ends) == expected
    assert due.skipped == skipped


def test_a_slot_is_due_exactly_once_as_the_clock_moves() -> None:
    """Ticking every 250 ms over 5 minutes of 7s slots with a 3s delay, advancing the mark to
    each run slot's end, runs every slot once, in order, each at or after its end + delay."""
    schedule, delay, last = 7 * S, 3 * S, latest_due_end(T0, 7 * S, 3 * S)
    run: list[tuple[int, int]] = []
    for now in range(T0, T0 + 5 * MIN, S // 4):
        for end in due_slots(last, now, schedule, delay, 1440).ends:
            run.append((end, now))
            last = end
    assert [end for end, _ in run] == list(range(run[0][0], run[-1][0] + 1, schedule))
    assert all(end + delay <= now < end + delay + S // 4 for end, now in run)


def test_a_mark_round_trips_and_a_foreign_value_is_none() -> None:
    mark = SlotMark(3, T0 + 7 * MIN + 1)
    assert SlotMark.decode(mark.encode()) == mark
    assert mark.encode() == b'{"version":3,"end":"2024-01-01T00:07:00.000001Z"}'
    for raw in (b"", b"12", b"[]", b'{"version": 1}', b'{"version": 1, "end": "soon"}'):
        assert SlotMark.decode(raw) is None
    # a mark without an offset is UTC, as every timestamp the engine writes
    assert SlotMark.decode(b'{"version":1,"end":"2024-01-01T00:01:00"}') == SlotMark(1, T0 + MIN)
