"""Which slots of a query KPI are due: pure arithmetic on epoch microseconds, no I/O.

A query KPI's slots are epoch-aligned `[k*schedule, (k+1)*schedule)`; the slot ending at `end`
is due once the clock passes `end + delay`. Given the end of the last slot already handled, the
due slots are those after it up to the newest due one, oldest first; past `cap` of them only
the newest `cap` are kept (the older ones are `skipped`), so an engine that was down for a week
neither floods the database nor takes hours to reach the present.

`SlotMark` is what the runner keeps per KPI in Redis (the end of the last slot it handled, for
the definition version it ran) and its text form there.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import orjson

from analytics_engine.kpi.engine import iso_utc
from analytics_engine.kpi.windows import from_micros, to_micros


def latest_due_end(now_us: int, schedule_us: int, delay_us: int = 0) -> int:
    """The end of the newest slot due at `now_us` (its end + `delay_us` has passed)."""
    ready = now_us - delay_us
    return ready - ready % schedule_us


@dataclass(frozen=True, slots=True)
class DueSlots:
    ends: range
    """The ends of the slots to run, oldest first (each slot is `[end - schedule, end)`)."""
    skipped: int
    """Missed slots before them left out by the cap."""


def due_slots(last_end: int, now_us: int, schedule_us: int, delay_us: int, cap: int) -> DueSlots:
    """The slots after the one ending at `last_end` that are due at `now_us`, at most the newest
    `cap` (>= 1) of them."""
    newest = latest_due_end(now_us, schedule_us, delay_us)
    first = (last_end // schedule_us + 1) * schedule_us  # the first slot ending after last_end
    missed = max(0, (newest - first) // schedule_us + 1)
    kept = min(missed, cap)
    return DueSlots(
        range(newest - (kept - 1) * schedule_us, newest + 1, schedule_us), missed - kept
    )


@dataclass(frozen=True, slots=True)
class SlotMark:
    """The end of the last slot run (its result handed over) under definition `version`."""

    version: int
    end: int

    def encode(self) -> bytes:
        return orjson.dumps({"version": self.version, "end": iso_utc(from_micros(self.end))})

    @classmethod
    def decode(cls, raw: bytes) -> SlotMark | None:
        """The mark stored as `raw`; None when it is not one (written by hand, or by another
        release): that KPI then starts afresh rather than the engine failing to start."""
        try:
            data = orjson.loads(raw)
            return cls(int(data["version"]), to_micros(datetime.fromisoformat(data["end"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
