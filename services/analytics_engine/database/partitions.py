"""Daily partitions of `entity_events` on plain PostgreSQL: created ahead and on demand.

On TimescaleDB the SQL helpers are no-ops (chunks are automatic), so callers need not care.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import asyncpg

log = logging.getLogger(__name__)

# Days further than this from today go to the default partition instead of getting their own
# (a bogus timestamp must not create partitions for the year 3000).
ON_DEMAND_HORIZON: Final = timedelta(days=400)


def days_to_ensure(days: Iterable[date], known: set[date], today: date) -> list[date]:
    """The days of a batch that still need a partition (pure)."""
    return sorted(d for d in set(days) if d not in known and abs(d - today) <= ON_DEMAND_HORIZON)


class PartitionManager:
    """Remembers which day partitions exist so the hot path asks PostgreSQL only for new days."""

    def __init__(self, *, enabled: bool, days_ahead: int = 3) -> None:
        self.enabled = enabled
        self.days_ahead = days_ahead
        self._known: set[date] = set()

    def forget(self) -> None:
        """After partitions were dropped (retention), re-check them on next use."""
        self._known.clear()

    async def ensure(self, conn: Any, days: Iterable[date]) -> None:
        """Create the partitions of `days` (outside any transaction, so the parent's lock is
        held only for the CREATE)."""
        if not self.enabled:
            return
        todo = days_to_ensure(days, self._known, datetime.now(UTC).date())
        for day in todo:
            try:
                if await conn.fetchval("SELECT ae_ensure_entity_events_partition($1)", day):
                    log.info("created entity_events partition", extra={"day": day.isoformat()})
            except asyncpg.exceptions.DuplicateTableError:
                # Another writer created it while this one waited for the creation lock: the
                # function's second look misses it (its catalog lookup does not see a table
                # created after the statement started), its CREATE fails. It exists: done.
                log.info("entity_events partition created by a peer", extra={"day": str(day)})
            self._known.add(day)

    async def ensure_ahead(self, conn: Any) -> None:
        today = datetime.now(UTC).date()
        await self.ensure(conn, [today + timedelta(days=i) for i in range(-1, self.days_ahead + 1)])

    async def drop_empty_before(self, conn: Any, cutoff: datetime) -> int:
        if not self.enabled:
            return 0
        dropped = int(
            await conn.fetchval("SELECT ae_drop_empty_entity_events_partitions($1)", cutoff)
        )
        if dropped:
            self.forget()
        return dropped
