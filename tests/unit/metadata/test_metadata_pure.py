"""Pure parts of the metadata service: preconditions, body validation, migrations, seeding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from analytics_engine.kpi.definitions import EntityTypeDefinition
from analytics_engine.metadata.errors import Invalid
from analytics_engine.metadata.migrate import packaged_migrations, parse_migrations
from analytics_engine.metadata.preconditions import (
    Precondition,
    etag,
    not_modified,
    parse_conditions,
    parse_if_match,
)
from analytics_engine.metadata.seeding import BUILTIN_ENTITY_TYPES, SeedReport, load_directory
from analytics_engine.metadata.store import ENTITY_TYPE, KPI, change_payload
from analytics_engine.metadata.validation import (
    broken_kpis,
    canonical,
    check_kpi_entity,
    parse_entity_type,
    parse_kpi,
)

ORDER = BUILTIN_ENTITY_TYPES[0]


def kpi(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "code": "orders_revenue",
        "display_name": "Revenue",
        "entity_type": "order",
        "aggregation": "sum",
        "field": "amount",
        "window": {"type": "tumbling", "size": "60s"},
    }
    body.update(overrides)
    return body


# -- preconditions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "current", "fails"),
    [
        (None, None, False),
        (None, 3, False),
        ('"3"', 3, False),
        ('W/"3"', 3, False),
        ("3", 3, False),
        ('"1", "3"', 3, False),
        ('"2"', 3, True),
        ('"3"', None, True),
        ('"abc"', 3, True),
        ('"²"', 2, True),  # a digit to str.isdigit(), not to int(): no version (412, not 500)
        ('"٣"', 3, True),  # Arabic-Indic three: not an entity tag we issued
        ('"' + "9" * 5000 + '"', 3, True),  # too long for int(): no version either
        ("*", 3, False),
        ("*", None, True),
    ],
)
def test_if_match(header: str | None, current: int | None, fails: bool) -> None:
    assert (parse_if_match(header).failure(current) is not None) is fails


def test_if_none_match_star_means_create_only() -> None:
    condition = parse_conditions(None, "*")
    assert condition.failure(None) is None
    assert "already exists at version 2" in (condition.failure(2) or "")
    assert parse_conditions(None, '"4"') == Precondition()


@pytest.mark.parametrize(
    ("header", "version", "expected"),
    [
        (None, 3, False),
        ("", 3, False),
        ('"3"', 3, True),
        ('W/"3"', 3, True),  # weak comparison, as RFC 9110 asks for If-None-Match
        ('"1", "3"', 3, True),
        ('"2"', 3, False),
        ("*", 3, True),
        ('"³"', 3, False),
    ],
)
def test_if_none_match_on_a_read(header: str | None, version: int, expected: bool) -> None:
    assert not_modified(header, version) is expected


def test_etag_format() -> None:
    assert etag(12) == '"12"'


# -- validation ---------------------------------------------------------------------------------


def test_parse_kpi_fills_the_code_and_ignores_version() -> None:
    body = kpi(version=7)
    del body["code"]
    parsed = parse_kpi(body, "from_url")
    assert parsed.code == "from_url"


def test_parse_kpi_rejects_a_code_that_differs_from_the_url() -> None:
    with pytest.raises(Invalid) as exc:
        parse_kpi(kpi(), "other")
    assert [e.field for e in exc.value.errors] == ["code"]


def test_parse_kpi_reports_every_field() -> None:
    with pytest.raises(Invalid) as exc:
        parse_kpi(kpi(display_name="", window={"type": "tumbling", "size": "1m", "slide": "10s"}))
    assert {e.field for e in exc.value.errors} == {"display_name", "window.slide"}


def test_parse_rejects_non_objects() -> None:
    with pytest.raises(Invalid) as exc:
        parse_entity_type([1, 2], "x")
    assert exc.value.errors[0].field == ""


def test_canonical_form_makes_equivalent_bodies_equal() -> None:
    a = canonical(parse_kpi(kpi()))
    b = canonical(
        parse_kpi(
            kpi(window={"type": "tumbling", "size": "1m", "allowed_lateness": 0}, enabled=True)
        )
    )
    assert a == b
    assert a["window"]["size"] == "1m"


def test_unknown_entity_type_lists_the_known_ones() -> None:
    errors = check_kpi_entity(parse_kpi(kpi(entity_type="invoice")), None, ["order", "sensor"])
    assert [e.field for e in errors] == ["entity_type"]
    assert "order, sensor" in errors[0].message


def test_broken_kpis_are_prefixed_with_their_code() -> None:
    narrowed = EntityTypeDefinition(entity_type="order", attributes={"amount": "string"})
    errors = broken_kpis(
        narrowed,
        [parse_kpi(kpi()), parse_kpi(kpi(code="orders_n", aggregation="count", field=None))],
    )
    assert [e.field for e in errors] == ["kpi:orders_revenue.field"]
    assert broken_kpis(ORDER, [parse_kpi(kpi())]) == []


def test_change_payload() -> None:
    assert change_payload(KPI, "k", "created", 1) == {
        "kind": "kpi_definition",
        "code": "k",
        "action": "upserted",
        "version": 1,
    }
    assert change_payload(ENTITY_TYPE, "order", "deleted", 4)["action"] == "deleted"


# -- migrations ---------------------------------------------------------------------------------


def test_parse_migrations_orders_and_ignores_other_files() -> None:
    found = parse_migrations(
        [("0002_b.sql", "B"), ("readme.md", "x"), ("0001_a.sql", "A"), ("__init__.py", "")]
    )
    assert [(m.version, m.name, m.sql) for m in found] == [(1, "a", "A"), (2, "b", "B")]


def test_duplicate_migration_versions_are_refused() -> None:
    with pytest.raises(ValueError, match="two migrations with version 1"):
        parse_migrations([("0001_a.sql", ""), ("0001_b.sql", "")])


def test_packaged_migrations_are_found() -> None:
    migrations = packaged_migrations()
    assert migrations[0].version == 1
    assert "CREATE TABLE kpi_definitions" in migrations[0].sql


# -- seeding ------------------------------------------------------------------------------------


def test_builtin_entity_types() -> None:
    names = {e.entity_type: e for e in BUILTIN_ENTITY_TYPES}
    assert set(names) == {"order", "sensor"}
    assert names["order"].attributes["items"] == "integer"
    assert names["sensor"].attributes["battery"] == "number"


def test_load_directory_skips_bad_files_and_duplicates(tmp_path: Path) -> None:
    good = (
        "code: a_kpi\ndisplay_name: A\nentity_type: order\naggregation: count\n"
        "window: {type: tumbling, size: 1m}\n"
    )
    (tmp_path / "a.yaml").write_text(good)
    (tmp_path / "b.yaml").write_text(good)  # same code again
    (tmp_path / "c.yml").write_text("code: [unclosed")
    report = SeedReport()
    loaded = load_directory(tmp_path, report)
    assert [k.code for k in loaded] == ["a_kpi"]
    assert len(report.errors) == 2
    assert "already defined" in report.errors[0]
    missing = SeedReport()
    assert load_directory(tmp_path / "nope", missing) == []
    assert "not a directory" in missing.errors[0]
