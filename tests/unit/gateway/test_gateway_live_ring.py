"""The result ring and the fan-out hub (no Redis: the hub's input is bytes)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from analytics_engine.gateway.live import (
    LiveHub,
    ResultRing,
    Resume,
    StreamSlots,
    parse_last_event_id,
    sse_comment,
    sse_frame,
)


def envelope(code: str, value: float) -> bytes:
    return orjson.dumps(
        {
            "event_id": "e",
            "event_type": f"kpi.calculated.{code}",
            "source": "calculation_engine",
            "timestamp": "2024-01-01T00:00:00Z",
            "payload": {"kpi_code": code, "value": value},
        }
    )


def test_frames() -> None:
    assert sse_frame(7, "kpi", b'{"a":1}') == b'id: 7\nevent: kpi\ndata: {"a":1}\n\n'
    assert sse_comment("a\nb") == b": a b\n\n"
    assert parse_last_event_id(" 12 ") == 12
    assert parse_last_event_id("abc") is None
    assert parse_last_event_id(None) is None
    assert parse_last_event_id("9" * 30) is None
    assert parse_last_event_id("²") is None  # a digit to str.isdigit(), not to int()
    assert parse_last_event_id("١٢") is None  # Arabic-Indic digits: not an id we issued


def test_ring_ids_increase_and_start_above_a_previous_process() -> None:
    clock = iter([1000.0, 1000.0, 1000.0, 999.0]).__next__
    ring = ResultRing(3, clock=clock)
    ids = [ring.append("a", b"{}").id for _ in range(4)]
    assert ids[0] == 1_000_000_000 and ids == sorted(set(ids))  # never goes back
    assert len(ring) == 3
    assert [r.id for r in ring.after(ids[1])] == ids[2:]
    assert ring.missed(ids[0] - 5)  # evicted entries after that id
    assert not ring.missed(ids[0])  # ids[1] is the oldest kept, nothing lost after ids[0]


def test_resume_points() -> None:
    ring = ResultRing(3, clock=iter([1000.0] * 10).__next__)
    assert ring.resume(None) == Resume(0, gap=False)
    assert ring.resume(5) == Resume(0, gap=True)  # empty ring: nothing issued yet
    ids = [ring.append("a", b"{}").id for _ in range(5)]
    assert ring.resume(None) == Resume(ids[-1], gap=False)
    assert ring.resume(ids[2]) == Resume(ids[2], gap=False)
    assert ring.resume(ids[0]) == Resume(ids[0], gap=True)  # ids[1] was evicted
    # Beyond the counter (another replica's id, a clock ahead, a made-up id): not taken as
    # given, which would hold back every result until the counter passed it.
    assert ring.resume(ids[-1] + 1) == Resume(ids[-1], gap=True)
    assert ring.resume(10**19) == Resume(ids[-1], gap=True)


async def test_hub_fans_out_filters_and_drops_slow_clients() -> None:
    hub = LiveHub(ring_size=100, client_queue=10)
    everything = hub.connect(None)
    only_b = hub.connect("b")
    slow = hub.connect(None)
    hub.on_message(b"kpi.calculated.a", envelope("a", 1))
    hub.on_message(b"kpi.calculated.b", envelope("b", 2))
    hub.on_message(b"kpi.calculated.x", b"not json")
    assert hub.invalid == 1 and hub.received == 2
    got = [everything.queue.get_nowait(), everything.queue.get_nowait()]
    assert [orjson.loads(r.frame.split(b"data: ")[1]) for r in got if r] == [
        {"kpi_code": "a", "value": 1},
        {"kpi_code": "b", "value": 2},
    ]
    item = only_b.queue.get_nowait()
    assert item is not None and item.kpi_code == "b"
    assert only_b.queue.empty()
    for i in range(20):  # `everything` keeps reading, `slow` never does
        hub.on_message(b"kpi.calculated.a", envelope("a", i))
        everything.queue.get_nowait()
    assert slow.dropped
    assert slow.queue.get_nowait() is None  # woken with CLOSED
    assert hub.clients == 2
    hub.close()
    assert hub.clients == 0
    assert await asyncio.wait_for(everything.queue.get(), 1) is None


@pytest.mark.parametrize("payload", [b'{"payload": []}', b"[]", b'{"no": "payload"}'])
def test_hub_ignores_malformed_envelopes(payload: bytes) -> None:
    hub = LiveHub(ring_size=10)
    hub.on_message(b"kpi.calculated.a", payload)
    assert hub.invalid == 1 and len(hub.ring) == 0


def test_stream_slots_cap_each_key_and_the_total() -> None:
    slots = StreamSlots(max_total=3, max_per_key=2)
    assert slots.acquire("a") is None
    assert slots.acquire("a") is None
    assert slots.acquire("a") == "key"  # this key has its share
    assert slots.acquire("b") is None
    assert slots.acquire("c") == "total"  # the gateway is full
    assert slots.in_use == 3
    slots.release("a")
    assert slots.acquire("c") is None  # a freed slot is reusable, by anyone
    slots.release("a")
    slots.release("b")
    slots.release("c")
    assert slots.in_use == 0
    slots.release("a")  # releasing what is not held changes nothing
    assert slots.in_use == 0
    assert slots.acquire("a") is None and slots.acquire("a") is None


def test_no_gap_for_a_client_that_saw_the_last_evicted_result() -> None:
    """Ids follow the clock, so consecutive ones differ by more than 1. The ring took any id
    below `oldest - 1` for one followed by evicted results: a client whose last id was the
    newest evicted result, which lost nothing, was sent a `gap`."""
    ticks = iter(1000.0 + i / 1000 for i in range(10))  # a result each millisecond
    ring = ResultRing(3, clock=ticks.__next__)
    ids = [ring.append("a", b"{}").id for _ in range(5)]  # ids[0], ids[1] evicted
    assert ring.resume(ids[1]) == Resume(ids[1], gap=False)
    assert ring.resume(ids[0]) == Resume(ids[0], gap=True)  # ids[1] lost
    assert ring.resume(ids[0] - 1) == Resume(ids[0] - 1, gap=True)
    assert ring.resume(ids[2]) == Resume(ids[2], gap=False)
    fresh = ResultRing(3, clock=iter(1000.0 + i / 1000 for i in range(10)).__next__)
    first = fresh.append("a", b"{}").id
    assert fresh.resume(first - 1000) == Resume(first - 1000, gap=True)  # a previous process's
