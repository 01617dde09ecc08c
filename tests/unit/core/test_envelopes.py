"""Envelope parsing on the consume hot path: the same rules as the pydantic model."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from analytics_engine.core.envelopes import (
    ENVELOPE_FIELDS,
    Event,
    MalformedMessage,
    Request,
    Response,
    common_event_fields,
    dumps,
    event_fields,
    parse_event,
    parse_request,
    parse_response,
)

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


def test_trusted_construction_equals_pydantic_construction() -> None:
    fields = {**GOOD, "timestamp": datetime(2024, 1, 1, tzinfo=UTC)}
    fast = Event.trusted(**fields, extra={"trace": "t-1"})  # type: ignore[arg-type]
    slow = Event.model_construct(**fields, trace="t-1")
    assert fast == slow
    assert fast.model_dump() == slow.model_dump()
    assert fast.model_extra == {"trace": "t-1"}
    assert fast.model_fields_set == {"event_id", "event_type", "source", "timestamp", "payload"}


REQUEST = {
    "correlation_id": "c-1",
    "reply_to": "reply.calculation_engine.i1",
    "request_type": "execute_query",
    "source": "calculation_engine",
    "timestamp": "2024-01-01T00:00:00Z",
    "payload": {"sql": "SELECT 1"},
}


def test_requests_and_responses_parse_like_the_models_and_round_trip() -> None:
    raw = orjson.dumps(REQUEST)
    fast = parse_request(raw)
    assert fast.model_dump() == Request.model_validate_json(raw).model_dump()
    assert orjson.loads(dumps(fast)) == REQUEST  # no deadline: left out, spec-shaped
    reply = {
        "correlation_id": "c-1",
        "source": "database_service",
        "timestamp": "2024-01-01T00:00:00Z",
        "error": "nope",
        "error_code": "bad",
    }
    parsed = parse_response(orjson.dumps(reply))
    assert parsed.model_dump() == Response.model_validate(reply).model_dump()
    assert orjson.loads(dumps(parsed)) == reply


@pytest.mark.parametrize(
    "broken",
    [
        {k: v for k, v in REQUEST.items() if k != "reply_to"},
        {**REQUEST, "payload": "x"},
        {**REQUEST, "deadline": "soon"},
        {**REQUEST, "request_type": ""},
    ],
)
def test_broken_requests_are_rejected_like_pydantic_does(broken: dict[str, object]) -> None:
    raw = orjson.dumps(broken)
    with pytest.raises(MalformedMessage):
        parse_request(raw)
    with pytest.raises(ValueError):
        Request.model_validate_json(raw)


def test_a_response_needs_exactly_one_of_payload_or_error() -> None:
    for body in ({"correlation_id": "c"}, {"correlation_id": "c", "payload": {}, "error": "e"}):
        with pytest.raises(MalformedMessage):
            parse_response(orjson.dumps(body))


_VALUES = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.text(max_size=5),
    st.sampled_from(["e-1", "2024-01-01T00:00:00Z", "2024-01-01T00:00:00+02:00", "2024-01-01"]),
    st.dictionaries(st.text(max_size=3), st.booleans(), max_size=2),
)


@given(
    st.dictionaries(st.sampled_from([*GOOD, "trace"]), _VALUES, min_size=3, max_size=6).map(
        lambda d: {**GOOD, **d}
    )
)
def test_whatever_parse_event_accepts_pydantic_accepts_with_the_same_result(
    data: dict[str, object],
) -> None:
    raw = orjson.dumps(data)
    try:
        fast = parse_event(raw)
    except MalformedMessage:
        return
    slow = Event.model_validate_json(raw)
    if slow.timestamp.tzinfo is None:  # the bus takes naive times as UTC (test above)
        slow = slow.model_copy(update={"timestamp": slow.timestamp.replace(tzinfo=UTC)})
    assert fast.model_dump() == slow.model_dump()
    assert fast.model_extra == slow.model_extra


_ENVELOPES = st.one_of(
    st.dictionaries(st.sampled_from([*GOOD, "trace"]), _VALUES, min_size=0, max_size=6).map(
        lambda d: orjson.dumps({**GOOD, **d})
    ),
    st.dictionaries(st.sampled_from([*GOOD, "trace"]), _VALUES, max_size=6).map(orjson.dumps),
    st.sampled_from([b"{not json", b"[1]", b"null", b"", orjson.dumps({**GOOD, "payload": None})]),
    st.binary(max_size=20),
)


@given(_ENVELOPES)
def test_event_fields_accepts_and_rejects_exactly_like_parse_event(raw: bytes) -> None:
    """The fields-only parse (a consumer's `lazy_events`) is pinned to `parse_event`: the same
    fields, or the same rejection with the same reason."""
    try:
        event = parse_event(raw)
    except MalformedMessage as exc:
        with pytest.raises(MalformedMessage) as caught:
            event_fields(raw)
        assert str(caught.value) == str(exc)
        return
    assert event_fields(raw) == {name: getattr(event, name) for name in ENVELOPE_FIELDS}


def test_event_fields_of_the_common_and_the_uncommon_shapes() -> None:
    common = event_fields(orjson.dumps(GOOD))
    assert common == {**GOOD, "timestamp": datetime(2024, 1, 1, tzinfo=UTC)}
    naive = event_fields(orjson.dumps({**GOOD, "timestamp": "2024-01-01T00:00:00", "trace": "t"}))
    assert naive == common  # a naive time is taken as UTC; extension fields are left out
    no_payload = {k: v for k, v in GOOD.items() if k != "payload"}
    assert event_fields(orjson.dumps(no_payload))["payload"] == {}
    with pytest.raises(MalformedMessage, match="timestamp"):
        event_fields(orjson.dumps({**GOOD, "timestamp": "yesterday"}))


def _common_shape(raw: bytes) -> bool:
    """Exactly the five fields, well typed and sized, a timestamp with a zone."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    if type(data) is not dict or data.keys() != set(ENVELOPE_FIELDS):
        return False
    texts = [data[name] for name in ("event_id", "event_type", "source")]
    if not all(type(t) is str and 0 < len(t) <= 200 for t in texts):
        return False
    if type(data["payload"]) is not dict or type(data["timestamp"]) is not str:
        return False
    try:
        return datetime.fromisoformat(data["timestamp"]).tzinfo is not None
    except ValueError:
        return False


_COMMON = st.fixed_dictionaries(
    {
        "event_id": st.text(min_size=1, max_size=3),
        "event_type": st.sampled_from(["a", "b" * 200]),
        "source": st.text(min_size=1, max_size=3),
        "timestamp": st.sampled_from(
            ["2024-01-01T00:00:00Z", "2024-01-01T00:00:00.5+02:00", "2024-03-01T23:59:59-05:30"]
        ),
        "payload": st.dictionaries(st.text(max_size=3), _VALUES, max_size=2),
    }
).map(orjson.dumps)


@given(st.lists(st.one_of(_COMMON, _ENVELOPES), max_size=8))
def test_common_event_fields_is_event_fields_of_each_or_none(raws: list[bytes]) -> None:
    """The batch check (a consumer's first deliveries) gives what `event_fields` gives message
    by message, and declines (None) only a batch holding a message not in the common shape."""
    fields = common_event_fields(raws)
    if fields is None:
        assert not all(map(_common_shape, raws))
        return
    assert all(map(_common_shape, raws))
    assert fields == [event_fields(raw) for raw in raws]


@given(st.lists(_COMMON, min_size=1, max_size=8))
def test_common_event_fields_takes_a_batch_of_common_envelopes_at_once(raws: list[bytes]) -> None:
    assert common_event_fields(raws) == [event_fields(raw) for raw in raws]


def test_common_event_fields_declines_a_batch_with_one_odd_message() -> None:
    good = orjson.dumps(GOOD)
    for odd in (
        orjson.dumps({**GOOD, "trace": "t"}),  # an extension field
        orjson.dumps({**GOOD, "timestamp": "2024-01-01T00:00:00"}),  # naive time
        orjson.dumps({**GOOD, "source": ""}),
        orjson.dumps({**GOOD, "event_id": "x" * 201}),
        orjson.dumps({**GOOD, "payload": [1]}),
        orjson.dumps([GOOD]),
        b"{not json",
    ):
        assert common_event_fields([good, odd, good]) is None
    assert common_event_fields([]) == []
