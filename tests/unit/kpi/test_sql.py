"""Filter/aggregate SQL translation: shape, parameters, and (with the `database_url` fixture)
row-by-row equivalence with the Python evaluator on a real PostgreSQL."""

from __future__ import annotations

import json
import math
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analytics_engine.kpi import aggregate_sql, compile_filter, dimension_sql, filter_to_sql
from analytics_engine.kpi.aggregation import new_accumulator
from analytics_engine.kpi.filters import FilterError


def test_parameters_start_after_the_offset_and_carry_casts() -> None:
    sql, params = filter_to_sql("status == 'x' && amount > 5", param_offset=3)
    assert params == ["x", 5.0]
    assert "$4::text" in sql and "$5::double precision" in sql
    assert "$1" not in sql and "$3" not in sql


def test_literals_never_reach_the_sql_text() -> None:
    sql, params = filter_to_sql('s == "\'; DROP TABLE events; --"')
    assert "DROP" not in sql
    assert params == ["'; DROP TABLE events; --"]


def test_numeric_string_and_boolean_accessors() -> None:
    sql, _ = filter_to_sql("amount > 1 && name < 'b' && flag")
    assert "(attributes->>'amount')::double precision" in sql
    assert "jsonb_typeof(attributes->'amount') = 'number'" in sql
    assert 'COLLATE "C"' in sql
    assert "(attributes->>'flag')::boolean" in sql


def test_reserved_names_map_to_columns() -> None:
    sql, params = filter_to_sql(
        "event == 'created' && version > 1 && entity_id != 'x'",
        attributes_column="e.attrs",
        reserved_columns={"entity_id": "e.entity_id"},
    )
    assert "event_kind = $1::text" in sql
    assert "(version)::double precision > $2::double precision" in sql
    assert "(e.entity_id)::text <> $3::text" in sql
    assert "e.attrs" not in sql
    assert params == ["created", 1.0, "x"]


def test_types_are_needed_only_when_they_cannot_be_inferred() -> None:
    with pytest.raises(FilterError, match="types="):
        filter_to_sql("a == b + c")
    # two attributes compare by the JSON types each event holds, as the evaluator does
    assert filter_to_sql("a == b")[0] == filter_to_sql("a == b", types={"a": "number"})[0]
    with pytest.raises(FilterError, match="cannot infer"):
        filter_to_sql("a + b > c")
    assert "||" in filter_to_sql("a + b == 'xy'")[0]  # resolved by the other side
    with pytest.raises(ValueError, match="column"):
        filter_to_sql("a > 1", attributes_column="x; drop")


def test_aggregate_sql() -> None:
    assert aggregate_sql("count", None) == "count(*)"
    assert aggregate_sql("sum", "amount").startswith("coalesce(sum(")
    assert "::numeric" in aggregate_sql("avg", "amount")
    assert "DISTINCT" in aggregate_sql("count_distinct", "customer")
    assert dimension_sql("region") == "NULLIF(attributes->'region', 'null'::jsonb)"
    with pytest.raises(ValueError):
        aggregate_sql("sum", None)


# --------------------------------------------------------------------------------------------
# equivalence on PostgreSQL: every row, every random filter, including nulls, missing attributes
# and values of the wrong type (where both sides must say "error"/NULL).

scalar = st.one_of(
    st.floats(min_value=-20, max_value=20, allow_nan=False).map(lambda x: round(x, 1)),
    st.integers(-5, 5),
    st.sampled_from(["", "a", "ab", "B", "é", "a'b"]),
    st.booleans(),
    st.none(),
    st.just([1]),
)
rows = st.lists(
    st.fixed_dictionaries({}, optional={"a": scalar, "b": scalar, "s": scalar, "f": scalar}),
    min_size=1,
    max_size=12,
)
lits = st.one_of(
    st.floats(min_value=-10, max_value=10, allow_nan=False).map(lambda x: repr(round(x, 1))),
    st.sampled_from(["'a'", "'é'", "''", "'B'", "true", "false", "0", "2"]),
)
names = st.sampled_from(["a", "b", "s", "f"])
cmp = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
atoms = st.one_of(
    st.tuples(names, cmp, lits).map(" ".join),
    st.tuples(names, st.sampled_from(["==", "!="]), st.just("null")).map(" ".join),
    st.sampled_from(
        [
            "has(a)",
            "has(s)",
            "f",
            "s.startsWith('a')",
            "s.endsWith('')",
            "s.contains('b')",
            "s in ['a', 'ab']",
            "a in [1, 2.5]",
            "f in [true]",
            "s in []",
            "a / b > 1",
            "a * 2 - b <= 3",
            "-a < 1",
            "s + 'x' == 'ax'",
            "event == 'created'",
            "version >= 2",
            "entity_id.startsWith('e1')",
            "has(version)",
            "a == null || s != null",
            "a == b",
            "a != s",
            "b < a",
            "s >= f",
            "a != b + 1",
            "a == -b",
            "s == s + 'x'",
            "f != (a > 1)",
        ]
    ),
)
filters = st.recursive(
    atoms,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["&&", "||"]), inner).map(lambda t: f"({' '.join(t)})"),
        inner.map(lambda e: f"!({e})"),
    ),
    max_leaves=5,
)


@pytest.fixture
async def pg(database_url: str) -> Any:
    conn = await asyncpg.connect(database_url)
    await conn.execute(
        "CREATE TEMP TABLE ev (id int, event_kind text, entity_id text, version int, "
        "attributes jsonb)"
    )
    yield conn
    await conn.close()


DECLARED: dict[str, str] = {"a": "number", "b": "number", "s": "string", "f": "bool"}
"""Declared attribute types that the random rows violate (the evaluator does not enforce them
on events, so neither may the SQL)."""


@pytest.mark.parametrize("types", [None, DECLARED], ids=["undeclared", "declared"])
async def test_sql_matches_the_evaluator_on_postgres(pg: Any, types: dict[str, str] | None) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(filters, rows)
    def collect(expr: str, data: list[dict[str, Any]]) -> None:
        cases.append((expr, data))

    cases: list[tuple[str, list[dict[str, Any]]]] = []
    collect()
    checked = 0
    for expr, data in cases:
        try:
            await assert_sql_matches_the_evaluator(pg, expr, data, types)
        except FilterError:
            continue  # needs declared types, or contradicts them; covered above
        checked += 1
    assert checked > len(cases) // 2


@pytest.mark.parametrize(
    ("expr", "types"),
    [
        ("a != b + 1", None),  # a null, b missing: the right side errors, so does the filter
        ("a == -b", None),
        ("f != (a > 1)", None),
        ("a == b", DECLARED),  # events holding other types than declared
        ("a != b", None),
        ("s < f", None),
        ("a >= b", DECLARED),
    ],
)
async def test_comparisons_with_null_or_undeclared_types_match_the_evaluator(
    pg: Any, expr: str, types: dict[str, str] | None
) -> None:
    values: list[Any] = [None, 1, 2.5, "x", "y", True, False, [1]]
    data = [{"a": a, "b": b, "s": a, "f": b} for a in values for b in values]
    data += [{}, {"a": None}, {"b": None}, {"a": 1}, {"s": "x"}, {"f": True}]
    await assert_sql_matches_the_evaluator(pg, expr, data, types)


async def assert_sql_matches_the_evaluator(
    pg: Any, expr: str, data: list[dict[str, Any]], types: dict[str, str] | None
) -> None:
    where, params = filter_to_sql(expr, param_offset=0, types=types)
    flt = compile_filter(expr, types=types)
    await pg.execute("TRUNCATE ev")
    await pg.executemany(
        "INSERT INTO ev VALUES ($1, $2, $3, $4, $5::jsonb)",
        [
            (i, "created" if i % 2 else "updated", f"e{i}", i, json.dumps(row))
            for i, row in enumerate(data)
        ],
    )
    got = await pg.fetch(f"SELECT id, ({where}) AS m FROM ev ORDER BY id", *params)
    for record, (i, row) in zip(got, enumerate(data), strict=True):
        activation = {
            **row,
            "event": "created" if i % 2 else "updated",
            "entity_id": f"e{i}",
            "version": i,
        }
        assert record["m"] == flt.evaluate(activation), (expr, row, where)


async def test_aggregates_match_the_accumulators_on_postgres(pg: Any) -> None:
    values: list[Any] = [1.5, 2, None, "x", 1e15, -1e15, 0.1, 0.2, 0.3, True, 2.0, "x", [1]]
    await pg.executemany(
        "INSERT INTO ev VALUES ($1, 'created', 'e', 1, $2::jsonb)",
        [(i, json.dumps({"v": v})) for i, v in enumerate(values)] + [(99, json.dumps({}))],
    )
    for aggregation in ("count", "sum", "avg", "min", "max", "count_distinct"):
        acc = new_accumulator(aggregation)
        for v in values:
            numeric = type(v) in (int, float)
            if v is None or (aggregation in ("sum", "avg", "min", "max") and not numeric):
                continue
            acc.add(float(v) if numeric else v)
        got = await pg.fetchval(f"SELECT {aggregate_sql(aggregation, 'v')} FROM ev")
        assert math.isclose(float(got), acc.result() or 0.0, rel_tol=1e-9), aggregation
