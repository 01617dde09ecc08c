"""Batch publishing for the simulator's event rate: the same wire effect as
`EventPublisher.publish_events` (per event: XADD `{m: json}` to `ae:stream:{channel}` with the
stream's MAXLEN, then PUBLISH the same bytes, all atomically), done by one Lua script call per
batch and with envelopes encoded by orjson directly.

Why: measured on the 2-core target, `publish_events` tops out near 6k events/s for simulator
batches (pydantic `model_dump` per envelope ~25 us, and redis-py packs and parses two commands
per event); this path does >= 20k/s. The script is atomic like MULTI/EXEC, so a durable
consumer still never misses what a live subscriber saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import orjson

from analytics_engine.core.bus import FIELD
from analytics_engine.core.channels import channel_spec, stream_key

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from analytics_engine.core.metrics import CoreMetrics

_SCRIPT: Final = """
local maxlen = ARGV[1]
local field = ARGV[2]
for i = 3, #ARGV, 3 do
  local k = tonumber(ARGV[i])
  if k > 0 then
    redis.call('XADD', KEYS[k], 'MAXLEN', '~', maxlen, '*', field, ARGV[i + 2])
  end
  redis.call('PUBLISH', ARGV[i + 1], ARGV[i + 2])
end
return (#ARGV - 2) / 3
"""


def encode(
    event_id: str, channel: str, source: str, timestamp: datetime, payload: dict[str, Any]
) -> bytes:
    """An envelope as `encode_event` writes it (timestamps in UTC with `Z`)."""
    return orjson.dumps(
        {
            "event_id": event_id,
            "event_type": channel,
            "source": source,
            "timestamp": timestamp.isoformat().replace("+00:00", "Z"),
            "payload": payload,
        }
    )


class BatchPublisher:
    def __init__(
        self, redis: Redis, *, stream_maxlen: int, metrics: CoreMetrics | None = None
    ) -> None:
        self._script = redis.register_script(_SCRIPT)
        self._maxlen = stream_maxlen
        self._metrics = metrics

    async def publish(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Publish `(channel, encoded envelope)` pairs in one atomic round trip."""
        if not items:
            return
        keys: dict[str, int] = {}
        args: list[Any] = [self._maxlen, FIELD]
        counts: dict[str, int] = {}
        for channel, data in items:
            index = 0
            if channel_spec(channel).durable:
                index = keys.setdefault(stream_key(channel), len(keys) + 1)
            args.extend((index, channel, data))
            counts[channel] = counts.get(channel, 0) + 1
        await self._script(keys=list(keys), args=args)
        if self._metrics is not None:
            for channel, n in counts.items():
                self._metrics.published.labels(channel).inc(n)
