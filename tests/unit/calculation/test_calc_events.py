"""The stream processor's decoder reads envelope fields (the lazy path) and must agree with
`entity_event` over the parsed `Event`, field for field and rejection for rejection, including
when it reuses the time conversions of the event before."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from analytics_engine.calculation.events import (
    EntityEventDecoder,
    InvalidEntityEvent,
    entity_event,
)
from analytics_engine.core import channels
from analytics_engine.core.envelopes import event_fields, parse_event
from analytics_engine.core.storable import InvalidPayload, parse_entity_fields
from analytics_engine.kpi.windows import to_micros

zones = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-7))])
times = st.datetimes(min_value=datetime(1990, 1, 1), timezones=zones)
# a few shared values, so consecutive events often repeat a time (the decoder's cache)
occurred_values = st.one_of(
    st.sampled_from(["2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00.5+02:00"]),
    times.map(datetime.isoformat),
    st.datetimes(min_value=datetime(1990, 1, 1)).map(datetime.isoformat),  # naive: UTC
    st.sampled_from(["", "not a time", "2026-13-01T00:00:00"]),
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
)
ints = st.integers(-(2**63), 2**63 - 1)
valid_payloads = st.fixed_dictionaries(
    {
        "entity_type": st.sampled_from(["order", "sensor"]),
        "entity_id": st.text(min_size=1, max_size=8),
        "version": st.integers(0, 10**6),
        "occurred_at": occurred_values,
        "attributes": st.dictionaries(st.text(max_size=5), ints | st.text(max_size=5)),
    }
)
wrong_values = st.sampled_from(
    [
        ("entity_type", None),
        ("entity_id", 7),
        ("version", True),
        ("version", "3"),
        ("attributes", [1]),
        ("attributes", None),  # allowed: no attributes
    ]
)


@st.composite
def payloads(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly valid payloads (the cache is exercised), some with one field wrong or missing."""
    payload: dict[str, Any] = draw(valid_payloads)
    change = draw(st.sampled_from(["none", "none", "none", "wrong", "missing"]))
    if change == "wrong":
        key, value = draw(wrong_values)
        payload[key] = value
    elif change == "missing":
        del payload[draw(st.sampled_from(sorted(payload)))]
    return payload


channel_names = st.sampled_from(
    [channels.ENTITY_CREATED, channels.ENTITY_UPDATED, channels.ENTITY_DEACTIVATED]
)
stamps = st.one_of(
    st.just(datetime(2026, 1, 1, tzinfo=UTC)),
    times,
)


def _wire(event_id: str, channel: str, stamp: datetime, payload: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id,
            "event_type": channel,
            "source": "data_simulator",
            "timestamp": stamp.isoformat(),
            "payload": payload,
        }
    )


def _reference(raw: bytes, channel: str) -> tuple[Any, ...] | str:
    try:
        view = entity_event(parse_event(raw), channel)
    except InvalidEntityEvent as exc:
        return str(exc)
    return (
        view.event_id,
        view.event_kind,
        view.entity_type,
        view.entity_id,
        view.version,
        to_micros(view.occurred_at),
        to_micros(view.published_at),
        dict(view.attributes),
    )


@given(st.lists(st.tuples(channel_names, stamps, payloads()), min_size=1, max_size=12))
def test_decoder_agrees_with_entity_event(events: list[tuple[str, datetime, Any]]) -> None:
    decoder = EntityEventDecoder()  # one decoder for the run: its cache carries over
    for n, (channel, stamp, payload) in enumerate(events):
        raw = _wire(f"00000000-0000-4000-8000-{n:012d}", channel, stamp, payload)
        expected = _reference(raw, channel)
        try:
            decoded = decoder.decode(event_fields(raw), channel)
        except InvalidEntityEvent as exc:
            assert str(exc) == expected
            continue
        assert isinstance(expected, tuple), expected
        assert (*decoded[:7], dict(decoded[7])) == expected


def test_decoder_rejects_a_channel_the_engine_does_not_aggregate() -> None:
    raw = _wire(
        "e1",
        channels.ENTITY_DEACTIVATED,
        datetime(2026, 1, 1, tzinfo=UTC),
        {"entity_type": "order", "entity_id": "o1", "version": 1, "occurred_at": "2026-01-01"},
    )
    with pytest.raises(InvalidEntityEvent, match="not an aggregated channel"):
        EntityEventDecoder().decode(event_fields(raw), channels.ENTITY_DEACTIVATED)


# What the database service refuses to store (it dead-letters the event), next to valid values.
hostile_ids = st.sampled_from(
    ["hand-evt-1", "7b2c8a9e-1f3d-4c5b-9a8e-0d1c2b3a4f5e", "7B2C8A9E1F3D4C5B9A8E0D1C2B3A4F5E"]
)
hostile_names = st.sampled_from(["order", "", "x" * 200, "x" * 201, "a\x00b"])
hostile_versions = st.sampled_from([0, 1, -1, 2**63 - 1, 2**63])
hostile_attributes = st.sampled_from(
    [{"amount": 1.5}, {}, {"a\x00": 1}, {"a": "\x00"}, {"a": {"b": ["\x00"]}}, {"a": "\\u0000"}]
)
hostile_payloads = st.fixed_dictionaries(
    {
        "entity_type": hostile_names,
        "entity_id": hostile_names,
        "version": hostile_versions,
        "occurred_at": st.sampled_from(
            ["2026-01-01T00:00:00+00:00", "0001-01-01T00:00:00+14:00", "2026-01-01"]
        ),
        "attributes": hostile_attributes,
    }
).flatmap(
    lambda p: st.sampled_from(["keep", "drop", "null"]).map(
        lambda how: (
            p
            if how == "keep"
            else {k: v for k, v in p.items() if k != "attributes"}
            if how == "drop"
            else {**p, "attributes": None}
        )
    )
)


@given(
    hostile_ids,
    st.sampled_from([channels.ENTITY_CREATED, channels.ENTITY_UPDATED]),
    st.sampled_from(["data_simulator", "a\x00b"]),
    hostile_payloads,
)
def test_the_engine_aggregates_exactly_the_events_the_database_stores(
    event_id: str, channel: str, source: str, payload: dict[str, Any]
) -> None:
    """An event the database service dead-letters must not count in a KPI: `verify`
    recomputes every KPI from the stored events, and it failed on a hand-published event with
    the documented envelope whose `event_id` was no UUID (the engine had counted it)."""
    raw = orjson.dumps(
        {
            "event_id": event_id,
            "event_type": channel,
            "source": source,
            "timestamp": "2026-01-01T00:00:01+00:00",
            "payload": payload,
        }
    )
    event = parse_event(raw)
    try:
        parse_entity_fields(channel, event.event_id, event.source, event.timestamp, event.payload)
        stored = True
    except InvalidPayload:
        stored = False
    try:
        EntityEventDecoder().decode(event_fields(raw), channel)
        aggregated = True
    except InvalidEntityEvent:
        aggregated = False
    assert aggregated == stored, (event_id, source, payload)
    assert isinstance(_reference(raw, channel), tuple) == stored
