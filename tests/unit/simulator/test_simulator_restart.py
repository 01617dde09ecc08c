"""A stop and start of the simulator: what it publishes after the start is stamped now."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from analytics_engine.core.bus import EventPublisher
from analytics_engine.simulator import controller as controller_module
from analytics_engine.simulator.config import GeneratorConfig
from analytics_engine.simulator.controller import SimulatorController
from analytics_engine.simulator.generator import EventGenerator

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


class FlakyRedis:
    """Refuses the first publish (as during an outage), records the events of the others."""

    def __init__(self) -> None:
        self.calls = 0
        self.published: list[dict[str, Any]] = []
        self.controller: SimulatorController | None = None

    async def fcall(self, _name: str, _nkeys: int, *args: Any) -> list[Any]:
        self.calls += 1
        if self.calls == 1:
            assert self.controller is not None
            self.controller.stop()  # stopped before the retry
            raise RedisConnectionError("redis is down")
        self.published.extend(
            orjson.loads(a) for a in args if isinstance(a, bytes) and a[:1] == b"{"
        )
        return []


async def test_a_batch_held_across_a_stop_is_published_at_the_restart_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch whose publish failed (Redis down) is kept to be published first on the next
    try, so as to leave no gap in the sequence. Stopped meanwhile, the simulator published it
    at the next start, however much later, with the `occurred_at` of when it was generated:
    events late for every window they belong to (dropped by the calculation engine), the first
    thing a restarted simulation sent. Their times move to the restart."""
    now = [T0]
    monkeypatch.setattr(controller_module, "utcnow", lambda: now[0])
    config = GeneratorConfig(seed=3, late_ratio=0.0, out_of_order_ratio=0.0)
    redis = FlakyRedis()
    publisher = EventPublisher(redis, source="data_simulator", stream_maxlen=1000)  # type: ignore[arg-type]
    controller = SimulatorController(EventGenerator(config), publisher, rate=1000.0)
    redis.controller = controller
    controller.start()
    task = asyncio.create_task(controller.run())
    try:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if redis.calls and not controller.running:
                break
        await asyncio.sleep(0.2)  # past the retry's backoff: held while stopped
        assert redis.calls == 1 and not redis.published
        now[0] = T0 + timedelta(hours=1)
        controller.start()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if redis.published:
                break
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert redis.published
    first = redis.published[: controller.events_emitted]
    occurred = [datetime.fromisoformat(e["payload"]["occurred_at"]) for e in first]
    assert min(occurred) >= now[0], "events published after the restart occurred before it"
    stamps = {datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")) for e in first}
    assert min(stamps) >= now[0]
