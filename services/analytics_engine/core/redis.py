"""One place that builds Redis clients, with the retry behaviour every service shares."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def connect(url: str, *, max_connections: int = 64, retries: int = 3) -> Redis:
    """A client for `url`; no I/O happens until the first command.

    The pool blocks when all connections are busy. Commands retry briefly on connection errors,
    so a Redis restart costs a pause, not a crash; longer outages surface as exceptions the
    callers back off from.

    `retries=0` for stream consumers: XREADGROUP is not idempotent, and a read re-sent after a
    lost reply hands entries to the group that the consumer never sees. Without the retry the
    error reaches the consumer, which re-reads its own pending entries in order.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        decode_responses=False,
        max_connections=max_connections,
        timeout=20,  # a burst waits for a free connection instead of failing
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return Redis(connection_pool=pool)
