"""The token bucket keeps the average rate exact and bounds bursts."""

from __future__ import annotations

import random

import pytest

from analytics_engine.simulator.rate import TokenBucket


def test_average_rate_is_exact_under_jittery_wakeups() -> None:
    rng = random.Random(1)
    bucket = TokenBucket(1234.5, now=0.0)
    now, taken = 0.0, 0
    while now < 100.0:
        now += rng.uniform(0.0001, 0.03)
        taken += bucket.take(10_000, now)
    assert taken == pytest.approx(1234.5 * now, abs=2)


def test_burst_after_a_stall_is_bounded_and_rate_changes_apply() -> None:
    bucket = TokenBucket(100.0, now=0.0, burst_s=1.0)
    assert bucket.take(10_000, 60.0) == 100  # one second's worth, not sixty
    bucket.set_rate(10.0, 60.0)
    assert bucket.take(10_000, 61.0) == 10
    assert bucket.wait_time(5, 61.0) == pytest.approx(0.5)
    bucket.reset(100.0)
    assert bucket.take(10, 100.0) == 0
    with pytest.raises(ValueError):
        bucket.set_rate(0, 100.0)
