"""Event-time window assignment, aligned to the Unix epoch.

Tumbling windows are ``[k*size, (k+1)*size)``; sliding windows of ``size`` start every ``slide``,
so an event falls in exactly ``size/slide`` of them. The arithmetic runs on integer microseconds
(exact, and cheap on the engine's hot path); datetimes are only built at the edges.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

from analytics_engine.kpi.definitions import Window

__all__ = ["EPOCH", "from_micros", "to_micros", "window_starts", "windows_for"]

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_US: Final = timedelta(microseconds=1)


def to_micros(value: datetime | timedelta) -> int:
    """Exact integer microseconds since the epoch (or of a duration). Naive datetimes are UTC."""
    if isinstance(value, timedelta):
        return value // _US
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - EPOCH) // _US


def from_micros(micros: int) -> datetime:
    """A UTC-aware datetime from epoch microseconds."""
    return EPOCH + timedelta(microseconds=micros)


def window_starts(t: int, size: int, slide: int | None = None) -> range:
    """Start times (same unit as ``t``) of the windows containing ``t``, ascending."""
    if slide is None or slide == size:
        start = t - t % size
        return range(start, start + 1)
    first = ((t - size) // slide + 1) * slide
    return range(first, t - t % slide + 1, slide)


def windows_for(occurred_at: datetime, window: Window) -> list[tuple[datetime, datetime]]:
    """The ``[start, end)`` windows (UTC-aware) an event at ``occurred_at`` belongs to."""
    size = to_micros(window.size)
    slide = None if window.slide is None else to_micros(window.slide)
    t = to_micros(occurred_at)
    return [(from_micros(s), from_micros(s + size)) for s in window_starts(t, size, slide)]
