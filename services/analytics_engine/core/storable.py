"""What the database can store of an entity event, and the field checks behind it (pure).

The database service stores exactly the entity events these rules accept and dead-letters the
others with the reason given here; the calculation engine aggregates exactly the same events
(`calculation.events`), so every KPI is what `analytics-engine verify` recomputes from
`entity_events`. The checks cover everything PostgreSQL would reject for one row (NUL
characters, non-UUID ids, out-of-range integers), so a bad event is caught before it makes a
whole batch's INSERT fail.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final, Literal, NamedTuple

import orjson

from analytics_engine.core import channels
from analytics_engine.core.envelopes import Event
from analytics_engine.core.jsontext import contains_nul
from analytics_engine.core.timestamps import BadTimestamp, parse_utc

EventKind = Literal["created", "updated", "deactivated"]

KIND_BY_CHANNEL: Final[dict[str, EventKind]] = {
    channels.ENTITY_CREATED: "created",
    channels.ENTITY_UPDATED: "updated",
    channels.ENTITY_DEACTIVATED: "deactivated",
}
CHANNEL_BY_KIND: Final[dict[str, str]] = {kind: ch for ch, kind in KIND_BY_CHANNEL.items()}

INT64_MAX: Final = 2**63 - 1
MAX_NAME: Final = 200


class InvalidPayload(ValueError):
    """The event cannot be stored as it is; the message says why (goes to the dead letter)."""


class EntityEventRow(NamedTuple):
    """One row of `entity_events`, in column order.

    A tuple, so it is its own COPY record: the batch goes to asyncpg without a copy per event
    (the database service's hot path handles every entity event).
    """

    event_id: str  # a UUID, as text
    event_kind: EventKind
    entity_type: str
    entity_id: str
    version: int
    occurred_at: datetime
    published_at: datetime
    attributes: str | None  # JSON text; None for deactivations
    reason: str | None
    source: str

    def as_record(self) -> tuple[Any, ...]:
        return self


# -- field checks ---------------------------------------------------------------------------
def text_field(payload: dict[str, Any], name: str, *, max_len: int = MAX_NAME) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidPayload(f"{name}: a non-empty string is required")
    if len(value) > max_len:
        raise InvalidPayload(f"{name}: longer than {max_len} characters")
    if "\x00" in value:
        raise InvalidPayload(f"{name}: contains a NUL character")
    return value


def int_field(payload: dict[str, Any], name: str, *, maximum: int = INT64_MAX) -> int:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload(f"{name}: an integer is required")
    if not 0 <= value <= maximum:
        raise InvalidPayload(f"{name}: must be between 0 and {maximum}")
    return value


def parse_timestamp(value: Any, name: str) -> datetime:
    """An ISO-8601 timestamp, normalised to UTC; one without an offset is taken as UTC."""
    if not isinstance(value, str):
        raise InvalidPayload(f"{name}: an ISO-8601 timestamp string is required")
    try:
        return parse_utc(value)
    except BadTimestamp as exc:
        raise InvalidPayload(f"{name}: {exc.reason}: {value[:40]!r}") from None


def json_object_field(payload: dict[str, Any], name: str) -> tuple[dict[str, Any], str]:
    value = payload.get(name)
    if not isinstance(value, dict):
        raise InvalidPayload(f"{name}: an object is required")
    text = orjson.dumps(value).decode()
    # jsonb rejects \u0000 escapes; text columns reject NUL bytes. The search in the text is
    # fast but also finds an escaped backslash before "u0000" (legitimate): confirm on values.
    if "\\u0000" in text and contains_nul(value):
        raise InvalidPayload(f"{name}: contains a NUL character")
    return value, text


_UUID: Final = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)


def _json_text(payload: dict[str, Any], name: str) -> str:
    """A JSON object field as compact JSON text (what `entity_events.attributes` stores)."""
    return json_object_field(payload, name)[1]


# -- parsers --------------------------------------------------------------------------------
_new_row: Final = tuple.__new__  # builds the NamedTuple without its Python-level __new__
# The event id is checked to be a UUID but kept as text: asyncpg encodes it in C, much faster
# than building `uuid.UUID` objects on the hot path.
_uuid_match: Final = _UUID.fullmatch


def parse_entity_event(channel: str, event: Event) -> EntityEventRow:
    """Validate a `simulation.entity.*` event into an `entity_events` row."""
    return parse_entity_fields(
        channel, event.event_id, event.source, event.timestamp, event.payload
    )


def parse_entity_fields(
    channel: str,
    event_id: str,
    source: str,
    published_at: datetime,
    payload: dict[str, Any],
    *,
    times: dict[str, datetime] | None = None,
) -> EntityEventRow:
    """`parse_entity_event` from the envelope's fields (a lazy batch's `envelopes`, no `Event`).

    Runs for every entity event, so the common case is checked inline, in one go: a field that
    fails the inline check goes through its helper (`text_field`, `int_field`), which raises
    the reason (or accepts it, e.g. a `str` subclass). The checks run in a fixed order, so an
    event with several faults always gets the same reason; `test_model_properties` pins this
    function to the field-by-field reference.

    `times`: `occurred_at` texts parsed already (a batch's events often share one) -> their
    value; a text parsed here is added.
    """
    kind = KIND_BY_CHANNEL.get(channel)
    if kind is None:
        raise InvalidPayload(f"not an entity channel: {channel}")
    attributes: str | None = None
    reason: str | None = None
    if kind == "deactivated":
        raw_reason = payload.get("reason")
        if raw_reason is not None:
            if not isinstance(raw_reason, str) or "\x00" in raw_reason:
                raise InvalidPayload("reason: must be a string without NUL characters")
            reason = raw_reason[:2000]
    else:
        attributes = _json_text(payload, "attributes")
    if "\x00" in source:
        raise InvalidPayload("source: contains a NUL character")
    if published_at.tzinfo is None:
        published_at = published_at.replace(tzinfo=UTC)
    if not _uuid_match(event_id):
        raise InvalidPayload("event_id: must be a UUID")
    entity_type = payload.get("entity_type")
    if (
        type(entity_type) is not str
        or not 0 < len(entity_type) <= MAX_NAME
        or "\x00" in entity_type
    ):
        entity_type = text_field(payload, "entity_type")
    entity_id = payload.get("entity_id")
    if type(entity_id) is not str or not 0 < len(entity_id) <= MAX_NAME or "\x00" in entity_id:
        entity_id = text_field(payload, "entity_id")
    version = payload.get("version")
    if type(version) is not int or not 0 <= version <= INT64_MAX:
        version = int_field(payload, "version")
    raw_time = payload.get("occurred_at")
    if times is None or type(raw_time) is not str:
        occurred_at = parse_timestamp(raw_time, "occurred_at")
    else:
        known = times.get(raw_time)
        if known is None:
            occurred_at = times[raw_time] = parse_timestamp(raw_time, "occurred_at")
        else:
            occurred_at = known
    return _new_row(
        EntityEventRow,
        (
            event_id,
            kind,
            entity_type,
            entity_id,
            version,
            occurred_at,
            published_at,
            attributes,
            reason,
            source,
        ),
    )


def check_entity_fields(
    channel: str, event_id: str, source: str, published_at: datetime, payload: dict[str, Any]
) -> None:
    """Raise `InvalidPayload` for an event `parse_entity_fields` refuses, without building its
    row (the calculation engine aggregates exactly the stored events). The common case is
    checked inline, as there; anything else goes through `parse_entity_fields`, which decides
    and names the reason. `test_calc_events` pins the two together."""
    entity_type = payload.get("entity_type")
    entity_id = payload.get("entity_id")
    version = payload.get("version")
    attributes = payload.get("attributes")
    if (
        type(entity_type) is str
        and 0 < len(entity_type) <= MAX_NAME
        and "\x00" not in entity_type
        and type(entity_id) is str
        and 0 < len(entity_id) <= MAX_NAME
        and "\x00" not in entity_id
        and type(version) is int
        and 0 <= version <= INT64_MAX
        and "\x00" not in source
        and type(attributes) is dict
        and _uuid_match(event_id) is not None
        and b"\\u0000" not in orjson.dumps(attributes)
    ):
        return
    parse_entity_fields(channel, event_id, source, published_at, payload)
