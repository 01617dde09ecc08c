"""The columnar KPI-result parser gives exactly what the per-row parser gives: the same rows
(table, fingerprints, partitions) and the same rejects with the same reasons."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from analytics_engine.archival.kpi_columns import KpiParse, parse_kpi_results
from analytics_engine.archival.tables import (
    KpiRow,
    PayloadError,
    kpi_rows_table,
    parse_kpi_result,
)

MISSING = object()


def payload(i: int = 0, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "kpi_code": ["revenue", "orders"][i % 2],
        "value": 12.5 + i,
        "window_start": "2024-03-01T23:59:00Z",
        "window_end": "2024-03-02T00:00:00+00:00",
        "dimensions": {"region": ["eu", "us", None][i % 3], "tier": i % 2},
        "sample_count": 4 + i,
        "definition_version": 3,
        "computed_at": "2024-03-02T00:00:05.250000Z",
        "stored_at": "2024-03-02T00:00:06Z",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not MISSING}


def reference(payloads: list[dict[str, Any]]) -> tuple[list[KpiRow], list[int], list[Any]]:
    rows: list[KpiRow] = []
    positions: list[int] = []
    rejected: list[tuple[int, str]] = []
    for i, p in enumerate(payloads):
        try:
            rows.append(parse_kpi_result(p))
        except PayloadError as exc:
            rejected.append((i, str(exc)))
            continue
        positions.append(i)
    return rows, positions, rejected


def assert_same(payloads: list[dict[str, Any]], parsed: KpiParse) -> None:
    rows, positions, rejected = reference(payloads)
    assert sorted(parsed.rejected) == rejected
    chunks = sorted(parsed.chunks, key=lambda c: c.positions[0])
    assert [p for c in chunks for p in c.positions] == positions
    assert [f for c in chunks for f in c.fingerprints] == [r.fingerprint for r in rows]
    assert [p for c in chunks for p in c.partitions] == [(r.kpi_code, r.day) for r in rows]
    if rows:
        got = pa.concat_tables([c.table for c in chunks]).combine_chunks()
        assert got.equals(kpi_rows_table(rows).combine_chunks())
    else:
        assert not chunks


def test_a_clean_batch_is_one_columnar_chunk() -> None:
    payloads = [payload(i) for i in range(64)]
    parsed = parse_kpi_results(payloads)
    assert len(parsed.chunks) == 1 and parsed.rejected == []
    assert_same(payloads, parsed)


def test_one_poison_payload_is_rejected_alone_with_its_reason() -> None:
    payloads = [payload(i) for i in range(100)]
    payloads[37] = payload(37, window_start="yesterday")
    payloads[80] = payload(80, dimensions={"region": {"nested": ["x"]}})
    parsed = parse_kpi_results(payloads)
    assert [i for i, _ in sorted(parsed.rejected)] == [37, 80]
    assert sum(len(c) for c in parsed.chunks) == 98
    assert_same(payloads, parsed)


def test_bus_payloads_take_the_columnar_path() -> None:
    """As delivered: decoded from JSON."""
    payloads = [orjson.loads(orjson.dumps(payload(i))) for i in range(50)]
    parsed = parse_kpi_results(payloads)
    assert len(parsed.chunks) == 1
    assert_same(payloads, parsed)


def test_nan_values_and_hidden_nan_dimensions_match_the_row_path() -> None:
    payloads = [payload(i, value=math.nan if i % 5 == 0 else 1.0 * i) for i in range(20)]
    payloads += [payload(i, dimensions={"x": math.inf if i % 2 else None}) for i in range(20)]
    assert_same(payloads, parse_kpi_results(payloads))


CODES = ["revenue", "orders", "x" * 63, "x" * 64, "", "é€", 5, None, True]
TIMES = [
    "2024-03-01T23:59:00Z",
    "2024-03-02T00:00:00+00:00",
    "2024-03-01T23:59:00",
    "2024-03-02T01:00:00+01:00",
    "2024-03-01",
    "20240301T000000Z",
    "2024-03-01T23:59:00.123456789Z",
    "yesterday",
    "\ud800",
    1709337540,
    None,
]
VALUES = [1.5, 0, -3, 2**53 + 1, 2**64, True, "12", None, math.nan, math.inf, 1e308, -0.0]
DIMS = [
    {},
    {"region": "eu"},
    {"region": "eu", "tier": 2},
    {"tier": 2, "region": "eu"},
    {"flag": None, "b": True},
    {"x": 1.0},
    {"x": 1},
    {"x": math.nan},
    {"\ud800": 1},
    {1: "a"},
    None,
    [1],
    {"n": {"a": 1}},
    {"l": [1]},
    MISSING,
]
COUNTS = [0, 4, -1, 1.0, 1.5, True, "3", 2**63, 2**62, None, MISSING]
VERSIONS = [0, 3, -1, 2**31, 2**31 - 1, 1.0, True, None, MISSING]

good = st.builds(
    lambda i, start, end: payload(i, window_start=start, window_end=end),
    st.integers(0, 5),
    st.sampled_from(TIMES[:2]),
    st.sampled_from(["2024-03-02T00:01:00Z", "2024-03-02T01:02:00+01:00"]),
)
hostile = st.one_of(
    st.builds(lambda v: payload(kpi_code=v), st.sampled_from(CODES)),
    st.builds(lambda v: payload(window_start=v), st.sampled_from(TIMES)),
    st.builds(lambda v: payload(window_end=v), st.sampled_from(TIMES)),
    st.builds(lambda v: payload(computed_at=v), st.sampled_from([*TIMES, MISSING])),
    st.builds(lambda v: payload(value=v), st.sampled_from([*VALUES, MISSING])),
    st.builds(lambda v: payload(dimensions=v), st.sampled_from(DIMS)),
    st.builds(lambda v: payload(sample_count=v), st.sampled_from(COUNTS)),
    st.builds(lambda v: payload(definition_version=v), st.sampled_from(VERSIONS)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(good, good, good, hostile), max_size=60))
def test_columnar_parse_equals_the_row_by_row_parse(payloads: list[dict[str, Any]]) -> None:
    assert_same(payloads, parse_kpi_results(payloads))
