"""Live pub/sub subscriptions that survive Redis restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from analytics_engine.core.bus.streams import REDIS_ERRORS

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger(__name__)


class LiveSubscription:
    """A pub/sub subscription (channels and/or patterns) that survives Redis restarts by
    re-subscribing with backoff. For live-only readers: reply channels, dashboards, heartbeats.

    `on_message(channel, data)` is called synchronously from the reader task; keep it cheap
    (hand work to a task or queue).
    """

    def __init__(
        self,
        redis: Redis,
        on_message: Callable[[bytes], None] | Callable[[bytes, bytes], None],
        *,
        channels: Sequence[str] = (),
        patterns: Sequence[str] = (),
        with_channel: bool = False,
    ) -> None:
        self._redis = redis
        self._channels = tuple(channels)
        self._patterns = tuple(patterns)
        self._on_message = on_message
        self._with_channel = with_channel
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        if self._task is None:
            name = ",".join(self._channels + self._patterns)
            self._task = asyncio.create_task(self._run(), name=f"sub:{name}")
        await self.subscribed.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            self.subscribed.clear()

    def _deliver(self, message: dict[str, Any]) -> None:
        if self._with_channel:
            self._on_message(message["channel"], message["data"])  # type: ignore[call-arg]
        else:
            self._on_message(message["data"])  # type: ignore[call-arg]

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                if self._channels:
                    await pubsub.subscribe(*self._channels)
                if self._patterns:
                    await pubsub.psubscribe(*self._patterns)
                self.subscribed.set()
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is not None and message["type"] in ("message", "pmessage"):
                        self._deliver(message)
            except REDIS_ERRORS as exc:
                self.subscribed.clear()
                log.warning("subscription lost, reconnecting", extra={"error": str(exc)[:200]})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
