"""Query KPIs: a definition with `query{sql, params, schedule}` runs on its schedule through
`database.query` / `execute_query`; each run publishes one result.

Slots are epoch-aligned `[k*schedule, (k+1)*schedule)`; the run for a slot starts when it ends,
and its result has `window_start/end` = the slot, `value` = the first column of the first row
(no row or a NULL/non-numeric value: nothing is published for that slot), `sample_count` = the
number of rows. A slot missed while the engine was down is not re-run (the query reads the
database as it is now, so a late run would not describe that slot anyway).

With `query.bind_window` the run binds its slot after `params`: `$len(params)+1` = window_start,
`$len(params)+2` = window_end, as ISO-8601 UTC text (`slot_params`), which the database service
coerces to the `timestamptz` PostgreSQL infers for `occurred_at >= $n` (elsewhere, cast:
`$n::timestamptz`). So (no params) `... WHERE occurred_at >= $1 AND occurred_at < $2` is exactly the
slot the result claims; events not yet stored when the slot ends are not in it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Final

from analytics_engine.core import channels
from analytics_engine.core.envelopes import utcnow
from analytics_engine.core.errors import RequestError
from analytics_engine.core.request_reply import RequestReplyClient
from analytics_engine.kpi import KPIResult, VersionedKPIDefinition
from analytics_engine.kpi.engine import iso_utc
from analytics_engine.kpi.windows import from_micros, to_micros

log = logging.getLogger(__name__)

POLL_S: Final = 0.25


def first_value(reply: Mapping[str, Any]) -> float | None:
    """The first column of the first row of an `execute_query` reply (rows as lists or
    objects)."""
    rows = reply.get("rows")
    if not isinstance(rows, list) or not rows:
        return None
    row = rows[0]
    if isinstance(row, Mapping):
        columns = reply.get("columns")
        if isinstance(columns, list) and columns:
            first = columns[0]
            name = first.get("name") if isinstance(first, Mapping) else first
            value = row.get(name) if isinstance(name, str) else None
        else:
            value = next(iter(row.values()), None)
    elif isinstance(row, list | tuple) and row:
        value = row[0]
    else:
        return None
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def slot_params(definition: VersionedKPIDefinition, start: int, end: int) -> list[Any]:
    """The params of the run for slot `[start, end)` (epoch microseconds): `query.params`, then
    with `bind_window` the slot's bounds as ISO-8601 UTC timestamps."""
    assert definition.query is not None
    params: list[Any] = list(definition.query.params)
    if definition.query.bind_window:
        params += [iso_utc(from_micros(start)), iso_utc(from_micros(end))]
    return params


def slot_of(now: datetime, schedule_us: int) -> tuple[int, int]:
    """The last completed slot `[start, end)` at `now`, in epoch microseconds."""
    end = to_micros(now) - to_micros(now) % schedule_us
    return end - schedule_us, end


class QueryRunner:
    def __init__(
        self,
        requests: Callable[[], RequestReplyClient],
        *,
        on_results: Callable[[list[KPIResult]], Awaitable[None]],
        timeout_s: float = 30.0,
    ) -> None:
        self._requests = requests
        self._on_results = on_results
        self._timeout = timeout_s
        self._definitions: dict[str, VersionedKPIDefinition] = {}
        self._last_end: dict[str, int] = {}
        self._running: set[asyncio.Task[None]] = set()
        self.runs = 0

    def set_definitions(self, definitions: Iterable[VersionedKPIDefinition]) -> None:
        active = {d.code: d for d in definitions if d.enabled and d.query is not None}
        for code in list(self._last_end):
            if code not in active or active[code] != self._definitions.get(code):
                self._last_end.pop(code)
        self._definitions = active

    @property
    def definitions(self) -> dict[str, VersionedKPIDefinition]:
        return dict(self._definitions)

    async def run(self) -> None:
        while True:
            self.tick(utcnow())
            await asyncio.sleep(POLL_S)

    def tick(self, now: datetime) -> None:
        for code, definition in self._definitions.items():
            assert definition.query is not None
            schedule = to_micros(definition.query.schedule)
            start, end = slot_of(now, schedule)
            last = self._last_end.get(code)
            self._last_end[code] = end
            if last is None or end <= last:
                continue  # first sight: wait for the next boundary
            task = asyncio.create_task(self.run_slot(definition, start, end))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def run_slot(self, definition: VersionedKPIDefinition, start: int, end: int) -> None:
        assert definition.query is not None
        try:
            reply = await self._requests().request(
                channels.DATABASE_QUERY,
                "execute_query",
                {"sql": definition.query.sql, "params": slot_params(definition, start, end)},
                timeout=self._timeout,
            )
        except RequestError as exc:
            log.warning(
                "query KPI run failed", extra={"kpi": definition.code, "error": str(exc)[:300]}
            )
            return
        self.runs += 1
        value = first_value(reply)
        if value is None:
            log.info("query KPI returned no value", extra={"kpi": definition.code})
            return
        rows = reply.get("rows")
        result = KPIResult(
            kpi_code=definition.code,
            value=value,
            window_start=from_micros(start),
            window_end=from_micros(end),
            dimensions={},
            sample_count=len(rows) if isinstance(rows, list) else 1,
            definition_version=definition.version,
            computed_at=utcnow(),
        )
        await self._on_results([result])
