"""Validation of the KPI results the database service stores, and the folding of entity
events into entity state (pure: no I/O). Entity events are validated by `core.storable`, whose
rules the calculation engine shares."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson

from analytics_engine.core.envelopes import Event
from analytics_engine.core.payloads import scalar_dimensions
from analytics_engine.core.storable import (
    EntityEventRow,
    InvalidPayload,
    int_field,
    json_object_field,
    parse_timestamp,
)

KPI_CODE: Final = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
INT32_MAX: Final = 2**31 - 1


@dataclass(frozen=True, slots=True)
class KpiResultRow:
    kpi_code: str
    window_start: datetime
    window_end: datetime
    dimensions: dict[str, Any]
    dims_key: str
    value: float
    sample_count: int
    definition_version: int
    computed_at: datetime
    version_since: datetime | None = None
    """Where the result's definition version begins, when its publisher says (a backfill)."""

    @property
    def begins(self) -> datetime:
        """Where the result's definition version begins at the latest (`kpi_result_versions`)."""
        if self.version_since is None:
            return self.window_start
        return min(self.window_start, self.version_since)

    @property
    def key(self) -> tuple[str, datetime, datetime, str]:
        return (self.kpi_code, self.window_start, self.window_end, self.dims_key)


def canonical_dimensions(dimensions: dict[str, Any]) -> str:
    """`dims_key`: the dimensions as compact JSON with sorted keys (one text per group)."""
    return orjson.dumps(dimensions, option=orjson.OPT_SORT_KEYS).decode()


def parse_kpi_result(event: Event) -> KpiResultRow:
    """Validate a `kpi.calculated` payload into a `kpi_results` row."""
    payload = event.payload
    code = payload.get("kpi_code")
    if not isinstance(code, str) or not KPI_CODE.match(code):
        raise InvalidPayload("kpi_code: must match ^[a-z][a-z0-9_]{0,62}$")
    value = payload.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidPayload("value: a finite number is required")
    start = parse_timestamp(payload.get("window_start"), "window_start")
    end = parse_timestamp(payload.get("window_end"), "window_end")
    if end <= start:
        raise InvalidPayload("window_end: must be after window_start")
    # absent means none, as the schema's default; null is no object, as the schema says
    dimensions, _ = json_object_field({"dimensions": payload.get("dimensions", {})}, "dimensions")
    if not scalar_dimensions(dimensions):  # the archive could never take it
        raise InvalidPayload("dimensions: values must be strings, numbers, booleans or null")
    return KpiResultRow(
        kpi_code=code,
        window_start=start,
        window_end=end,
        dimensions=dimensions,
        dims_key=canonical_dimensions(dimensions),
        value=float(value),
        sample_count=int_field(payload, "sample_count"),
        definition_version=int_field(payload, "definition_version", maximum=INT32_MAX),
        computed_at=parse_timestamp(payload.get("computed_at"), "computed_at"),
        version_since=(
            None
            if payload.get("version_since") is None
            else parse_timestamp(payload["version_since"], "version_since")
        ),
    )


# -- entity state folding -------------------------------------------------------------------
def fold_entity_events(rows: Sequence[EntityEventRow]) -> dict[int, tuple[int, datetime]]:
    """Which events of a batch set their entity's state: row index -> (step, first seen), the
    upsert step it belongs to (1, then 2) and the earliest `occurred_at` of its entity in the
    batch (the entity's `created_at` if it is new).

    Entity state is "the newest event wins": created/updated events carry the full attribute
    snapshot, a deactivation keeps the attributes it finds. Applying (1) the newest
    attribute-carrying event, then (2) the newest deactivation if it is at least as new, each
    by a version-guarded upsert (the attributes guarded by their own version, which a
    deactivation leaves), gives the same state as applying every event one by one in version
    order, whatever is already stored. Between events of one entity and kind with the
    same version, the earlier in the batch wins. Every entity of the batch has a step-1 event.

    Runs for every entity event (the writer stages the steps beside the events), so it works on
    row indexes and touches each row once.
    """
    # per entity: [index of the newest attribute-carrying event, of the newest deactivation
    # (-1: none yet), earliest occurred_at]
    state: dict[tuple[str, str], list[Any]] = {}
    get = state.get
    for index, row in enumerate(rows):
        key = (row.entity_type, row.entity_id)
        slot = get(key)
        kind = 1 if row.event_kind == "deactivated" else 0
        if slot is None:
            state[key] = [-1, index, row.occurred_at] if kind else [index, -1, row.occurred_at]
            continue
        slot[2] = min(slot[2], row.occurred_at)
        held = slot[kind]
        if held < 0 or row.version > rows[held].version:
            slot[kind] = index
    steps: dict[int, tuple[int, datetime]] = {}
    for newest, deactivation, first_seen in state.values():
        if newest < 0:
            steps[deactivation] = (1, first_seen)
            continue
        steps[newest] = (1, first_seen)
        if deactivation >= 0 and rows[deactivation].version >= rows[newest].version:
            steps[deactivation] = (2, first_seen)
    return steps
