"""StreamMerger: publication order across streams, redeliveries dropped, quiet streams."""

from __future__ import annotations

import random

from analytics_engine.calculation.ordering import StreamMerger
from analytics_engine.core.channels import parse_stream_id

A, B = "a", "b"


def test_releases_in_global_id_order_only_when_no_stream_can_precede() -> None:
    m: StreamMerger[str] = StreamMerger((A, B))
    for sid in [(1, 0), (3, 0), (5, 0)]:
        assert m.offer(A, sid, f"a{sid[0]}")
    assert m.release() == []  # b may still deliver something earlier
    m.offer(B, (2, 0), "b2")
    m.offer(B, (4, 0), "b4")
    # b may still deliver more of millisecond 4: only what lies below it is safe
    assert [x for _, x in m.release()] == ["a1", "b2", "a3"]
    assert m.buffered == 2
    m.mark_caught_up(B, 10)
    assert [x for _, x in m.release()] == ["b4"]
    m.mark_caught_up(A, 6)
    assert [x for _, x in m.release()] == ["a5"]
    assert m.released() == {A: (5, 0), B: (4, 0)}
    assert m.newest_buffered() == []


def test_offer_many_parses_ids_and_drops_redeliveries_like_offer() -> None:
    one: StreamMerger[str] = StreamMerger((A, B))
    many: StreamMerger[str] = StreamMerger((A, B))
    items = [(A, b"5-0", "a5"), (B, b"3-1", "b3"), (A, b"5-0", "a5 again"), (A, b"4-9", "old")]
    for channel, raw, item in items:
        one.offer(channel, parse_stream_id(raw), item)
    assert many.offer_many(items) == 2
    assert many.newest_buffered() == one.newest_buffered() == ["a5", "b3"]
    assert many.delivered(A) == (5, 0) and many.delivered(B) == (3, 1)


def test_newest_buffered_is_the_last_held_item_of_each_stream() -> None:
    m: StreamMerger[str] = StreamMerger((A, B))
    m.offer(A, (1, 0), "a1")
    m.offer(A, (2, 0), "a2")
    assert m.newest_buffered() == ["a2"]
    m.offer(B, (2, 0), "b2")
    assert m.release() == [(A, "a1")]  # millisecond 2 may still get entries
    assert m.newest_buffered() == ["a2", "b2"]


def test_items_of_one_millisecond_are_ordered_by_the_tiebreak() -> None:
    m: StreamMerger[tuple[str, float]] = StreamMerger((A, B), tiebreak=lambda item: item[1])
    m.offer(A, (7, 0), ("a", 0.3))
    m.offer(A, (7, 1), ("a", 0.5))
    m.offer(B, (7, 0), ("b", 0.4))
    m.mark_caught_up(A, 8)
    m.mark_caught_up(B, 8)
    assert [x[1] for _, x in m.release()] == [0.3, 0.4, 0.5]


def test_random_interleavings_release_a_sorted_complete_sequence() -> None:
    rng = random.Random(3)
    ids = sorted({(rng.randrange(10_000), rng.randrange(3)) for _ in range(2000)})
    streams = {A: [], B: []}
    for sid in ids:
        streams[rng.choice((A, B))].append(sid)
    m: StreamMerger[tuple[int, int]] = StreamMerger((A, B), tiebreak=lambda sid: sid)
    out: list[tuple[int, int]] = []
    pos = {A: 0, B: 0}
    while pos[A] < len(streams[A]) or pos[B] < len(streams[B]):
        c = rng.choice((A, B))
        for sid in streams[c][pos[c] : pos[c] + rng.randrange(1, 50)]:
            m.offer(c, sid, sid)
            pos[c] += 1
        out.extend(x for _, x in m.release())
    m.mark_caught_up(A, 10**9)
    m.mark_caught_up(B, 10**9)
    out.extend(x for _, x in m.release())
    assert out == ids


def test_redeliveries_are_dropped_and_restart_position_respected() -> None:
    m: StreamMerger[str] = StreamMerger((A, B), released={A: (5, 0)})
    assert not m.offer(A, (4, 9), "old")
    assert m.offer(A, (6, 0), "new")
    assert not m.offer(A, (6, 0), "again")
    assert parse_stream_id(b"1700000000000-12") == (1700000000000, 12)
