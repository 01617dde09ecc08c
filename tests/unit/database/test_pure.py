"""SQL guard, JSON conversions, durations, migration planning, partition days (pure)."""

from __future__ import annotations

import decimal
import uuid
from datetime import UTC, date, datetime, timedelta

import pytest

from analytics_engine.core.durations import parse_duration
from analytics_engine.core.storable import InvalidPayload
from analytics_engine.database.jsonsafe import coerce_param, to_json_value
from analytics_engine.database.migrate import load_migrations, plan
from analytics_engine.database.partitions import days_to_ensure
from analytics_engine.database.sqlguard import (
    RejectedStatement,
    check_read_statement,
    first_keyword,
)


@pytest.mark.parametrize(
    ("sql", "keyword"),
    [
        ("select 1", "select"),
        ("  -- c\n/* x */ (SELECT 1)", "select"),
        ("WITH a AS (SELECT 1) SELECT * FROM a", "with"),
        ("/* a */ delete from t", "delete"),
        ("", ""),
    ],
)
def test_first_keyword(sql: str, keyword: str) -> None:
    assert first_keyword(sql) == keyword


def test_only_read_statements_pass_the_guard() -> None:
    for sql in ("SELECT 1", "VALUES (1)", "TABLE t", "with x as (select 1) select 1"):
        check_read_statement(sql)
    for sql in ("INSERT INTO t VALUES (1)", "set role x", "CALL p()", "EXPLAIN ANALYZE DELETE"):
        with pytest.raises(RejectedStatement) as info:
            check_read_statement(sql)
        assert info.value.code == "read_only_violation"
    with pytest.raises(RejectedStatement) as info:
        check_read_statement("  -- only a comment")
    assert info.value.code == "invalid_query"


def test_result_values_become_json_safe() -> None:
    ts = datetime(2024, 1, 1, tzinfo=UTC)
    u = uuid.uuid4()
    assert to_json_value(ts) == "2024-01-01T00:00:00+00:00"
    assert to_json_value(decimal.Decimal("1.5")) == 1.5
    assert to_json_value(decimal.Decimal("NaN")) is None
    assert to_json_value(float("inf")) is None
    assert to_json_value(u) == str(u)
    assert to_json_value(timedelta(minutes=1)) == 60.0
    assert to_json_value(b"\x01\xff") == "01ff"
    assert to_json_value({"a": [ts, date(2024, 1, 2)]}) == {"a": [ts.isoformat(), "2024-01-02"]}


def test_parameters_are_coerced_to_the_inferred_type() -> None:
    assert coerce_param(42, "text", 1) == "42"
    assert coerce_param("7", "int4", 1) == 7
    assert coerce_param("2024-01-01T00:00:00Z", "timestamptz", 1) == datetime(
        2024, 1, 1, tzinfo=UTC
    )
    assert coerce_param("2024-01-01T01:00:00+01:00", "timestamp", 1) == datetime(2024, 1, 1)
    assert coerce_param({"a": 1}, "jsonb", 1) == '{"a":1}'
    assert coerce_param("x", "jsonb", 1) == '"x"'
    assert coerce_param([1, "2"], "_int8", 1) == [1, 2]
    assert coerce_param(1.5, "numeric", 1) == decimal.Decimal("1.5")
    assert coerce_param(None, "int4", 1) is None
    for value, type_name in (
        (1.5, "int4"),
        ("x", "int4"),
        ({"a": 1}, "text"),
        ("x", "bool"),
        ("zz", "uuid"),
        (True, "float8"),
    ):
        with pytest.raises(InvalidPayload, match=r"\$1"):
            coerce_param(value, type_name, 1)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 604800), ("250ms", 0.25), ("90", 90), (90, 90), ("1.5h", 5400), ("0", 0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("bad", ["-1s", "7 weeks", "", True, None, -3])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_migrations_follow_one_flavour() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations][:1] == [1]
    pg = plan(migrations, set(), "postgres")
    ts = plan(migrations, set(), "timescale")
    assert [m.version for m in pg] == [m.version for m in ts] == sorted({m.version for m in pg})
    assert all(m.flavour in (None, "postgres") for m in pg)
    assert any(m.flavour == "timescale" for m in ts)
    assert plan(migrations, {m.version for m in pg}, "postgres") == []


def test_partition_days_skip_known_and_far_away_days() -> None:
    today = date(2024, 6, 1)
    days = [today, today, date(2024, 5, 1), date(2030, 1, 1), date(2024, 6, 2)]
    assert days_to_ensure(days, {date(2024, 6, 2)}, today) == [date(2024, 5, 1), today]
