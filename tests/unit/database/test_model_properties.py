"""`parse_entity_event` checks the common case inline; this pins it, on arbitrary events, to the
field-by-field reference it replaced: the same row, or the same dead-letter reason."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analytics_engine.core import channels, storable
from analytics_engine.core.envelopes import Event
from analytics_engine.core.storable import (
    KIND_BY_CHANNEL,
    EntityEventRow,
    InvalidPayload,
    parse_entity_event,
    parse_entity_fields,
)


def reference_parse(channel: str, event: Event) -> EntityEventRow:
    """The field-by-field parser, as it was before the inline fast path."""
    kind = KIND_BY_CHANNEL.get(channel)
    if kind is None:
        raise InvalidPayload(f"not an entity channel: {channel}")
    payload = event.payload
    attributes: str | None = None
    reason: str | None = None
    if kind == "deactivated":
        raw_reason = payload.get("reason")
        if raw_reason is not None:
            if not isinstance(raw_reason, str) or "\x00" in raw_reason:
                raise InvalidPayload("reason: must be a string without NUL characters")
            reason = raw_reason[:2000]
    else:
        attributes = storable._json_text(payload, "attributes")
    source = event.source
    if "\x00" in source:
        raise InvalidPayload("source: contains a NUL character")
    published_at = event.timestamp
    if published_at.tzinfo is None:
        published_at = published_at.replace(tzinfo=UTC)
    if not storable._UUID.fullmatch(event.event_id):
        raise InvalidPayload("event_id: must be a UUID")
    return EntityEventRow(
        event.event_id,
        kind,
        storable.text_field(payload, "entity_type"),
        storable.text_field(payload, "entity_id"),
        storable.int_field(payload, "version"),
        storable.parse_timestamp(payload.get("occurred_at"), "occurred_at"),
        published_at,
        attributes,
        reason,
        source,
    )


class _Str(str):
    """A `str` subclass: the inline checks reject it, the helpers accept it."""


# Texts at and around the limits (200 characters, no NUL), and a subclass of `str`.
_TEXT_BOUNDARIES: list[str] = ["", "x" * 200, "x" * 201, "\x00", "a\x00b", _Str("s"), _Str("")]
_TEXT = st.sampled_from(_TEXT_BOUNDARIES)
_ANY = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.lists(st.none()))
_MISSING = object()
# Per field: a valid value, and anything (usually invalid, sometimes valid in another way).
_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "entity_type": (st.just("order"), _TEXT | _TEXT | _ANY | st.just(_MISSING)),
    "entity_id": (st.text(min_size=1, max_size=8), _TEXT | _TEXT | _ANY | st.just(_MISSING)),
    "version": (
        st.integers(min_value=0, max_value=2**63 - 1),
        st.one_of(
            st.integers(min_value=-2, max_value=1),
            st.sampled_from([0, 2**63 - 1, 2**63, -1, True, False, 1.0, "1", _MISSING]),
            _ANY,
        ),
    ),
    "occurred_at": (
        st.sampled_from(["2024-01-01T01:00:00+01:00", "2024-01-01T00:00:00.5Z"]),
        st.one_of(
            st.sampled_from(["2024-01-01T00:00:00", "2024-01-01", "now", "", "2024-13-01"]),
            _ANY,
            st.just(_MISSING),
        ),
    ),
    "attributes": (
        st.dictionaries(
            st.text(max_size=3),
            st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text(max_size=3)),
        ),
        st.one_of(_ANY, st.just({"a": "\x00"}), st.just(_MISSING)),
    ),
    "reason": (st.one_of(st.just(_MISSING), st.text(max_size=5)), st.one_of(_TEXT, _ANY)),
}
_ENVELOPE: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "channel": (st.sampled_from(list(KIND_BY_CHANNEL)), st.just(channels.KPI_CALCULATED)),
    "event_id": (
        st.uuids().map(str),
        st.one_of(st.uuids().map(lambda u: u.hex), st.text(max_size=8)),
    ),
    "source": (st.just("sim"), st.just("si\x00m")),
    "timestamp": (
        st.just(datetime(2024, 1, 1, tzinfo=UTC)),
        st.just(datetime(2024, 1, 1)),
    ),
}


@st.composite
def _events(draw: st.DrawFn) -> tuple[str, Event]:
    """An event with a few fields (often none) replaced by arbitrary values."""
    faults = draw(st.sets(st.sampled_from([*_FIELDS, *_ENVELOPE]), max_size=3))

    def value(name: str, strategies: tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]) -> Any:
        return draw(strategies[1] if name in faults else strategies[0])

    payload = {}
    for name, strategies in _FIELDS.items():
        field = value(name, strategies)
        if field is not _MISSING:
            payload[name] = field
    envelope = {name: value(name, strategies) for name, strategies in _ENVELOPE.items()}
    event = Event.trusted(
        event_id=envelope["event_id"],
        event_type=envelope["channel"],
        source=envelope["source"],
        timestamp=envelope["timestamp"],
        payload=payload,
    )
    return envelope["channel"], event


def _outcome(parse: Any, channel: str, event: Event) -> tuple[str, Any]:
    try:
        row = parse(channel, event)
    except InvalidPayload as exc:
        return "invalid", str(exc)
    assert type(row) is EntityEventRow
    return "row", tuple(row)


_VALID_PAYLOAD: dict[str, Any] = {
    "entity_type": "order",
    "entity_id": "o-1",
    "version": 3,
    "occurred_at": "2024-01-01T01:00:00+01:00",
    "attributes": {"a": 1},
}
_SINGLE_FAULTS: list[tuple[str, Any]] = [
    (name, value)
    for name in ("entity_type", "entity_id")
    for value in [
        "",
        "x" * 200,
        "x" * 201,
        "\x00",
        "a\x00b",
        _Str("s"),
        _Str(""),
        1,
        None,
        _MISSING,
    ]
] + [
    ("version", value) for value in [0, 2**63 - 1, 2**63, -1, True, False, 1.0, "1", None, _MISSING]
]


@pytest.mark.parametrize(("name", "value"), _SINGLE_FAULTS)
@pytest.mark.parametrize("channel", list(KIND_BY_CHANNEL))
def test_each_boundary_alone_gets_the_reference_verdict(
    channel: str, name: str, value: Any
) -> None:
    payload = {**_VALID_PAYLOAD, name: value}
    if value is _MISSING:
        del payload[name]
    event = Event.trusted(
        event_id="0c5c8a7f-d290-5a48-9096-000000000000",
        event_type=channel,
        source="sim",
        timestamp=datetime(2024, 1, 1, tzinfo=UTC),
        payload=payload,
    )
    assert _outcome(parse_entity_event, channel, event) == _outcome(reference_parse, channel, event)


@settings(max_examples=400)
@given(_events())
def test_the_inline_parser_is_the_field_by_field_one(drawn: tuple[str, Event]) -> None:
    channel, event = drawn
    assert _outcome(parse_entity_event, channel, event) == _outcome(reference_parse, channel, event)


@settings(max_examples=200)
@given(st.lists(_events(), max_size=12))
def test_a_batchs_parsed_times_change_no_outcome(batch: list[tuple[str, Event]]) -> None:
    """`parse_entity_fields` with `times` shared over a batch (as the consumer calls it) gives
    every event the outcome it gets alone, valid or not, and the cache holds the times parsed."""
    times: dict[str, datetime] = {}

    def shared(channel: str, event: Event) -> EntityEventRow:
        return parse_entity_fields(
            channel, event.event_id, event.source, event.timestamp, event.payload, times=times
        )

    doubled = batch + batch  # the second time round every valid time comes from the cache
    for channel, event in doubled:
        assert _outcome(shared, channel, event) == _outcome(parse_entity_event, channel, event)
    for text, moment in times.items():
        assert moment == storable.parse_timestamp(text, "occurred_at")
