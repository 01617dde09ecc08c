"""What verify asks the calculation engine: which windows of each KPI it is responsible for.

When a streaming KPI takes effect (a new definition, a changed one, a first start), the engine
publishes its windows that started before that moment (the *cut*) only once a backfill over
the stored events has run, after the last of them closes. Until then those windows are
pending, not missing; the engine's `GET /api/v1/kpis` says which (`backfill`). The backfill
starts at `since`: the engine never computes windows of that definition version starting
earlier, so they are not expected either; the KPI list keeps saying where the version begins
after the backfill is done (`coverage`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp


@dataclass(frozen=True, slots=True)
class PendingBackfill:
    """Windows starting in `[since, cut)` of `definition_version` arrive after `due`."""

    definition_version: int
    since: datetime
    cut: datetime
    due: datetime

    def covers(self, window_start: datetime) -> bool:
        return self.since <= window_start < self.cut


@dataclass(frozen=True, slots=True)
class VersionStart:
    """The engine publishes windows of `definition_version` starting at or after `since` (the
    start of the backfill it ran when that version took effect), none before."""

    definition_version: int
    since: datetime


@dataclass(frozen=True, slots=True)
class EngineBackfills:
    """What the engine says of its backfills, by KPI code."""

    pending: dict[str, PendingBackfill]
    coverage: dict[str, VersionStart]


class EngineUnavailable(Exception):
    """The engine did not answer; the message says why."""


def parse_pending(items: Any) -> dict[str, PendingBackfill]:
    """`{kpi_code: PendingBackfill}` from the engine's KPI list (pure)."""
    _check_list(items)
    pending: dict[str, PendingBackfill] = {}
    for item in items:
        backfill = item.get("backfill") if isinstance(item, dict) else None
        if not isinstance(backfill, dict):
            continue
        try:
            pending[str(item["code"])] = PendingBackfill(
                definition_version=int(backfill["definition_version"]),
                since=datetime.fromisoformat(backfill["since"]),
                cut=datetime.fromisoformat(backfill["cut"]),
                due=datetime.fromisoformat(backfill["due"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineUnavailable(f"unexpected backfill entry: {exc!r}") from None
    return pending


def parse_coverage(items: Any) -> dict[str, VersionStart]:
    """`{kpi_code: VersionStart}` from the engine's KPI list (pure). KPIs without `coverage`
    (no backfill was ever scheduled for them, or an engine that does not report it) are
    absent: verify expects all their windows."""
    _check_list(items)
    coverage: dict[str, VersionStart] = {}
    for item in items:
        entry = item.get("coverage") if isinstance(item, dict) else None
        if not isinstance(entry, dict):
            continue
        try:
            coverage[str(item["code"])] = VersionStart(
                definition_version=int(entry["definition_version"]),
                since=datetime.fromisoformat(entry["since"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineUnavailable(f"unexpected coverage entry: {exc!r}") from None
    return coverage


def _check_list(items: Any) -> None:
    if not isinstance(items, list):
        raise EngineUnavailable("unexpected reply: no list of KPIs")


async def pending_backfills(base_url: str, *, timeout: float = 5.0) -> dict[str, PendingBackfill]:
    """The engine's pending backfills, by KPI code; `EngineUnavailable` if it cannot say."""
    return (await engine_backfills(base_url, timeout=timeout)).pending


async def engine_backfills(base_url: str, *, timeout: float = 5.0) -> EngineBackfills:
    """The engine's pending backfills and version starts; `EngineUnavailable` if it cannot
    say."""
    url = f"{base_url.rstrip('/')}/api/v1/kpis"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
            http.get(url) as response,
        ):
            if response.status != 200:
                raise EngineUnavailable(f"GET {url}: HTTP {response.status}")
            body = await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise EngineUnavailable(f"GET {url}: {exc or type(exc).__name__}") from None
    items = body.get("items") if isinstance(body, dict) else None
    return EngineBackfills(parse_pending(items), parse_coverage(items))
