"""What verify asks the calculation engine: the windows its pending backfills will publish.

When a streaming KPI takes effect (a new definition, a changed one, a first start), the engine
publishes its windows that started before that moment (the *cut*) only once a backfill over
the stored events has run, after the last of them closes. Until then those windows are
pending, not missing; the engine's `GET /api/v1/kpis` says which (`backfill`).
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


class EngineUnavailable(Exception):
    """The engine did not answer; the message says why."""


def parse_pending(items: Any) -> dict[str, PendingBackfill]:
    """`{kpi_code: PendingBackfill}` from the engine's KPI list (pure)."""
    if not isinstance(items, list):
        raise EngineUnavailable("unexpected reply: no list of KPIs")
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


async def pending_backfills(base_url: str, *, timeout: float = 5.0) -> dict[str, PendingBackfill]:
    """The engine's pending backfills, by KPI code; `EngineUnavailable` if it cannot say."""
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
    return parse_pending(body.get("items") if isinstance(body, dict) else None)
