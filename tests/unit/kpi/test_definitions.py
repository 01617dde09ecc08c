from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analytics_engine.kpi.definitions import (
    EntityTypeDefinition,
    FieldError,
    KPIDefinition,
    Thresholds,
    VersionedKPIDefinition,
    check_against_entity,
    check_read_only_sql,
    placeholder_errors,
    sql_placeholders,
    validation_errors,
)

GOOD: dict[str, Any] = {
    "code": "orders_revenue",
    "display_name": "Revenue",
    "description": "Sum of order amounts",
    "entity_type": "order",
    "aggregation": "sum",
    "field": "amount",
    "filter": "status == 'completed' && amount > 0",
    "group_by": ["region"],
    "window": {"type": "tumbling", "size": "60s", "slide": None, "allowed_lateness": "10s"},
    "unit": "EUR",
    "thresholds": {"warning": 1000, "critical": 500, "direction": "below"},
    "enabled": True,
}
QUERY: dict[str, Any] = {
    "code": "open_orders",
    "display_name": "Open orders",
    "entity_type": "order",
    "query": {
        "sql": "SELECT count(*) FROM entities WHERE status = $1",
        "params": ["open"],
        "schedule": "5m",
    },
}
ORDER = EntityTypeDefinition(
    entity_type="order",
    attributes={
        "amount": "number",
        "status": "string",
        "region": "string",
        "qty": "integer",
        "paid": "boolean",
        "created": "timestamp",
    },
)


def errors(data: dict[str, Any]) -> dict[str, str]:
    return {e.field: e.message for e in validation_errors(data)}


def test_documented_example_is_valid_and_round_trips() -> None:
    kpi = KPIDefinition.model_validate(GOOD)
    assert kpi.window is not None
    assert kpi.window.size == timedelta(seconds=60)
    assert kpi.window.allowed_lateness == timedelta(seconds=10)
    dumped = kpi.model_dump(mode="json")
    assert dumped["window"] == {
        "type": "tumbling",
        "size": "1m",
        "slide": None,
        "allowed_lateness": "10s",
    }
    assert KPIDefinition.model_validate(dumped) == kpi
    assert validation_errors(GOOD) == []


def test_query_kpi_round_trips() -> None:
    kpi = KPIDefinition.model_validate(QUERY)
    assert not kpi.is_streaming
    assert KPIDefinition.model_validate(kpi.model_dump(mode="json")) == kpi


def test_defaults() -> None:
    kpi = KPIDefinition.model_validate(
        {
            "code": "n",
            "display_name": "N",
            "entity_type": "order",
            "aggregation": "count",
            "window": {"type": "tumbling", "size": 10},
        }
    )
    assert (kpi.description, kpi.group_by, kpi.enabled, kpi.filter) == ("", [], True, None)
    assert kpi.window is not None and kpi.window.allowed_lateness == timedelta(0)


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"code": "Bad-Code"}, "code", "String should match pattern"),
        ({"code": "x" * 64}, "code", "String should match pattern"),
        ({"aggregation": "median"}, "aggregation", "Input should be"),
        ({"field": None}, "field", "required for aggregation 'sum'"),
        ({"field": "amount-x"}, "field", "must be an identifier"),
        ({"field": "version"}, "field", "reserved"),
        ({"filter": "amount >"}, "filter", "syntax error"),
        ({"filter": "'a' > 1"}, "filter", "cannot compare string with number"),
        ({"group_by": ["a", "b", "c", "d", "e", "f"]}, "group_by", "at most 5"),
        ({"group_by": ["a", "a"]}, "group_by", "unique"),
        ({"group_by": ["ok", "2x"]}, "group_by.1", "must be an identifier"),
        ({"window": None}, "window", "required for a streaming KPI"),
        ({"aggregation": None}, "aggregation", "required for a streaming KPI"),
        (
            {"window": {"type": "tumbling", "size": "60s", "slide": "10s"}},
            "window.slide",
            "only sliding windows",
        ),
        ({"window": {"type": "sliding", "size": "60s"}}, "window.slide", "required"),
        (
            {"window": {"type": "sliding", "size": "60s", "slide": "90s"}},
            "window.slide",
            "must not exceed",
        ),
        (
            {"window": {"type": "sliding", "size": "60s", "slide": "7s"}},
            "window.slide",
            "multiple of the slide",
        ),
        (
            {"window": {"type": "sliding", "size": "1h", "slide": "1s"}},
            "window.slide",
            "at most 100",
        ),
        (
            {"window": {"type": "sliding", "size": "60s", "slide": "0s"}},
            "window.slide",
            "must be positive",
        ),
        ({"window": {"type": "tumbling", "size": "500ms"}}, "window.size", "at least 1s"),
        ({"window": {"type": "tumbling", "size": "32d"}}, "window.size", "at most 31d"),
        (
            {"window": {"type": "tumbling", "size": "10s", "allowed_lateness": "101s"}},
            "window.allowed_lateness",
            "at most 10 times",
        ),
        (
            {"window": {"type": "tumbling", "size": "10d", "allowed_lateness": "2d"}},
            "window.allowed_lateness",
            "at most 1d",
        ),
        ({"window": {"type": "tumbling", "size": "1 minute"}}, "window.size", "invalid duration"),
        ({"window": {"type": "hopping", "size": "60s"}}, "window.type", "Input should be"),
        (
            {"thresholds": {"warning": 500, "critical": 1000, "direction": "below"}},
            "thresholds.critical",
            "at or below warning",
        ),
        (
            {"thresholds": {"warning": 10, "direction": "sideways"}},
            "thresholds.direction",
            "Input should be",
        ),
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({"display_name": ""}, "display_name", "at least 1 character"),
        ({"query": QUERY["query"]}, "aggregation", "not allowed for query KPIs"),
    ],
)
def test_bad_definitions_report_the_field(change: dict[str, Any], field: str, message: str) -> None:
    found = errors({**GOOD, **change})
    assert field in found, found
    assert message in found[field]
    assert not found[field].startswith("Value error")


def test_several_errors_at_once() -> None:
    found = errors({**GOOD, "code": "X", "group_by": ["1"], "unit": "x" * 51})
    assert set(found) == {"code", "group_by.0", "unit"}


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("", "String should have at least 1 character"),
        ("DELETE FROM t", "starting with SELECT or WITH"),
        ("SELECT 1; SELECT 2", "single statement"),
        ("SELECT 1; -- ok\n DROP TABLE t", "single statement"),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "DELETE"),
        ("SELECT * INTO new_t FROM t", "INTO"),
        ("SELECT * FROM t FOR UPDATE", "UPDATE"),
        ("SELECT * FROM t FOR SHARE", "SHARE"),
        ("SELECT 'unterminated", "unterminated"),
        ("SELECT $3", "uses $3 but not $1"),
    ],
)
def test_query_sql_checks(sql: str, message: str) -> None:
    found = errors({**QUERY, "query": {"sql": sql}})
    assert any(message in m for m in found.values()), found


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(*) FROM entities;",
        "  (SELECT 1)",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "SELECT 'delete; drop' AS txt, \"update\" FROM t -- insert\n",
        "SELECT $$ drop ; $$ /* update; */",
        "select jsonb_set(a, '{x}', '1') from t",
    ],
)
def test_query_sql_accepts_read_only(sql: str) -> None:
    assert check_read_only_sql(sql) == 0


@pytest.mark.parametrize(
    ("sql", "params", "message"),
    [
        ("SELECT $1::int", [7, 8], "uses 1 placeholder(s) ($1..$1) but 2 params are given"),
        ("SELECT 1", [7], "uses no placeholder but 1 params are given"),
        ("SELECT $1::int + $2::int", [7], "uses 2 placeholder(s) ($1..$2) but 1 params"),
        ("SELECT $1::int + $3::int", [7, 8, 9], "uses $3 but not $2"),
        ("SELECT $0", [], "numbered from $1"),
    ],
)
def test_query_params_must_match_the_placeholders(
    sql: str, params: list[Any], message: str
) -> None:
    """The engine runs the statement with exactly `params`: PostgreSQL's parameter count is the
    highest $n, so any other count (or a hole) fails every run; refuse it when it is defined."""
    found = errors({**QUERY, "query": {"sql": sql, "params": params}})
    assert message in found.get("query.params", ""), found


WINDOW_SQL = (
    "SELECT count(*) FROM entity_events WHERE entity_type = $1"
    " AND occurred_at >= $2 AND occurred_at < $3"
)


@pytest.mark.parametrize(
    ("sql", "params", "bind_window", "message"),
    [
        (WINDOW_SQL, ["order"], True, None),
        ("SELECT $2::timestamptz - $1::timestamptz", [], True, None),
        # without the flag, $2 and $3 have no value
        (WINDOW_SQL, ["order"], False, "uses 3 placeholder(s) ($1..$3) but 1 params are given"),
        # with it, the params must leave the last two to the window
        (WINDOW_SQL, ["order", "x", "y"], True, "but 3 params are given and bind_window adds $4"),
        ("SELECT $1::text", ["order"], True, "adds $2 (window_start) and $3 (window_end); use"),
        # both bounds must be used: PostgreSQL would prepare 2 parameters for 3 values
        ("SELECT $1::text, $2::timestamptz", ["order"], True, "uses 2 placeholder(s) ($1..$2)"),
        ("SELECT 1", [], True, "uses no placeholder but 0 params are given and bind_window"),
        ("SELECT $1::text, $4::timestamptz", ["order"], True, "uses $4 but not $2"),
    ],
)
def test_bind_window_appends_two_placeholders(
    sql: str, params: list[Any], bind_window: bool, message: str | None
) -> None:
    """With `bind_window` the engine binds the slot's start and end as `$len(params)+1` and
    `$len(params)+2`: the statement must use exactly `$1..$len(params)+2`."""
    body = {**QUERY, "query": {"sql": sql, "params": params, "bind_window": bind_window}}
    found = errors(body)
    if message is None:
        assert found == {}
        query = KPIDefinition.model_validate(body).query
        assert query is not None and query.bind_window is True
    else:
        assert message in found.get("query.params", ""), found


def test_bind_window_defaults_to_false_and_round_trips() -> None:
    plain = KPIDefinition.model_validate(QUERY)
    assert plain.query is not None and plain.query.bind_window is False
    bound = KPIDefinition.model_validate(
        {**QUERY, "query": {"sql": WINDOW_SQL, "params": ["order"], "bind_window": True}}
    )
    assert KPIDefinition.model_validate(bound.model_dump(mode="json")) == bound
    assert placeholder_errors(frozenset({1, 2}), 0, bind_window=True) is None
    assert placeholder_errors(frozenset({1, 2, 3}), 1, bind_window=True) is None
    assert placeholder_errors(frozenset({1, 2, 3}), 3, bind_window=False) is None


@pytest.mark.parametrize(
    ("schedule", "delay", "message"),
    [
        ("5m", None, None),
        ("5m", "2s", None),
        ("1s", "999ms", None),
        ("1s", "1s", "must be shorter than schedule"),
        ("1m", "2m", "must be shorter than schedule"),
        ("1m", -1, "cannot be negative"),
    ],
)
def test_query_delay_is_below_the_schedule(
    schedule: str, delay: str | int | None, message: str | None
) -> None:
    """The run for a slot starts `delay` after its end, before the next slot ends."""
    query = {**QUERY["query"], "schedule": schedule}
    if delay is not None:
        query["delay"] = delay
    found = errors({**QUERY, "query": query})
    if message is None:
        assert found == {}
        parsed = KPIDefinition.model_validate({**QUERY, "query": query})
        assert parsed.query is not None
        assert parsed.query.delay.total_seconds() == {None: 0, "2s": 2, "999ms": 0.999}[delay]
        assert KPIDefinition.model_validate(parsed.model_dump(mode="json")) == parsed
    else:
        assert list(found) == ["query.delay"] and message in found["query.delay"], found


def test_placeholders_ignore_quoted_text_comments_and_identifiers() -> None:
    sql = "SELECT '$2', \"$3\", $$ $4 $$, a$5 FROM t WHERE x = $1 -- $6\n /* $7 */"
    assert sql_placeholders(sql) == {1}
    assert placeholder_errors(frozenset({1, 2}), 2) is None
    assert placeholder_errors(frozenset(), 0) is None
    assert KPIDefinition.model_validate(
        {**QUERY, "query": {"sql": "SELECT $2::int - $1::int, $1::int", "params": [1, 2]}}
    )


def test_thresholds_level() -> None:
    below = Thresholds(warning=1000, critical=500, direction="below")
    assert [below.level(v) for v in (2000, 1000, 700, 500, 0)] == [
        "ok",
        "warning",
        "warning",
        "critical",
        "critical",
    ]
    above = Thresholds(warning=80, critical=95)
    assert [above.level(v) for v in (10, 80, 99)] == ["ok", "warning", "critical"]
    assert Thresholds().level(1e9) == "ok"


def test_versioned_definition() -> None:
    stored = VersionedKPIDefinition.model_validate({**GOOD, "version": 3, "updated_at": "x"})
    assert stored.version == 3
    assert stored.definition() == KPIDefinition.model_validate(GOOD)
    assert validation_errors({**GOOD, "version": -1}, VersionedKPIDefinition)[0].field == "version"


def test_field_error_dict() -> None:
    assert FieldError("window.slide", "x").to_dict() == {"field": "window.slide", "message": "x"}


def test_entity_type_model() -> None:
    assert ORDER.attributes["qty"] == "integer"
    bad = validation_errors(
        {"entity_type": "order", "attributes": {"a": "decimal", "1b": "string"}},
        EntityTypeDefinition,
    )
    assert {e.field for e in bad} >= {"attributes.a", "attributes.1b.[key]"}


def test_check_against_entity() -> None:
    assert check_against_entity(KPIDefinition.model_validate(GOOD), ORDER) == []
    kpi = KPIDefinition.model_validate(
        {
            **GOOD,
            "entity_type": "invoice",
            "aggregation": "avg",
            "field": "status",
            "group_by": ["region", "country"],
            "filter": "paid && amount > 0 && missing == 1",
        }
    )
    found = {e.field: e.message for e in check_against_entity(kpi, ORDER)}
    assert set(found) == {"entity_type", "field", "group_by.1", "filter"}
    assert "numeric" in found["field"]
    assert "'missing'" in found["filter"]
    typed = KPIDefinition.model_validate({**GOOD, "filter": "status > 5 && version > 1"})
    assert [e.field for e in check_against_entity(typed, ORDER)] == ["filter"]
    unknown_field = KPIDefinition.model_validate({**GOOD, "field": "nope"})
    assert check_against_entity(unknown_field, ORDER)[0].field == "field"
    assert check_against_entity(KPIDefinition.model_validate(QUERY), ORDER) == []


@given(
    st.fixed_dictionaries(
        {
            "size": st.sampled_from(["1s", "10s", "1m", "1h", "1d"]),
            "lateness": st.sampled_from(["0s", "500ms", "5s", "1m"]),
            "group_by": st.lists(st.sampled_from(["a", "b", "c"]), unique=True, max_size=3),
            "aggregation": st.sampled_from(["count", "sum", "avg", "min", "max", "count_distinct"]),
        }
    )
)
def test_valid_definitions_round_trip(spec: dict[str, Any]) -> None:
    data = {
        **GOOD,
        "aggregation": spec["aggregation"],
        "group_by": spec["group_by"],
        "window": {"type": "tumbling", "size": spec["size"], "allowed_lateness": spec["lateness"]},
    }
    if validation_errors(data):
        assert "allowed_lateness" in errors(data).popitem()[0]
        return
    kpi = KPIDefinition.model_validate(data)
    assert KPIDefinition.model_validate(kpi.model_dump(mode="json")) == kpi
