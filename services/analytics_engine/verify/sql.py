"""The SQL that recomputes a streaming KPI from `entity_events` (pure string building).

It implements docs/architecture.md "KPI semantics" literally:

* only `created`/`updated` events of the KPI's entity type, passing the CEL filter (translated by
  `analytics_engine.kpi.filters.filter_to_sql`, the same IR the engine evaluates);
* event-time windows on `occurred_at`, aligned to the epoch, in integer microseconds: window
  starts `k * slide` for every k with `k*slide <= t < k*slide + size` (tumbling: slide = size);
* an event counts for window W iff `published_at < W.end + allowed_lateness`;
* `group_by` attributes as jsonb (missing and JSON null both NULL; events with an array or an
  object there are left out, as the engine leaves them), aggregates from
  `analytics_engine.kpi.sql.aggregate_sql` (exact `numeric` for sum/avg), `sample_count` is the
  number of matching events; groups whose value is NULL (avg/min/max of no number) are dropped.

Only windows lying entirely inside `[start, end]` are produced; their events all have
`occurred_at` in `[start, end)`, which bounds the scan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from analytics_engine.kpi.definitions import KPIDefinition
from analytics_engine.kpi.sql import (
    aggregate_sql,
    dimension_sql,
    dimensions_scalar_sql,
    filter_to_sql,
)
from analytics_engine.kpi.windows import to_micros

AGGREGATED_KINDS: Final = ("created", "updated")


@dataclass(frozen=True, slots=True)
class RecomputeQuery:
    sql: str
    params: list[Any]
    size_us: int
    group_by: tuple[str, ...]


def recompute_query(
    definition: KPIDefinition,
    *,
    start: datetime,
    end: datetime,
    types: Mapping[str, str] | None = None,
) -> RecomputeQuery:
    """Rows `(ws_us bigint, dims jsonb-array text, value, sample_count)` of every window of
    `definition` inside `[start, end]`. Raises `FilterError` when the filter cannot be
    translated (declare attribute types via `types`)."""
    window = definition.window
    if window is None or definition.aggregation is None:
        raise ValueError(f"{definition.code} is not a streaming KPI")
    size = to_micros(window.size)
    slide = to_micros(window.slide) if window.slide is not None else size
    lateness = to_micros(window.allowed_lateness)
    params: list[Any] = [definition.entity_type, start, end, list(AGGREGATED_KINDS)]
    if definition.filter:
        filter_sql, filter_params = filter_to_sql(
            definition.filter, types=types, param_offset=len(params)
        )
        params.extend(filter_params)
    else:
        filter_sql = "TRUE"
    start_us, end_us = to_micros(start), to_micros(end)
    dims = [dimension_sql(name) for name in definition.group_by]
    dims_array = f"jsonb_build_array({', '.join(dims)})"
    group = ", ".join(["ws_us", *dims])
    value = aggregate_sql(definition.aggregation, definition.field)
    sql = f"""
WITH ev AS (
    SELECT (extract(epoch FROM occurred_at) * 1000000)::bigint AS t_us,
           (extract(epoch FROM published_at) * 1000000)::bigint AS p_us,
           attributes, event_kind, entity_id, version
    FROM entity_events
    WHERE entity_type = $1
      AND occurred_at >= $2 AND occurred_at < $3
      AND event_kind = ANY($4::text[])
      AND ({filter_sql})
      AND {dimensions_scalar_sql(definition.group_by)}
), win AS (
    SELECT ev.*, k * {slide}::bigint AS ws_us
    FROM ev CROSS JOIN LATERAL generate_series(
        floor((ev.t_us - {size})::numeric / {slide})::bigint + 1,
        floor(ev.t_us::numeric / {slide})::bigint
    ) AS k
)
SELECT ws_us, {dims_array}::text AS dims, ({value})::double precision AS value,
       count(*) AS sample_count
FROM win
WHERE p_us < ws_us + {size + lateness}
  AND ws_us >= {start_us} AND ws_us + {size} <= {end_us}
GROUP BY {group}
HAVING ({value}) IS NOT NULL
ORDER BY ws_us
"""
    return RecomputeQuery(sql, params, size, tuple(definition.group_by))


def lateness_of(definition: KPIDefinition) -> timedelta:
    return definition.window.allowed_lateness if definition.window is not None else timedelta(0)
