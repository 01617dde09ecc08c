from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analytics_engine.kpi.aggregation import (
    SumAccumulator,
    accumulator_from_state,
    new_accumulator,
)

numbers = st.lists(
    st.one_of(
        st.floats(min_value=-1e12, max_value=1e12, allow_nan=False),
        st.integers(-(10**9), 10**9).map(float),
        st.decimals(min_value=-1000, max_value=1000, places=2).map(float),
    ),
    max_size=200,
)
json_values = st.lists(
    st.one_of(
        st.integers(-5, 5),
        st.integers(-5, 5).map(float),
        st.sampled_from(["a", "b", "1", ""]),
        st.booleans(),
        st.lists(st.integers(0, 2), max_size=2),
    ),
    max_size=50,
)


def expected(kind: str, values: list[float]) -> float | None:
    if kind == "count":
        return float(len(values))
    if kind == "sum":
        return math.fsum(values)
    if not values:
        return None
    if kind == "avg":
        return math.fsum(values) / len(values)
    return min(values) if kind == "min" else max(values)


def close(a: float | None, b: float | None, scale: float) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= 1e-9 * max(abs(b), 1e-300) or abs(a - b) <= 1e-15 * scale


@pytest.mark.parametrize("kind", ["count", "sum", "avg", "min", "max"])
@given(values=numbers, split=st.integers(0, 200))
def test_matches_recomputation_and_merges(kind: str, values: list[float], split: int) -> None:
    scale = math.fsum(abs(v) for v in values)
    whole = new_accumulator(kind)
    for v in values:
        whole.add(v)
    assert close(whole.result(), expected(kind, values), scale)
    left, right = new_accumulator(kind), new_accumulator(kind)
    for v in values[:split]:
        left.add(v)
    for v in values[split:]:
        right.add(v)
    left.merge(right)  # type: ignore[arg-type]
    assert close(left.result(), expected(kind, values), scale)
    state = json.loads(json.dumps(whole.to_state()))
    assert accumulator_from_state(state).result() == whole.result()


def test_compensated_sum_beats_naive_float() -> None:
    values = [0.1] * 10 + [1e16, 1.0, -1e16]
    acc = SumAccumulator()
    for v in values:
        acc.add(v)
    assert acc.result() == math.fsum(values)
    assert sum(values) != math.fsum(values)


@given(json_values, st.integers(0, 50))
def test_count_distinct_uses_json_identity(values: list[Any], split: int) -> None:
    acc = new_accumulator("count_distinct")
    for v in values:
        acc.add(v)
    canonical = {json.dumps(float(v) if type(v) is int else v) for v in values}
    assert acc.result() == len(canonical)
    left, right = new_accumulator("count_distinct"), new_accumulator("count_distinct")
    for v in values[:split]:
        left.add(v)
    for v in values[split:]:
        right.add(v)
    left.merge(right)  # type: ignore[arg-type]
    assert left.result() == acc.result()
    restored = accumulator_from_state(json.loads(json.dumps(acc.to_state())))
    assert restored.result() == acc.result()
    assert restored.to_state() == acc.to_state()  # the same state in the same order
    restored.add(values[0] if values else "new")
    assert restored.result() == acc.result() + (0 if values else 1)


def test_distinct_state_is_sorted_strings_first_then_tagged_values() -> None:
    acc = new_accumulator("count_distinct")
    for v in ("b", 2, "a", True, 1.5, [1], "c", False):
        acc.add(v)
    assert acc.to_state()["state"] == [
        ["s", "a"],
        ["s", "b"],
        ["s", "c"],
        ["b", False],
        ["b", True],
        ["j", "[1]"],
        ["n", 1.5],
        ["n", 2],
    ]


def test_distinct_keeps_true_and_1_apart_but_1_and_1_0_together() -> None:
    acc = new_accumulator("count_distinct")
    for v in (True, 1, 1.0, "1", [1], {"a": 1}, {"a": 1}):
        acc.add(v)
    assert acc.result() == 5


def test_distinct_arrays_and_objects_compare_their_numbers_as_jsonb_does() -> None:
    """jsonb: `{"a": 1} = {"a": 1.0}` and `[1e16] = [10000000000000000]` (numeric equality at
    any depth), but `[10000000000000001]` differs from `[1e16]` and `[true]` from `[1]`."""
    acc = new_accumulator("count_distinct")
    for v in (
        {"a": 1},
        {"a": 1.0},
        [1e16],
        [10_000_000_000_000_000],
        [10_000_000_000_000_001],
        [True],
        [1],
        [{"b": [2.0]}],
        [{"b": [2]}],
        [1.5],
    ):
        acc.add(v)
    assert acc.result() == 7


def test_empty_results_and_errors() -> None:
    assert new_accumulator("sum").result() == 0.0
    assert new_accumulator("count").result() == 0.0
    for kind in ("avg", "min", "max"):
        assert new_accumulator(kind).result() is None
    with pytest.raises(ValueError):
        new_accumulator("median")
    with pytest.raises(ValueError):
        accumulator_from_state({"nope": 1})
