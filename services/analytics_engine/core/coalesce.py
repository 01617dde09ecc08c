"""Group commit: Redis commands issued by many concurrent tasks sent as one call per batch.

A responder with 64 requests in flight would otherwise pay redis-py's per-command cost (and a
round trip) 64 times for the claims and 64 times for the replies. `Coalescer.submit` sends an
item at once when nothing is in flight, so a lone caller waits no longer than with a direct
call; items submitted while a call is in flight go together in the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Flush = Callable[[Sequence[T]], Awaitable[Sequence[R]]]


class Coalescer(Generic[T, R]):
    """Calls `flush(items)` -> one result per item, for batches of submitted items."""

    def __init__(self, flush: Flush[T, R], *, max_batch: int = 512) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._busy = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if not self._busy:
            # the caller leads: its own item goes out now, without a hop through a task
            self._busy = True
            try:
                await self._flush_next()
            finally:
                self._hand_over()
        return await future

    async def _flush_next(self) -> None:
        batch = self._queue[: self._max_batch]
        del self._queue[: self._max_batch]
        try:
            results = await self._flush([item for item, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _hand_over(self) -> None:
        """Items queued meanwhile go out in a task of their own, so the leader can return."""
        if not self._queue:
            self._busy = False
            return
        task = asyncio.create_task(self._drain())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._flush_next()
        finally:
            self._busy = False
            if self._queue:  # cancelled with items left: nobody else will send them
                for _, future in self._queue:
                    future.cancel()
                self._queue.clear()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _, future in self._queue:
            if not future.done():
                future.cancel()
        self._queue.clear()
        self._busy = False
