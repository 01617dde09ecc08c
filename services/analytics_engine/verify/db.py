"""PostgreSQL side of verify (asyncpg): recompute, stored results, data bounds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any

import asyncpg
import orjson

from analytics_engine.kpi.definitions import KPIDefinition
from analytics_engine.kpi.windows import from_micros, to_micros
from analytics_engine.verify.compare import ResultRow, canonical_dims
from analytics_engine.verify.sql import recompute_query


@dataclass(frozen=True, slots=True)
class Bounds:
    """What the data spans: used for default ranges and the open-window cut-off."""

    newest_published: datetime | None
    events: dict[str, tuple[datetime, datetime]]  # entity_type -> (min, max occurred_at)
    results: dict[str, tuple[datetime, datetime]]  # kpi_code -> (min start, max end)
    deleted_until: dict[str, datetime] = field(default_factory=dict)
    """entity_type -> end of the last UTC day whose events were archived and deleted."""


async def bounds(conn: asyncpg.Connection) -> Bounds:
    newest = await conn.fetchval("SELECT max(published_at) FROM entity_events")
    events = {
        r["entity_type"]: (r["lo"], r["hi"])
        for r in await conn.fetch(
            "SELECT entity_type, min(occurred_at) AS lo, max(occurred_at) AS hi "
            "FROM entity_events GROUP BY entity_type"
        )
    }
    results = {
        r["kpi_code"]: (r["lo"], r["hi"])
        for r in await conn.fetch(
            "SELECT kpi_code, min(window_start) AS lo, max(window_end) AS hi "
            "FROM kpi_results GROUP BY kpi_code"
        )
    }
    deleted: dict[str, datetime] = {}
    if await conn.fetchval("SELECT to_regclass('archival_batches') IS NOT NULL"):
        deleted = {
            r["entity_type"]: datetime.combine(r["day"], time(), UTC) + timedelta(days=1)
            for r in await conn.fetch(
                "SELECT entity_type, max(day) AS day FROM archival_batches "
                "WHERE status = 'deleted' GROUP BY entity_type"
            )
        }
    return Bounds(newest, events, results, deleted)


async def recompute(
    conn: asyncpg.Connection,
    definition: KPIDefinition,
    *,
    start: datetime,
    end: datetime,
    types: dict[str, str] | None = None,
) -> list[ResultRow]:
    query = recompute_query(definition, start=start, end=end, types=types)
    rows = await conn.fetch(query.sql, *query.params)
    out: list[ResultRow] = []
    for r in rows:
        values = orjson.loads(r["dims"])
        ws = int(r["ws_us"])
        out.append(
            ResultRow(
                kpi_code=definition.code,
                window_start=from_micros(ws),
                window_end=from_micros(ws + query.size_us),
                dims=canonical_dims(dict(zip(query.group_by, values, strict=True))),
                value=float(r["value"]),
                sample_count=int(r["sample_count"]),
            )
        )
    return out


async def stored_results(
    conn: asyncpg.Connection,
    codes: Sequence[str],
    *,
    start: datetime,
    end: datetime,
    archived_before: datetime | None = None,
) -> list[ResultRow]:
    """Stored results of windows inside `[start, end]`; with `archived_before`, only those
    forwarded to the archive before that time (when the schema records it)."""
    where = "kpi_code = ANY($1::text[]) AND window_start >= $2 AND window_end <= $3"
    params: list[Any] = [list(codes), start, end]
    if archived_before is not None and await _has_columns(
        conn, "kpi_results", ("forwarded", "stored_at")
    ):
        where += " AND forwarded AND stored_at < $4"
        params.append(archived_before)
    rows = await conn.fetch(
        f"SELECT kpi_code, window_start, window_end, dimensions::text AS dims, value, "
        f"sample_count, definition_version FROM kpi_results WHERE {where}",
        *params,
    )
    return [
        ResultRow(
            kpi_code=r["kpi_code"],
            window_start=r["window_start"],
            window_end=r["window_end"],
            dims=canonical_dims(orjson.loads(r["dims"]) if r["dims"] else {}),
            value=float(r["value"]),
            sample_count=int(r["sample_count"]),
            definition_version=r["definition_version"],
        )
        for r in rows
    ]


async def _has_columns(conn: asyncpg.Connection, table: str, columns: Sequence[str]) -> bool:
    found = await conn.fetchval(
        "SELECT count(*) FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = $1 AND column_name = ANY($2)",
        table,
        list(columns),
    )
    return int(found or 0) == len(columns)


def default_range(definition: KPIDefinition, data: Bounds) -> tuple[datetime, datetime] | None:
    """Every window holding a stored event of the KPI's entity type (or a stored result), but
    none reaching into a day whose events were archived and deleted from PostgreSQL (those
    windows cannot be recomputed from the database alone)."""
    events = data.events.get(definition.entity_type)
    results = data.results.get(definition.code)
    if (events is None and results is None) or definition.window is None:
        return None
    window = definition.window
    size = to_micros(window.size)
    slide = to_micros(window.slide) if window.slide is not None else size
    if events is not None:
        first = to_micros(events[0])
        start = from_micros(first - first % slide - size + slide)
        end = events[1] + window.size
        if results is not None:
            start = min(start, results[0])
            end = max(end, results[1])
    else:
        assert results is not None
        start, end = results
    floor = data.deleted_until.get(definition.entity_type)
    if floor is not None and floor > start:
        start = floor
    return start, end
