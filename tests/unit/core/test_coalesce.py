"""Group commit: a lone item goes out at once; items arriving meanwhile share the next call."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from analytics_engine.core.coalesce import Coalescer


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def flush(self, items: Sequence[int]) -> list[int]:
        self.calls.append(list(items))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [i * 10 for i in items]


async def test_a_lone_item_is_sent_at_once() -> None:
    rec = Recorder()
    coalescer: Coalescer[int, int] = Coalescer(rec.flush)
    assert await coalescer.submit(1) == 10
    assert await coalescer.submit(2) == 20
    assert rec.calls == [[1], [2]]


async def test_items_submitted_during_a_call_share_the_next_one() -> None:
    rec = Recorder()
    rec.gate.clear()
    coalescer: Coalescer[int, int] = Coalescer(rec.flush)
    first = asyncio.create_task(coalescer.submit(0))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(coalescer.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0)
    rec.gate.set()
    assert await first == 0
    assert [await t for t in rest] == [10, 20, 30, 40, 50]
    assert rec.calls == [[0], [1, 2, 3, 4, 5]]


async def test_batches_are_capped() -> None:
    rec = Recorder()
    rec.gate.clear()
    coalescer: Coalescer[int, int] = Coalescer(rec.flush, max_batch=2)
    tasks = [asyncio.create_task(coalescer.submit(i)) for i in range(5)]
    await asyncio.sleep(0)
    rec.gate.set()
    assert [await t for t in tasks] == [0, 10, 20, 30, 40]
    assert rec.calls == [[0], [1, 2], [3, 4]]


async def test_a_failed_call_fails_every_item_of_its_batch_only() -> None:
    rec = Recorder()
    rec.gate.clear()
    rec.fail = ConnectionError("redis down")
    coalescer: Coalescer[int, int] = Coalescer(rec.flush)
    tasks = [asyncio.create_task(coalescer.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    rec.gate.set()
    for task in tasks:
        with pytest.raises(ConnectionError):
            await task
    rec.fail = None
    assert await coalescer.submit(7) == 70


async def test_a_cancelled_leader_does_not_strand_the_items_queued_behind_it() -> None:
    rec = Recorder()
    rec.gate.clear()
    coalescer: Coalescer[int, int] = Coalescer(rec.flush)
    leader = asyncio.create_task(coalescer.submit(0))
    await asyncio.sleep(0)
    follower = asyncio.create_task(coalescer.submit(1))
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    rec.gate.set()
    assert await asyncio.wait_for(follower, 1) == 10
    assert rec.calls == [[0], [1]]
