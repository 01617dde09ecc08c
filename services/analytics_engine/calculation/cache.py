"""The latest result per KPI and group, for `GET /api/v1/kpis/{code}/latest` (pure).

Only the newest definition version's groups: once a changed KPI publishes its first result, the
groups of the earlier definition (another `group_by`, another window) are no longer current,
as the database's `latest_kpi_values` has it."""

from __future__ import annotations

from typing import Any

import orjson

from analytics_engine.kpi import KPIResult


class LatestResults:
    def __init__(self) -> None:
        self._by_kpi: dict[str, dict[bytes, KPIResult]] = {}
        self._versions: dict[str, int] = {}
        """The definition version of each KPI's groups."""

    def add(self, result: KPIResult) -> None:
        code, version = result.kpi_code, result.definition_version
        held = self._versions.get(code)
        if held is not None and version < held:
            return
        if held is None or version > held:
            self._by_kpi[code] = {}
            self._versions[code] = version
        groups = self._by_kpi[code]
        key = orjson.dumps(result.dimensions, option=orjson.OPT_SORT_KEYS)
        current = groups.get(key)
        if current is None or (result.window_end, result.window_start) >= (
            current.window_end,
            current.window_start,
        ):
            groups[key] = result

    def latest(self, code: str) -> list[dict[str, Any]]:
        groups = self._by_kpi.get(code, {})
        return [r.to_dict() for _, r in sorted(groups.items())]

    def last_window_end(self, code: str) -> str | None:
        groups = self._by_kpi.get(code)
        if not groups:
            return None
        return max(r.window_end for r in groups.values()).isoformat()

    def forget(self, code: str) -> None:
        self._by_kpi.pop(code, None)
        self._versions.pop(code, None)
