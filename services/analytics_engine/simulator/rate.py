"""A token bucket on a caller-supplied monotonic clock (pure: the caller passes `now`).

Tokens accrue continuously at `rate` per second and fractional tokens carry over, so the
long-run average is exactly `rate` however the caller's wake-ups jitter. The bucket holds at
most `burst` seconds' worth: after a stall (Redis slow, process paused) the generator catches up
by at most that much instead of flooding the bus with the whole backlog.
"""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("_burst_s", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, now: float, *, burst_s: float = 1.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._rate = rate
        self._burst_s = burst_s
        self._tokens = 0.0
        self._last = now

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def capacity(self) -> float:
        return max(1.0, self._rate * self._burst_s)

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate from `now` on; tokens accrued so far keep their value."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._refill(now)
        self._rate = rate
        self._tokens = min(self._tokens, self.capacity)

    def reset(self, now: float) -> None:
        """Forget accrued tokens (on start after a stop: no burst for the paused time)."""
        self._tokens = 0.0
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self._rate)
            self._last = now

    def take(self, limit: int, now: float) -> int:
        """Take as many whole tokens as are available, at most `limit`."""
        self._refill(now)
        n = min(int(self._tokens), limit)
        self._tokens -= n
        return n

    def wait_time(self, n: int, now: float) -> float:
        """Seconds until `n` whole tokens are available (0 if they are)."""
        self._refill(now)
        missing = min(float(n), self.capacity) - self._tokens
        return max(0.0, missing / self._rate)
