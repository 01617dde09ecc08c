"""Pure comparison of recomputed, stored and archived KPI results (no I/O).

Keys are `(kpi_code, window_start, window_end, dims)` with `dims` the canonical JSON of the
dimensions (`canonical_dims`): sorted keys and integral floats written as integers, so the
engine's `{"n": 1.0}`, PostgreSQL's jsonb `1.0` and `1` (jsonb-equal, grouped together by both
the engine and SQL) compare equal.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Literal

import orjson

REL_TOL: Final = 1e-9
ABS_TOL: Final = 1e-12
"""Values agree to 1e-9 relative; the absolute floor only absorbs float noise around 0."""

Problem = Literal[
    "wrong_value",
    "wrong_sample_count",
    "missing_window",
    "extra_window",
    "duplicate_result",
    "missing_in_lake",
    "duplicate_in_lake",
    "lake_value_mismatch",
    "duplicate_event_in_lake",
    "unverifiable",
]


def _normalize(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def canonical_dims(dimensions: Mapping[str, Any] | None) -> str:
    """The canonical JSON text of a dimensions object (the comparison key)."""
    return orjson.dumps(_normalize(dict(dimensions or {})), option=orjson.OPT_SORT_KEYS).decode()


def same_value(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)


@dataclass(frozen=True, slots=True)
class ResultRow:
    """One KPI result: recomputed (`definition_version` None), stored, or archived."""

    kpi_code: str
    window_start: datetime
    window_end: datetime
    dims: str
    value: float
    sample_count: int
    definition_version: int | None = None

    @property
    def key(self) -> tuple[str, datetime, datetime, str]:
        return (self.kpi_code, self.window_start, self.window_end, self.dims)


@dataclass(frozen=True, slots=True)
class Mismatch:
    problem: Problem
    kpi_code: str
    window_start: datetime | None = None
    window_end: datetime | None = None
    dims: str | None = None
    expected: float | int | None = None
    stored: float | int | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "kpi_code": self.kpi_code,
            "window_start": self.window_start.isoformat() if self.window_start else None,
            "window_end": self.window_end.isoformat() if self.window_end else None,
            "dimensions": orjson.loads(self.dims) if self.dims is not None else None,
            "expected": self.expected,
            "stored": self.stored,
            "detail": self.detail,
        }


@dataclass(slots=True)
class KpiSummary:
    kpi_code: str
    compared: int = 0
    matched: int = 0
    open_windows_skipped: int = 0
    other_version_skipped: int = 0
    before_version_skipped: int = 0
    pending_backfill: int = 0
    mismatches: int = 0


@dataclass(slots=True)
class Comparison:
    mismatches: list[Mismatch] = field(default_factory=list)
    summary: KpiSummary | None = None


def is_open(window_end: datetime, lateness: timedelta, watermark: datetime | None) -> bool:
    """A window is still open while its close time (end + allowed lateness) is after the newest
    `published_at` in the data: the engine may legitimately not have emitted it yet."""
    return watermark is None or window_end + lateness > watermark


def compare_kpi(
    kpi_code: str,
    expected: Sequence[ResultRow],
    stored: Sequence[ResultRow],
    *,
    lateness: timedelta,
    watermark: datetime | None,
    definition_version: int | None,
    pending: Callable[[datetime], bool] | None = None,
    version_since: datetime | None = None,
) -> Comparison:
    """Compare one KPI's recomputed windows with its stored results.

    Open windows are skipped on both sides. Stored results computed with another definition
    version than the current one are skipped (their definition may have differed), and so is the
    expected window they stand for, except from `version_since` on: there the current version's
    result replaces an older one of the same key, so a window holding only an older version's
    result is missing. `pending(window_start)`: the window awaits the engine's
    backfill, so its absence is counted as pending, not reported missing. `version_since`: the
    engine publishes the current version's windows from there on (where its backfill started
    when the version took effect), so an earlier window without a stored result was never
    expected of this version: skipped (`before_version_skipped`), not missing. Stored results
    are compared wherever they start."""
    summary = KpiSummary(kpi_code)
    out = Comparison(summary=summary)
    by_key: dict[tuple[str, datetime, datetime, str], list[ResultRow]] = defaultdict(list)
    for row in stored:
        if is_open(row.window_end, lateness, watermark):
            summary.open_windows_skipped += 1
            continue
        by_key[row.key].append(row)
    wanted: dict[tuple[str, datetime, datetime, str], ResultRow] = {}
    for row in expected:
        if is_open(row.window_end, lateness, watermark):
            continue
        wanted[row.key] = row

    for key, rows in by_key.items():
        if len(rows) > 1:
            out.mismatches.append(
                Mismatch(
                    "duplicate_result",
                    kpi_code,
                    key[1],
                    key[2],
                    key[3],
                    expected=1,
                    stored=len(rows),
                    detail=f"{len(rows)} stored rows for one window",
                )
            )
    superseded: dict[tuple[str, datetime, datetime, str], int] = {}
    for key, rows in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][3])):
        row = rows[0]
        if (
            definition_version is not None
            and row.definition_version is not None
            and row.definition_version != definition_version
        ):
            summary.other_version_skipped += 1
            if version_since is not None and key[1] >= version_since and key in wanted:
                # The current version computes this window (it starts at or after the
                # version's `since`) and its result would have replaced the older one (same
                # key): only the older version's result stored means the current one's is
                # missing (unless it awaits the backfill, decided below).
                superseded[key] = row.definition_version
                continue
            wanted.pop(key, None)
            continue
        want = wanted.pop(key, None)
        summary.compared += 1
        if want is None:
            out.mismatches.append(
                Mismatch(
                    "extra_window",
                    kpi_code,
                    key[1],
                    key[2],
                    key[3],
                    stored=row.value,
                    detail="stored, but no event of the window matches the definition",
                )
            )
            continue
        if not same_value(want.value, row.value):
            out.mismatches.append(
                Mismatch(
                    "wrong_value",
                    kpi_code,
                    key[1],
                    key[2],
                    key[3],
                    want.value,
                    row.value,
                )
            )
        elif want.sample_count != row.sample_count:
            out.mismatches.append(
                Mismatch(
                    "wrong_sample_count",
                    kpi_code,
                    key[1],
                    key[2],
                    key[3],
                    want.sample_count,
                    row.sample_count,
                )
            )
        else:
            summary.matched += 1
    for key, want in sorted(wanted.items(), key=lambda kv: (kv[0][1], kv[0][3])):
        if pending is not None and pending(key[1]):
            summary.pending_backfill += 1
            continue
        if version_since is not None and key[1] < version_since:
            summary.before_version_skipped += 1
            continue
        summary.compared += 1
        older = superseded.get(key)
        out.mismatches.append(
            Mismatch(
                "missing_window",
                kpi_code,
                key[1],
                key[2],
                key[3],
                expected=want.value,
                detail=f"{want.sample_count} events, no stored result"
                + (
                    ""
                    if older is None
                    else f" of definition version {definition_version} (only one of version "
                    f"{older})"
                ),
            )
        )
    summary.mismatches = len(out.mismatches)
    return out


def compare_lake(stored: Sequence[ResultRow], lake: Sequence[ResultRow]) -> list[Mismatch]:
    """Every stored result archived exactly once with its value; no row archived twice.

    A window recomputed under a new definition version is archived again (the lake keeps the
    history, the database the latest): rows count as copies only within one version.
    `stored` should hold only results old enough to have been archived already."""
    mismatches: list[Mismatch] = []
    lake_by_key: dict[tuple[str, datetime, datetime, str], list[ResultRow]] = defaultdict(list)
    for row in lake:
        lake_by_key[row.key].append(row)
    for row in stored:
        archived = lake_by_key.get(row.key, [])
        same = [
            r
            for r in archived
            if same_value(r.value, row.value)
            and (row.definition_version is None or r.definition_version == row.definition_version)
        ]
        k = row.key
        if len(same) == 1:
            continue
        if len(same) > 1:
            mismatches.append(
                Mismatch(
                    "duplicate_in_lake",
                    k[0],
                    k[1],
                    k[2],
                    k[3],
                    expected=1,
                    stored=len(same),
                    detail=f"archived {len(same)} times",
                )
            )
        elif versioned := [
            r
            for r in archived
            if row.definition_version is None or r.definition_version == row.definition_version
        ]:
            mismatches.append(
                Mismatch(
                    "lake_value_mismatch",
                    k[0],
                    k[1],
                    k[2],
                    k[3],
                    row.value,
                    versioned[-1].value,
                    detail="archived with another value",
                )
            )
        else:
            others = sorted({str(r.definition_version) for r in archived})
            mismatches.append(
                Mismatch(
                    "missing_in_lake",
                    k[0],
                    k[1],
                    k[2],
                    k[3],
                    expected=row.value,
                    detail="stored but not archived"
                    + (
                        f" (definition version {row.definition_version}; archived only under "
                        f"version {', '.join(others)})"
                        if others
                        else ""
                    ),
                )
            )
    reported = {(m.kpi_code, m.window_start, m.window_end, m.dims) for m in mismatches}
    identical = Counter(
        (r.key, r.value if not math.isnan(r.value) else "nan", r.sample_count, r.definition_version)
        for r in lake
    )
    for (key, value, _, _), count in identical.items():
        if count > 1 and key not in reported:
            reported.add(key)
            mismatches.append(
                Mismatch(
                    "duplicate_in_lake",
                    key[0],
                    key[1],
                    key[2],
                    key[3],
                    expected=1,
                    stored=count,
                    detail=f"identical row archived {count} times"
                    + ("" if isinstance(value, str) else f" (value {value})"),
                )
            )
    return mismatches


def duplicate_events(event_ids: Iterable[str], *, limit: int = 100) -> list[Mismatch]:
    """Archived entity events whose `event_id` appears more than once."""
    counts = Counter(event_ids)
    dups = sorted((eid, n) for eid, n in counts.items() if n > 1)
    return [
        Mismatch(
            "duplicate_event_in_lake",
            "-",
            expected=1,
            stored=n,
            detail=f"event {eid} archived {n} times",
        )
        for eid, n in dups[:limit]
    ]
