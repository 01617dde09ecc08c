"""Conversions at the engine's edges (pure): bus envelopes in, result events out."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from analytics_engine.core import channels
from analytics_engine.core.envelopes import Event
from analytics_engine.core.storable import InvalidPayload, check_entity_fields
from analytics_engine.core.timestamps import parse_utc
from analytics_engine.kpi import EntityEventView, EventFields, KPIResult
from analytics_engine.kpi.engine import iso_utc
from analytics_engine.kpi.windows import to_micros

EntityEvent = EntityEventView
"""The engine's view of a `simulation.entity.created|updated` envelope."""

_KINDS: Final = {channels.ENTITY_CREATED: "created", channels.ENTITY_UPDATED: "updated"}
_RESULT_NAMESPACE: Final = uuid.UUID("0d7f5c8e-2b0f-4f57-9a3c-6c1f0e2d4b11")


class InvalidEntityEvent(ValueError):
    """The payload lacks what the engine needs (entity_type, entity_id, version, occurred_at)."""


def parse_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        parsed = parse_utc(value)  # as the database service reads it: within years 1-9999 UTC
    else:
        raise InvalidEntityEvent(f"occurred_at must be an ISO 8601 string, got {value!r}")
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def check_storable(
    channel: str, event_id: str, source: str, published_at: datetime, payload: dict[str, Any]
) -> None:
    """Raise `InvalidEntityEvent` for an event the database service does not store (it
    dead-letters it: a non-UUID `event_id`, a NUL character, a name past 200 characters, a
    negative version, no `attributes` object, ...). The engine aggregates exactly the stored
    events, so every result is what `analytics-engine verify` recomputes from `entity_events`.
    """
    try:
        check_entity_fields(channel, event_id, source, published_at, payload)
    except InvalidPayload as exc:
        raise InvalidEntityEvent(f"not storable: {exc}") from None


def entity_event(event: Event, channel: str | None = None) -> EntityEvent:
    """The engine view of an envelope: `occurred_at` from the payload, `published_at` the
    envelope timestamp. Raises `InvalidEntityEvent`."""
    payload = event.payload
    channel = channel or event.event_type
    kind, entity_type, entity_id, version, attributes = _fields(payload, channel)
    check_storable(channel, event.event_id, event.source, event.timestamp, payload)
    try:
        occurred = parse_time(payload.get("occurred_at"))
    except ValueError as exc:
        raise InvalidEntityEvent(str(exc)) from None
    published = event.timestamp
    if published.tzinfo is None:
        published = published.replace(tzinfo=UTC)
    return EntityEvent(
        event.event_id, kind, entity_type, entity_id, version, occurred, published, attributes
    )


def _fields(p: Mapping[str, Any], channel: str) -> tuple[str, str, str, int, Mapping[str, Any]]:
    kind = _KINDS.get(channel)
    if kind is None:
        raise InvalidEntityEvent(f"not an aggregated channel: {channel}")
    entity_type = p.get("entity_type")
    entity_id = p.get("entity_id")
    version = p.get("version")
    attributes = p.get("attributes")
    if not isinstance(entity_type, str) or not isinstance(entity_id, str):
        raise InvalidEntityEvent("entity_type and entity_id must be strings")
    if type(version) is not int and (not isinstance(version, int) or isinstance(version, bool)):
        raise InvalidEntityEvent("version must be an integer")
    if attributes is None:
        attributes = {}
    elif type(attributes) is not dict and not isinstance(attributes, Mapping):
        raise InvalidEntityEvent("attributes must be an object")
    return kind, entity_type, entity_id, version, attributes


class EntityEventDecoder:
    """`entity_event` for the stream processor's hot path: takes an envelope's fields as
    `envelopes.event_fields` gives them (no `Event`) and returns what `KPIEngine.feed` takes
    (no view object; times as epoch microseconds).

    Parsing an ISO timestamp and converting it to microseconds is a good part of an event's
    cost, and consecutive events mostly share both times (a producer stamps a whole batch with
    one clock reading), so the last conversion of each is remembered.
    """

    __slots__ = ("_occurred", "_occurred_us", "_published", "_published_us")

    def __init__(self) -> None:
        self._occurred: str | None = None
        self._occurred_us = 0
        self._published: datetime | None = None
        self._published_us = 0

    def decode(self, envelope: Mapping[str, Any], channel: str) -> EventFields:
        """`entity_event(Event(**envelope), channel)` as a tuple; raises `InvalidEntityEvent`
        exactly where it does."""
        payload = envelope["payload"]
        kind, entity_type, entity_id, version, attributes = _fields(payload, channel)
        check_storable(
            channel, envelope["event_id"], envelope["source"], envelope["timestamp"], payload
        )
        text = payload.get("occurred_at")
        if text is not None and text == self._occurred and type(text) is str:
            occurred = self._occurred_us
        else:
            try:
                occurred = to_micros(parse_time(text))
            except ValueError as exc:
                raise InvalidEntityEvent(str(exc)) from None
            if type(text) is str:
                self._occurred, self._occurred_us = text, occurred
        stamp = envelope["timestamp"]
        if stamp == self._published:
            published = self._published_us
        else:
            published = to_micros(stamp)
            self._published, self._published_us = stamp, published
        return (
            envelope["event_id"],
            kind,
            entity_type,
            entity_id,
            version,
            occurred,
            published,
            attributes,
        )


def result_key(result: KPIResult) -> str:
    """Identity of a (KPI, version, window, group): re-emissions of the same window share it."""
    dims = orjson.dumps(result.dimensions, option=orjson.OPT_SORT_KEYS).decode()
    return (
        f"{result.kpi_code}|{result.definition_version}|{result.window_start.isoformat()}|"
        f"{result.window_end.isoformat()}|{dims}"
    )


def result_events(
    result: KPIResult, *, source: str, now: datetime, version_since: datetime | None = None
) -> list[Event]:
    """The result on `kpi.calculated` and on `kpi.calculated.{kpi_code}`, with `version_since`
    (where its definition version begins) when given.

    Event ids derive from the window's identity, so a window re-emitted after a crash carries
    the same ids (and the same value): consumers can drop the repeat.
    """
    payload = result.to_dict()
    if version_since is not None:
        payload["version_since"] = iso_utc(version_since)
    key = result_key(result)
    return [
        Event.model_construct(
            event_id=str(uuid.uuid5(_RESULT_NAMESPACE, key)),
            event_type=channels.KPI_CALCULATED,
            source=source,
            timestamp=now,
            payload=payload,
        ),
        Event.model_construct(
            event_id=str(uuid.uuid5(_RESULT_NAMESPACE, key + "|per-kpi")),
            event_type=channels.kpi_channel(result.kpi_code),
            source=source,
            timestamp=now,
            payload=payload,
        ),
    ]
