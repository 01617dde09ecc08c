"""Per-key token buckets (pure; the caller passes the monotonic time).

A bucket holds up to `burst` tokens and refills at `rate` per second; a request takes one.
When it is empty the caller answers 429 with `Retry-After` = time until the next token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by principal; idle, full buckets are dropped once there are more than
    `max_buckets` so anonymous callers (one bucket per address) cannot grow memory unboundedly."""

    def __init__(self, *, rate: float, burst: int, max_buckets: int = 10_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._max = max_buckets
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, key: str, *, now: float) -> float:
        """Take a token for `key`: 0.0 when allowed, else seconds until one is available."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        refill = self.burst / self.rate
        idle = [k for k, b in self._buckets.items() if now - b.updated >= refill]
        for key in idle:
            del self._buckets[key]
        if len(self._buckets) >= self._max:  # all busy: forget the oldest half
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k].updated)
            for key in oldest[: len(oldest) // 2]:
                del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after_header(wait_s: float) -> str:
    """`Retry-After` is whole seconds; never 0 (a client would retry at once and fail again)."""
    return str(max(1, math.ceil(wait_s)))
