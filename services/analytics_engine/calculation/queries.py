"""Query KPIs: a definition with `query{sql, params, schedule, bind_window, delay}` runs on its
schedule through `database.query` / `execute_query`; each run publishes one result.

Slots are epoch-aligned `[k*schedule, (k+1)*schedule)`; the run for a slot starts `query.delay`
after it ends (so events stored shortly after the end are in it), and its result has
`window_start/end` = the slot, `value` = the first column of the first row (no row or a
NULL/non-numeric value: nothing is published for that slot), `sample_count` = the number of rows.

With `query.bind_window` the run binds its slot after `params`: `$len(params)+1` = window_start,
`$len(params)+2` = window_end, as ISO-8601 UTC text (`slot_params`), which the database service
coerces to the `timestamptz` PostgreSQL infers for `occurred_at >= $n` (elsewhere, cast:
`$n::timestamptz`). So (no params) `... WHERE occurred_at >= $1 AND occurred_at < $2` is exactly the
slot the result claims; events not yet stored when the run starts are not in it.

Missed slots. A `bind_window` run describes its own slot whenever it runs, so none is lost:
the end of the last slot handled (its result handed to `on_results`) is kept per KPI in the Redis
hash `key` (code -> `SlotMark`: definition version and end). When the runner starts, or a
definition appears, with a mark of the same version, it runs every slot since, oldest first, at
most the newest `catchup_slots` (`query_slots.due_slots`; the cut is logged). A run the database
service does not answer (`RequestError`) leaves the mark before its slot: that slot is retried
`retry_s` later, then the ones after it. One worker per KPI runs its slots in order, so no slot
runs twice at once and the mark only moves forward. Without a mark of that version (new or
changed definition) the KPI starts afresh at the next boundary, as before.

A query without `bind_window` reads the database as it is at the run, so a late run would not
describe the slot it is stamped with: its missed slots (down, or a failed run) are not run
again, and only its newest due slot runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from analytics_engine.calculation.query_slots import SlotMark, due_slots, latest_due_end
from analytics_engine.core import channels
from analytics_engine.core.bus import REDIS_ERRORS
from analytics_engine.core.envelopes import utcnow
from analytics_engine.core.errors import RequestError
from analytics_engine.core.request_reply import RequestReplyClient
from analytics_engine.core.retry import until_reachable
from analytics_engine.kpi import KPIResult, VersionedKPIDefinition
from analytics_engine.kpi.engine import iso_utc
from analytics_engine.kpi.windows import from_micros, to_micros

if TYPE_CHECKING:
    from redis.asyncio import Redis

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


class QueryRunner:
    """Runs the query KPIs' due slots: per KPI one worker at a time, its slots oldest first."""

    def __init__(
        self,
        requests: Callable[[], RequestReplyClient],
        *,
        on_results: Callable[[list[KPIResult]], Awaitable[None]],
        redis: Redis,
        key: str,
        catchup_slots: int = 1440,
        timeout_s: float = 30.0,
        retry_s: float = 5.0,
    ) -> None:
        self._requests = requests
        self._on_results = on_results
        self._redis = redis
        self.key = key
        self._cap = catchup_slots
        self._timeout = timeout_s
        self._retry_us = round(retry_s * 1_000_000)
        self._definitions: dict[str, VersionedKPIDefinition] = {}
        self._last_end: dict[str, int] = {}  # the last slot handled, per running definition
        self._marks: dict[str, SlotMark] = {}  # as stored under `key`
        self._failed: set[str] = set()  # a slot failed: retried `retry_s` after the next tick
        self._retry_at: dict[str, int] = {}  # a failed slot is not retried before
        self._workers: dict[str, asyncio.Task[None]] = {}
        self.runs = 0

    def set_definitions(self, definitions: Iterable[VersionedKPIDefinition]) -> None:
        active = {d.code: d for d in definitions if d.enabled and d.query is not None}
        for code in list(self._last_end):
            if code not in active or active[code] != self._definitions.get(code):
                self._last_end.pop(code)
                self._failed.discard(code)
                self._retry_at.pop(code, None)
        self._definitions = active

    @property
    def definitions(self) -> dict[str, VersionedKPIDefinition]:
        return dict(self._definitions)

    async def load(self) -> None:
        """The stored marks (call before the first `tick`)."""
        marks: dict[str, SlotMark] = {}
        for code, raw in (await self._redis.hgetall(self.key)).items():
            assert isinstance(code, bytes) and isinstance(raw, bytes)  # clients never decode
            mark = SlotMark.decode(raw)
            if mark is not None:
                marks[code.decode()] = mark
        self._marks = marks

    async def run(self) -> None:
        await until_reachable(self.load, errors=REDIS_ERRORS, what="redis")
        while True:
            self.tick(utcnow())
            await asyncio.sleep(POLL_S)

    def tick(self, now: datetime) -> None:
        """Start a worker for each KPI with due slots and none running."""
        now_us = to_micros(now)
        for code, definition in self._definitions.items():
            assert definition.query is not None
            if code in self._workers:
                continue  # its next slots are started once it is done, in order
            bind_window = definition.query.bind_window
            schedule = to_micros(definition.query.schedule)
            delay = to_micros(definition.query.delay)
            last = self._last_end.get(code)
            if last is None:
                mark = self._marks.get(code)
                if bind_window and mark is not None and mark.version == definition.version:
                    last = self._last_end[code] = mark.end  # catch up from there
                else:  # first sight: wait for the next boundary
                    baseline = self._last_end[code] = latest_due_end(now_us, schedule, delay)
                    if bind_window:  # catch up from here after a restart
                        self._start(code, self._mark(code, SlotMark(definition.version, baseline)))
                    continue
            if code in self._failed:
                self._failed.discard(code)
                self._retry_at[code] = now_us + self._retry_us
            if self._retry_at.get(code, now_us) > now_us:
                continue
            due = due_slots(last, now_us, schedule, delay, self._cap if bind_window else 1)
            if not due.ends:
                continue
            self._last_end[code] = due.ends[0] - schedule  # the skipped ones are given up
            if bind_window and (due.skipped or len(due.ends) > 1):
                log.log(
                    logging.WARNING if due.skipped else logging.INFO,
                    "query KPI catching up missed slots",
                    extra={
                        "kpi": code,
                        "slots": len(due.ends),
                        "skipped": due.skipped,
                        "from": iso_utc(from_micros(due.ends[0] - schedule)),
                    },
                )
            self._start(code, self._run_slots(definition, due.ends))

    def _start(self, code: str, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._workers[code] = task
        task.add_done_callback(lambda done: self._done(code, done))

    def _done(self, code: str, task: asyncio.Task[None]) -> None:
        if self._workers.get(code) is task:
            del self._workers[code]
        if not task.cancelled() and task.exception() is not None:
            log.error("query KPI worker failed", exc_info=task.exception(), extra={"kpi": code})

    async def settle(self) -> None:
        """Wait until the workers started so far are done."""
        while self._workers:
            await asyncio.wait(list(self._workers.values()))

    async def _run_slots(self, definition: VersionedKPIDefinition, ends: range) -> None:
        """Run the slots ending at `ends` in order while `definition` is in force. With
        `bind_window` a failed slot stops the worker without advancing past it: it is retried
        first, `retry_s` after the tick that finds the worker done (so a database service that
        is down is not asked 4 times a second); without, it is given up, as the slots a late run
        cannot describe."""
        assert definition.query is not None
        code, schedule = definition.code, to_micros(definition.query.schedule)
        for end in ends:
            if self._definitions.get(code) != definition:
                return  # changed or removed meanwhile: a new version starts afresh
            ran = await self.run_slot(definition, end - schedule, end)
            if self._definitions.get(code) != definition:
                return
            if not ran and definition.query.bind_window:
                self._failed.add(code)
                return
            self._last_end[code] = end
            if definition.query.bind_window:
                await self._mark(code, SlotMark(definition.version, end))

    async def _mark(self, code: str, mark: SlotMark) -> None:
        """Store `mark` as the KPI's last slot handled. Unstored (Redis unreachable), a restart
        runs the slots after the previous mark again: their results are published twice,
        none is missed."""
        self._marks[code] = mark
        try:
            await self._redis.hset(self.key, code, mark.encode())
        except REDIS_ERRORS as exc:
            log.warning("query KPI slot not recorded", extra={"kpi": code, "error": str(exc)[:200]})

    async def run_slot(self, definition: VersionedKPIDefinition, start: int, end: int) -> bool:
        """Run the slot `[start, end)` and hand its result over; False when the database
        service did not answer (nothing was published)."""
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
            return False
        self.runs += 1
        value = first_value(reply)
        if value is None:
            log.info("query KPI returned no value", extra={"kpi": definition.code})
            return True
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
        return True
