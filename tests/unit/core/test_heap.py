"""GC tuning of every service (process-wide, so every test restores the collector)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from analytics_engine.core.heap import tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restore_gc")
def test_startup_objects_are_frozen_and_generation_0_collected_less_often() -> None:
    _, t1, t2 = gc.get_threshold()
    tune_gc(12_345)
    assert gc.get_threshold() == (12_345, t1, t2)
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("restore_gc")
def test_zero_leaves_the_collector_alone() -> None:
    before = (gc.get_threshold(), gc.get_freeze_count())
    tune_gc(0)
    assert (gc.get_threshold(), gc.get_freeze_count()) == before
