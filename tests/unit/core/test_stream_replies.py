"""The bus's reading of raw XREADGROUP replies (the integration test pins it to redis-py's)."""

from __future__ import annotations

from analytics_engine.core.bus import raw_entries


def test_raw_entries_reads_both_reply_protocols() -> None:
    resp2 = [[b"k1", [[b"1-0", [b"m", b"x"]], [b"1-1", None]]], [b"k2", [[b"2-0", [b"m", b"y"]]]]]
    resp3 = {b"k1": resp2[0][1], b"k2": resp2[1][1]}
    expected = [
        (b"k1", (b"1-0", {b"m": b"x"})),
        (b"k1", (b"1-1", {})),
        (b"k2", (b"2-0", {b"m": b"y"})),
    ]
    assert raw_entries(resp2) == raw_entries(resp3) == expected
    assert raw_entries(None) == raw_entries({}) == []
