"""Waiting at start for a dependency (Redis, PostgreSQL) that is not up yet.

A pod may start before what it needs: the service waits, logging each failed attempt, instead
of crashing into a restart loop. The runtime cancels the wait on SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


async def until_reachable(
    attempt: Callable[[], Awaitable[T]],
    *,
    errors: tuple[type[BaseException], ...],
    what: str,
    first_delay: float = 0.2,
    max_delay: float = 5.0,
) -> T:
    """`attempt()`'s result, retried with exponential backoff while it raises one of `errors`."""
    delay = first_delay
    while True:
        try:
            return await attempt()
        except errors as exc:
            log.warning(f"{what} not reachable, retrying", extra={"error": str(exc)[:200]})
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
