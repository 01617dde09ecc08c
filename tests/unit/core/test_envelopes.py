"""Envelope parsing on the consume hot path: the same rules as the pydantic model."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from analytics_engine.core.envelopes import Event, MalformedMessage, parse_event

GOOD = {
    "event_id": "e-1",
    "event_type": "simulation.entity.created",
    "source": "data_simulator",
    "timestamp": "2024-01-01T00:00:00Z",
    "payload": {"entity_id": "o-1"},
}


def test_a_spec_event_parses_to_the_same_model_as_pydantic_validation() -> None:
    raw = orjson.dumps(GOOD)
    fast, slow = parse_event(raw), Event.model_validate_json(raw)
    assert fast.model_dump() == slow.model_dump()
    assert fast.timestamp == datetime(2024, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (orjson.dumps({**GOOD, "event_id": ""}), "event_id"),
        (orjson.dumps({**GOOD, "source": 7}), "source"),
        (orjson.dumps({k: v for k, v in GOOD.items() if k != "event_type"}), "event_type"),
        (orjson.dumps({**GOOD, "payload": [1]}), "payload"),
        (orjson.dumps({**GOOD, "timestamp": "yesterday"}), "timestamp"),
        (orjson.dumps({**GOOD, "event_id": "x" * 201}), "event_id"),
    ],
)
def test_malformed_events_are_rejected_with_the_field_named(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedMessage, match=message):
        parse_event(raw)
    with pytest.raises(ValueError):  # and pydantic agrees they are invalid
        Event.model_validate_json(raw)


def test_naive_timestamps_are_taken_as_utc() -> None:
    event = parse_event(orjson.dumps({**GOOD, "timestamp": "2024-01-01T00:00:00"}))
    assert event.timestamp.tzinfo is not None
