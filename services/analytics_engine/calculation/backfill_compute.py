"""A backfill's results from replayed events, computed as they arrive (pure, no I/O).

The engine's watermark is the highest `published_at` it has seen, so a backfill must feed its
`KPIEngine` in publication order to decide what is late as the live engine did. The database
replays in event-time order (`occurred_at`, its index's order). Sorting the whole replay held
every event in memory (~0.8 KB each: a backfill of a busy entity type over an hour was more than
the engine's pod may use). Instead, since an event is never published before it occurred, once
the replay has reached `occurred_at = T` every event still to come was published at or after
T: the events held that were published before T are fed, in publication order, and only the
events published later than events that occurred after them wait (a heap). That is the same
order as the full sort.

`skew` widens that margin for producers whose clocks run ahead (`occurred_at` a little after
`published_at`): events are fed once published before `T - skew`. An event skewed by more comes
after events published later than it (counted in `out_of_order`): the engine may then count it
late where the live engine did not.
"""

from __future__ import annotations

import heapq
import itertools
from datetime import datetime, timedelta
from typing import Final

from analytics_engine.calculation.events import EntityEvent
from analytics_engine.core.envelopes import utcnow
from analytics_engine.kpi import KPIEngine, KPIResult, VersionedKPIDefinition

_FAR_FUTURE: Final = timedelta(days=3650)


class BackfillComputation:
    """Feed replayed events with `add` in the database's order (`occurred_at`), then `finish`
    for the results of the windows starting in `[since, cut)`."""

    def __init__(
        self,
        definition: VersionedKPIDefinition,
        *,
        since: datetime,
        cut: datetime,
        until: datetime,
        skew: timedelta = timedelta(0),
    ) -> None:
        self._engine = KPIEngine(clock=utcnow, idle_close_grace=timedelta(0))
        self._engine.set_definitions([definition])
        self._since = since
        self._cut = cut
        self._until = until
        self._skew = skew
        self._held: list[tuple[datetime, datetime, str, int, EntityEvent]] = []
        self._order = itertools.count()  # ties (the same event twice) never compare events
        self._reached: datetime | None = None
        self._last_fed: datetime | None = None
        self._results: list[KPIResult] = []
        self.events = 0
        self.out_of_order = 0

    @property
    def held(self) -> int:
        """Events received and not fed yet (what the replay costs in memory)."""
        return len(self._held)

    def add(self, event: EntityEvent) -> None:
        self.events += 1
        heapq.heappush(
            self._held,
            (event.published_at, event.occurred_at, event.event_id, next(self._order), event),
        )
        if self._reached is None or event.occurred_at > self._reached:
            self._reached = event.occurred_at
            self._feed(self._reached - self._skew)

    def finish(self) -> list[KPIResult]:
        self._feed(None)
        self._engine.advance(self._until + _FAR_FUTURE)
        self._collect()
        return self._results

    def _feed(self, before: datetime | None) -> None:
        """Feed the held events published before `before` (all of them for None)."""
        held, engine = self._held, self._engine
        while held and (before is None or held[0][0] < before):
            published, *_, event = heapq.heappop(held)
            if self._last_fed is not None and published < self._last_fed:
                self.out_of_order += 1
            else:
                self._last_fed = published
            engine.process(event)
        self._collect()

    def _collect(self) -> None:
        """Keep the closed windows' results the backfill publishes (the engine's own buffer
        would otherwise grow with every window the replay crosses)."""
        since, cut = self._since, self._cut
        self._results.extend(
            r for r in self._engine.drain_results() if since <= r.window_start < cut
        )
