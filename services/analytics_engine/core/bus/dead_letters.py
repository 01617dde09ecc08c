"""The dead-letter streams: `ae:dlq:{channel}`, each message that cannot be handled with its
reason."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from analytics_engine.core.channels import dead_letter_key
from analytics_engine.core.envelopes import utcnow

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

    from analytics_engine.core.metrics import CoreMetrics

log = logging.getLogger(__name__)

DEAD_LETTER_MAXLEN = 100_000


class DeadLetters:
    """Writes messages that cannot be handled to `ae:dlq:{channel}` with the reason."""

    def __init__(self, redis: Redis, *, service: str, metrics: CoreMetrics | None = None) -> None:
        self._redis = redis
        self._service = service
        self._metrics = metrics

    def add_to_pipeline(
        self,
        pipe: Pipeline,
        *,
        channel: str,
        reason: str,
        original: bytes,
        kind: str,
        stream_id: bytes | None = None,
    ) -> None:
        fields: dict[Any, Any] = {
            "channel": channel,
            "reason": reason[:2000],
            "kind": kind,
            "service": self._service,
            "failed_at": utcnow().isoformat(),
            "original": original[:1_000_000],
        }
        if stream_id is not None:
            fields["stream_id"] = stream_id
        pipe.xadd(dead_letter_key(channel), fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
        if self._metrics is not None:
            self._metrics.dead_letters.labels(channel, kind).inc()

    async def add(self, *, channel: str, reason: str, original: bytes, kind: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        self.add_to_pipeline(pipe, channel=channel, reason=reason, original=original, kind=kind)
        await pipe.execute()
        log.warning("dead-lettered a message", extra={"channel": channel, "reason": reason[:200]})
