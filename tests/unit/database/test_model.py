"""Payload validation and entity-state folding (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from analytics_engine.core import channels
from analytics_engine.core.envelopes import Event
from analytics_engine.core.storable import (
    EntityEventRow,
    InvalidPayload,
    parse_entity_event,
    parse_timestamp,
)
from analytics_engine.database.model import (
    canonical_dimensions,
    fold_entity_events,
    parse_kpi_result,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def event(channel: str = channels.ENTITY_CREATED, **payload: Any) -> Event:
    base: dict[str, Any] = {
        "entity_type": "order",
        "entity_id": "o-1",
        "version": 1,
        "occurred_at": "2024-01-01T01:00:00+01:00",
        "attributes": {"amount": 5},
    }
    base.update(payload)
    return Event(
        event_type=channel, source="sim", payload={k: v for k, v in base.items() if v is not ...}
    )


def test_a_valid_event_becomes_a_row_with_utc_time_and_json_attributes() -> None:
    row = parse_entity_event(channels.ENTITY_CREATED, event())
    assert row.event_kind == "created"
    assert row.occurred_at == T0 and row.occurred_at.tzinfo == UTC
    assert row.attributes == '{"amount":5}'
    assert row.reason is None and row.source == "sim"


def test_a_deactivation_needs_no_attributes_and_keeps_its_reason() -> None:
    row = parse_entity_event(
        channels.ENTITY_DEACTIVATED, event(channels.ENTITY_DEACTIVATED, attributes=..., reason="x")
    )
    assert (row.event_kind, row.attributes, row.reason) == ("deactivated", None, "x")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"entity_id": ""}, "entity_id"),
        ({"entity_type": 5}, "entity_type"),
        ({"version": "1"}, "version"),
        ({"version": True}, "version"),
        ({"version": -1}, "version"),
        ({"version": 2**63}, "version"),
        ({"occurred_at": "soon"}, "occurred_at"),
        ({"occurred_at": 1700000000}, "occurred_at"),
        ({"attributes": [1]}, "attributes"),
        ({"attributes": ...}, "attributes"),
        ({"attributes": {"a": "\x00"}}, "attributes"),
        ({"entity_id": "a\x00b"}, "entity_id"),
    ],
)
def test_invalid_payloads_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPayload, match=field):
        parse_entity_event(channels.ENTITY_CREATED, event(**change))


def test_a_non_uuid_event_id_is_invalid() -> None:
    e = Event(
        event_id="abc", event_type=channels.ENTITY_CREATED, source="s", payload=event().payload
    )
    with pytest.raises(InvalidPayload, match="event_id"):
        parse_entity_event(channels.ENTITY_CREATED, e)


def kpi(**change: Any) -> Event:
    payload: dict[str, Any] = {
        "kpi_code": "rev",
        "value": 1,
        "window_start": "2024-01-01T00:00:00Z",
        "window_end": "2024-01-01T00:01:00Z",
        "dimensions": {"b": 1, "a": None},
        "sample_count": 2,
        "definition_version": 3,
        "computed_at": "2024-01-01T00:01:05Z",
    }
    payload.update(change)
    return Event(event_type=channels.KPI_CALCULATED, source="calc", payload=payload)


def test_kpi_results_get_a_canonical_dims_key() -> None:
    row = parse_kpi_result(kpi())
    assert row.dims_key == '{"a":null,"b":1}' == canonical_dimensions({"b": 1, "a": None})
    assert row.value == 1.0 and isinstance(row.value, float)
    no_dimensions = kpi()
    del no_dimensions.payload["dimensions"]
    assert parse_kpi_result(no_dimensions).dims_key == "{}"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kpi_code": "Rev"}, "kpi_code"),
        ({"value": "1"}, "value"),
        ({"value": True}, "value"),
        ({"window_end": "2024-01-01T00:00:00Z"}, "window_end"),
        ({"dimensions": [1]}, "dimensions"),
        ({"dimensions": None}, "dimensions"),  # the schema's dimensions is an object
        # values are scalars, as the archive requires (stored here, it was never archived)
        ({"dimensions": {"": []}}, "dimensions"),
        ({"dimensions": {"region": {"nested": "x"}}}, "dimensions"),
        ({"sample_count": -1}, "sample_count"),
        ({"definition_version": 2**31}, "definition_version"),
    ],
)
def test_invalid_kpi_results(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPayload, match=field):
        parse_kpi_result(kpi(**change))


def row(kind: str, version: int, entity_id: str = "e", offset: int = 0) -> EntityEventRow:
    return EntityEventRow(
        event_id=f"00000000-0000-0000-0000-{version:012d}",
        event_kind=kind,  # type: ignore[arg-type]
        entity_type="t",
        entity_id=entity_id,
        version=version,
        occurred_at=T0 + timedelta(seconds=offset),
        published_at=T0,
        attributes=None if kind == "deactivated" else f'{{"v":{version}}}',
        reason="r" if kind == "deactivated" else None,
        source="s",
    )


def test_folding_keeps_the_newest_attributes_then_a_newer_deactivation() -> None:
    steps = fold_entity_events(
        [
            row("updated", 3, offset=3),
            row("created", 1, offset=1),
            row("deactivated", 4),
            row("updated", 2),
        ]
    )
    assert steps == {0: (1, T0), 2: (2, T0)}


def test_an_older_deactivation_is_dropped_and_ties_go_to_the_earlier_event() -> None:
    steps = fold_entity_events(
        [
            row("deactivated", 1, "b", offset=5),
            row("updated", 2, "b", offset=9),
            row("deactivated", 1, "a", offset=3),
            row("deactivated", 1, "a", offset=1),
            row("updated", 2, "b", offset=7),
        ]
    )
    later = timedelta(seconds=5)
    assert steps == {1: (1, T0 + later), 2: (1, T0 + timedelta(seconds=1))}


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_a_timestamp_outside_the_utc_years_is_invalid_not_a_crash(value: str) -> None:
    """`kpi_history` reads its range with this: an OverflowError was a handler crash (502)."""
    with pytest.raises(InvalidPayload, match="out of range"):
        parse_timestamp(value, "start")
    assert parse_timestamp("0001-01-01T00:00:00-01:00", "start").tzinfo is UTC


def test_a_backslash_before_u0000_is_text_not_nul() -> None:
    """JSON-encoded, a backslash then `u0000` reads `\\\\u0000`: only a real NUL is refused."""
    row = parse_entity_event(channels.ENTITY_CREATED, event(attributes={"path": "C:\\u0000"}))
    assert row.attributes == '{"path":"C:\\\\u0000"}'
    with pytest.raises(InvalidPayload, match="attributes"):
        parse_entity_event(channels.ENTITY_CREATED, event(attributes={"k\x00": 1}))
