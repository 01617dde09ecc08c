"""A lazy consumer's batches (`decode_lazily`) decode stream entries exactly as the eager path
(`decode_entries`): the same deliveries, the same dead letters with the same reasons."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from analytics_engine.core.bus import (
    FIELD,
    DeliveryBatch,
    Entry,
    decode_entries,
    decode_lazily,
)
from analytics_engine.core.envelopes import ENVELOPE_FIELDS

KEY_A, KEY_B = b"ae:stream:a", b"ae:stream:b"
CHANNELS = {KEY_A: "a", KEY_B: "b"}


def envelope(i: int, **over: Any) -> bytes:
    body: dict[str, Any] = {
        "event_id": f"e-{i}",
        "event_type": "a",
        "source": "sim",
        "timestamp": "2024-01-01T00:00:00Z",
        "payload": {"i": i},
    }
    body.update(over)
    return orjson.dumps(body)


MESSAGES = st.one_of(
    st.integers(0, 1000).map(envelope),
    st.integers(0, 1000).map(lambda i: envelope(i, timestamp="2024-01-01T00:00:00")),
    st.integers(0, 1000).map(lambda i: envelope(i, trace="t")),
    st.integers(0, 1000).map(lambda i: envelope(i, timestamp="yesterday")),
    st.integers(0, 1000).map(lambda i: envelope(i, payload=[i])),
    st.sampled_from([b"{not json", b"[]", b""]),
)


@given(
    st.lists(
        st.tuples(st.sampled_from([KEY_A, KEY_B]), MESSAGES, st.integers(1, 4), st.booleans()),
        max_size=30,
    ),
    st.integers(1, 3),
    st.booleans(),
)
def test_lazy_batches_decode_like_the_eager_path(
    messages: list[tuple[bytes, bytes, int, bool]], max_deliveries: int, first: bool
) -> None:
    """`first`: first deliveries (no attempts known), which the lazy path checks as a batch."""
    entries: list[tuple[bytes, Entry]] = []
    attempts: dict[bytes, int] = {}
    for n, (key, raw, attempt, with_field) in enumerate(messages):
        entry_id = f"{n}-0".encode()
        entries.append((key, (entry_id, {FIELD: raw} if with_field else {})))
        if not first:
            attempts[entry_id] = attempt
    eager, eager_rejected = decode_entries(entries, CHANNELS, attempts, max_deliveries)
    lazy, lazy_rejected = decode_lazily(entries, CHANNELS, attempts, max_deliveries)
    assert lazy_rejected == eager_rejected
    assert len(lazy) == len(eager)
    assert lazy.ids == [d.id for d in eager]
    assert lazy.channels == [d.channel for d in eager]
    assert lazy.attempts == [d.attempt for d in eager]
    assert lazy.payloads == [d.event.payload for d in eager]
    assert lazy.envelopes == [
        {name: getattr(d.event, name) for name in ENVELOPE_FIELDS} for d in eager
    ]
    assert list(lazy) == eager  # the deliveries built on access equal the eager ones
    assert lazy[1:3] == eager[1:3]


def test_a_batch_of_first_deliveries_decodes_like_the_eager_path() -> None:
    entries: list[tuple[bytes, Entry]] = [
        (KEY_A if n % 3 else KEY_B, (f"{n}-0".encode(), {FIELD: envelope(n)})) for n in range(50)
    ]
    eager, eager_rejected = decode_entries(entries, CHANNELS, {}, 1)
    lazy, lazy_rejected = decode_lazily(entries, CHANNELS, {}, 1)
    assert lazy_rejected == eager_rejected == []
    assert lazy.channels == [d.channel for d in eager]
    assert lazy.ids == [d.id for d in eager]
    assert lazy.attempts == [1] * 50
    assert list(lazy) == eager


def test_a_delivery_is_built_once_and_indexes_behave_like_a_list() -> None:
    entries = [(KEY_A, (f"{i}-0".encode(), {FIELD: envelope(i)})) for i in range(3)]
    batch, rejected = decode_lazily(entries, CHANNELS, {}, 5)
    assert isinstance(batch, DeliveryBatch) and rejected == []
    assert batch[0] is batch[0]
    assert batch[-1].event.payload == {"i": 2}
    assert batch[-1] is batch[2]
    with pytest.raises(IndexError):
        batch[3]
    with pytest.raises(IndexError):
        batch[-4]
