"""Token buckets (pure)."""

from __future__ import annotations

from analytics_engine.gateway.ratelimit import RateLimiter, retry_after_header


def test_burst_then_refill_at_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.acquire("k", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("k", now=0.0)
    assert wait == 0.5
    assert limiter.acquire("k", now=0.5) == 0.0  # one token after 1/rate seconds
    assert limiter.acquire("k", now=0.5) > 0
    assert limiter.acquire("other", now=0.5) == 0.0  # separate bucket per key
    assert limiter.acquire("k", now=100.0) == 0.0  # refills up to the burst only
    assert [limiter.acquire("k", now=100.0) for _ in range(3)][-1] > 0


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert retry_after_header(0.01) == "1"
    assert retry_after_header(1.2) == "2"


def test_bucket_count_is_bounded() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_buckets=100)
    for i in range(1000):
        limiter.acquire(f"client-{i}", now=float(i) * 0.001)
    assert len(limiter) <= 100
