"""`EventPublisher.encode_batch` gives the bytes the model path gives, event for event."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from analytics_engine.core import channels
from analytics_engine.core.bus import EventPublisher, encode_event

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
payloads = st.dictionaries(st.text(), json_values, max_size=6)
channel_names = st.sampled_from(
    [channels.ENTITY_CREATED, channels.ENTITY_UPDATED, channels.KPI_CALCULATED]
)
times = st.datetimes(
    min_value=datetime(2000, 1, 1), timezones=st.sampled_from([UTC, timezone(timedelta(hours=2))])
)


@given(
    st.lists(st.tuples(channel_names, payloads), max_size=8),
    st.lists(st.text(min_size=1, max_size=40), min_size=8, max_size=8),
    times,
    st.text(min_size=1, max_size=30),
)
def test_same_bytes_as_encoding_each_event(
    items: list[tuple[str, dict[str, Any]]], ids: list[str], when: datetime, source: str
) -> None:
    publisher = EventPublisher(Redis(), source=source, stream_maxlen=1000)
    ids = ids[: len(items)]
    expected = [
        (ch, encode_event(publisher.make_event(ch, p, event_id=i, timestamp=when)))
        for (ch, p), i in zip(items, ids, strict=True)
    ]
    assert publisher.encode_batch(items, ids, when) == expected


def test_the_bytes_are_a_spec_shaped_envelope() -> None:
    publisher = EventPublisher(Redis(), source="data_simulator", stream_maxlen=1000)
    when = datetime(2026, 12, 2, 12, 0, 0, 123456, tzinfo=UTC)
    [(channel, data)] = publisher.encode_batch(
        [(channels.ENTITY_CREATED, {"entity_id": "o-1"})], ["e-1"], when
    )
    assert channel == channels.ENTITY_CREATED
    assert orjson.loads(data) == {
        "event_id": "e-1",
        "event_type": channels.ENTITY_CREATED,
        "source": "data_simulator",
        "timestamp": "2026-12-02T12:00:00.123456Z",
        "payload": {"entity_id": "o-1"},
    }
