"""Pure comparison logic of `analytics-engine verify`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from analytics_engine.calculation.backfill import compute, plan
from analytics_engine.kpi import EntityEventView, KPIEngine, VersionedKPIDefinition
from analytics_engine.kpi.definitions import KPIDefinition
from analytics_engine.verify import db
from analytics_engine.verify.compare import (
    Comparison,
    ResultRow,
    canonical_dims,
    compare_kpi,
    compare_lake,
    duplicate_events,
    is_open,
    same_value,
)
from analytics_engine.verify.engine import (
    EngineUnavailable,
    PendingBackfill,
    VersionStart,
    parse_coverage,
    parse_pending,
)
from analytics_engine.verify.report import Report, render_json, render_text
from analytics_engine.verify.sql import recompute_query

T0 = datetime(2024, 1, 1, tzinfo=UTC)
MIN = timedelta(minutes=1)


def row(
    i: int, value: float = 1.0, *, n: int = 1, dims: str = "{}", version: int | None = None
) -> ResultRow:
    return ResultRow("k", T0 + i * MIN, T0 + (i + 1) * MIN, dims, value, n, version)


def closed_windows(
    expected: list[ResultRow], stored: list[ResultRow], **options: Any
) -> Comparison:
    """`compare_kpi` of windows all closed (no lateness, a watermark well after them)."""
    return compare_kpi(
        "k",
        expected,
        stored,
        lateness=timedelta(0),
        watermark=T0 + 10 * MIN,
        definition_version=None,
        **options,
    )


def test_canonical_dims_merges_json_number_spellings() -> None:
    assert canonical_dims({"b": 1.0, "a": "x"}) == canonical_dims({"a": "x", "b": 1})
    assert canonical_dims({"b": True}) != canonical_dims({"b": 1})
    assert canonical_dims(None) == "{}"


def test_same_value_tolerance() -> None:
    assert same_value(1e6, 1e6 * (1 + 5e-10))
    assert not same_value(1e6, 1e6 * (1 + 2e-9))
    assert same_value(0.0, 5e-17)


def test_compare_kpi_reports_each_kind_of_problem() -> None:
    expected = [row(0, 5.0, n=2), row(1, 3.0), row(2, 7.0, n=3), row(3, 1.0)]
    stored = [row(0, 5.0, n=2), row(1, 3.5), row(2, 7.0, n=4), row(4, 9.0), row(4, 9.0)]
    result = closed_windows(expected, stored)
    problems = sorted((m.problem, m.window_start) for m in result.mismatches)
    assert problems == sorted(
        [
            ("wrong_value", T0 + MIN),
            ("wrong_sample_count", T0 + 2 * MIN),
            ("extra_window", T0 + 4 * MIN),
            ("duplicate_result", T0 + 4 * MIN),
            ("missing_window", T0 + 3 * MIN),
        ]
    )
    assert result.summary is not None and result.summary.matched == 1


def test_open_windows_and_other_versions_are_skipped() -> None:
    expected = [row(0), row(1), row(5, 2.0)]
    stored = [row(0), row(1, 4.0, version=1), row(5, 9.0, version=2)]
    result = compare_kpi(
        "k",
        expected,
        stored,
        lateness=timedelta(seconds=30),
        watermark=T0 + 5 * MIN,
        definition_version=2,
    )
    assert result.mismatches == []
    assert result.summary is not None
    assert result.summary.open_windows_skipped == 1
    assert result.summary.other_version_skipped == 1
    assert is_open(T0 + MIN, timedelta(seconds=1), T0 + MIN)
    assert not is_open(T0 + MIN, timedelta(0), T0 + MIN)
    assert is_open(T0, timedelta(0), None)


def test_windows_awaiting_a_backfill_are_pending_not_missing() -> None:
    backfill = PendingBackfill(
        definition_version=1, since=T0 + MIN, cut=T0 + 3 * MIN, due=T0 + 5 * MIN
    )
    expected = [row(0), row(1), row(2), row(3, 2.0)]
    stored = [row(2), row(3, 2.0)]  # a window before the cut may be stored from earlier
    result = closed_windows(expected, stored, pending=backfill.covers)
    assert result.summary is not None
    assert result.summary.pending_backfill == 1  # window 1: in [since, cut), not stored
    # window 0 starts before `since`: the backfill will not publish it, so it is missing
    assert [(m.problem, m.window_start) for m in result.mismatches] == [("missing_window", T0)]
    assert result.summary.matched == 2


def test_the_engine_s_pending_backfills_are_parsed_strictly() -> None:
    items = [
        {"code": "a", "status": "running", "backfill": None},
        {
            "code": "b",
            "status": "backfill_pending",
            "backfill": {
                "definition_version": 3,
                "since": "2024-01-01T00:00:00+00:00",
                "cut": "2024-01-01T00:10:00+00:00",
                "due": "2024-01-01T00:16:10+00:00",
            },
        },
    ]
    pending = parse_pending(items)
    assert list(pending) == ["b"]
    assert pending["b"].covers(T0 + 9 * MIN) and not pending["b"].covers(T0 + 10 * MIN)
    assert pending["b"].definition_version == 3
    with pytest.raises(EngineUnavailable, match="unexpected backfill entry"):
        parse_pending([{"code": "c", "backfill": {"since": "yesterday"}}])
    with pytest.raises(EngineUnavailable, match="no list"):
        parse_pending({"items": []})


def test_windows_before_the_version_s_start_are_not_expected_of_it() -> None:
    """The reviewer's case: v1 (filter region == 'eu') produced these windows; v2 (no filter)
    took effect later. The `us` groups v1 never produced are no missing windows of v2."""
    eu, us = canonical_dims({"region": "eu"}), canonical_dims({"region": "us"})
    stored = [row(i, 3.0, n=3, dims=eu, version=1) for i in range(3)]
    expected = [row(i, 3.0, n=3, dims=d) for i in range(3) for d in (eu, us)]
    before = compare_kpi(
        "k", expected, stored, lateness=timedelta(0), watermark=T0 + 60 * MIN, definition_version=2
    )
    assert [m.problem for m in before.mismatches] == ["missing_window"] * 3  # the false alarm
    result = compare_kpi(
        "k",
        expected,
        stored,
        lateness=timedelta(0),
        watermark=T0 + 60 * MIN,
        definition_version=2,
        version_since=T0 + 5 * MIN,
    )
    assert result.mismatches == []
    assert result.summary is not None
    assert result.summary.other_version_skipped == 3
    assert result.summary.before_version_skipped == 3


def test_from_the_version_s_start_on_every_problem_is_still_reported() -> None:
    expected = [row(0), row(1), row(2, 2.0), row(3)]
    stored = [row(0, 5.0, version=2), row(2, 9.0, version=2)]
    result = compare_kpi(
        "k",
        expected,
        stored,
        lateness=timedelta(0),
        watermark=T0 + 10 * MIN,
        definition_version=2,
        version_since=T0 + 2 * MIN,
    )
    problems = [(m.problem, m.window_start) for m in result.mismatches]
    # window 0 is stored (compared wherever it starts); window 1 was never expected of v2
    assert problems == [
        ("wrong_value", T0),
        ("wrong_value", T0 + 2 * MIN),
        ("missing_window", T0 + 3 * MIN),
    ]
    assert result.summary is not None and result.summary.before_version_skipped == 1


def test_a_window_holding_only_an_older_version_s_result_is_missing_from_the_start_on() -> None:
    """From the version's `since` on, the engine computes every window under the current
    version, whose result replaces an older one of the same key. A window still holding only
    v1's result lacks v2's: missing, not skipped (a backfill that lost windows went unseen).
    Before `since`, and where v2 has nothing to say (no matching event), v1's rows stay."""
    expected = [row(0, 2.0), row(3, 2.0), row(4, 2.0)]
    stored = [
        row(0, 1.0, version=1),  # before since: the older version's, kept
        row(3, 1.0, version=1),  # v2's result never arrived
        row(4, 2.0, version=2),
        row(5, 1.0, version=1),  # v2 has no result for it: a stale row, not v2's problem
    ]
    result = compare_kpi(
        "k",
        expected,
        stored,
        lateness=timedelta(0),
        watermark=T0 + 10 * MIN,
        definition_version=2,
        version_since=T0 + 2 * MIN,
    )
    assert [(m.problem, m.window_start) for m in result.mismatches] == [
        ("missing_window", T0 + 3 * MIN)
    ]
    assert "version 1" in result.mismatches[0].detail
    assert result.summary is not None and result.summary.matched == 1
    # still awaiting the engine's backfill: pending, not missing
    backfill = PendingBackfill(
        definition_version=2, since=T0 + 2 * MIN, cut=T0 + 4 * MIN, due=T0 + 9 * MIN
    )
    pending = compare_kpi(
        "k",
        expected,
        stored,
        lateness=timedelta(0),
        watermark=T0 + 10 * MIN,
        definition_version=2,
        version_since=T0 + 2 * MIN,
        pending=backfill.covers,
    )
    assert pending.mismatches == []
    assert pending.summary is not None and pending.summary.pending_backfill == 1


def test_a_new_kpi_backfilled_by_the_engine_verifies_clean() -> None:
    """The reviewer's case: six hours of orders, then a new 5-minute KPI. The engine publishes
    its windows from the backfill's `since` on; verify's default range starts at the oldest
    stored event, and must not call the windows before `since` missing."""
    events = [
        EntityEventView(
            str(i), "created", "order", f"o{i}", 1, T0 + i * MIN / 2, T0 + i * MIN / 2, {}
        )
        for i in range(720)
    ]
    kpi = VersionedKPIDefinition.model_validate(
        {
            "code": "orders_5m",
            "display_name": "Orders",
            "entity_type": "order",
            "aggregation": "count",
            "window": {"type": "tumbling", "size": "5m"},
            "version": 1,
        }
    )
    cut = events[-1].published_at
    job = plan(kpi, cut, timedelta(hours=1))
    stored = [
        ResultRow(
            r.kpi_code,
            r.window_start,
            r.window_end,
            canonical_dims(r.dimensions),
            r.value,
            r.sample_count,
            1,
        )
        for r in compute(job, list(events))  # type: ignore[arg-type]
    ]
    reference = KPIEngine(clock=lambda: T0)
    reference.set_definitions([kpi])
    for e in events:
        reference.process(e)
    reference.advance(T0 + timedelta(days=1))
    bounds = db.Bounds(
        newest_published=cut + timedelta(hours=2),
        events={"order": (events[0].occurred_at, events[-1].occurred_at)},
        results={},
    )
    span = db.default_range(kpi.definition(), bounds)
    assert span is not None and span[0] == T0
    expected = [
        ResultRow(
            r.kpi_code,
            r.window_start,
            r.window_end,
            canonical_dims(r.dimensions),
            r.value,
            r.sample_count,
        )
        for r in reference.drain_results()
        if r.window_start >= span[0] and r.window_end <= span[1]
    ]
    result = compare_kpi(
        "orders_5m",
        expected,
        stored,
        lateness=timedelta(0),
        watermark=cut + timedelta(hours=2),
        definition_version=1,
        version_since=job.since,
    )
    assert result.mismatches == []
    assert result.summary is not None
    assert result.summary.matched == len(stored) == 13  # from 04:55 (cut 05:59:30 - 1h, aligned)
    assert result.summary.before_version_skipped == 59  # 00:00 .. 04:50, never computed


def test_the_engine_s_version_starts_are_parsed_strictly() -> None:
    items = [
        {"code": "a", "coverage": None},
        {"code": "b", "coverage": {"definition_version": 2, "since": "2024-01-01T00:05:00Z"}},
        {"code": "c"},  # an engine that does not report it
    ]
    assert parse_coverage(items) == {"b": VersionStart(2, T0 + 5 * MIN)}
    with pytest.raises(EngineUnavailable, match="unexpected coverage entry"):
        parse_coverage([{"code": "b", "coverage": {"since": "2024-01-01T00:05:00Z"}}])
    with pytest.raises(EngineUnavailable, match="no list"):
        parse_coverage(None)


def test_compare_lake() -> None:
    stored = [row(0, 1.0), row(1, 2.0), row(2, 3.0), row(3, 4.0)]
    lake = [row(0, 1.0), row(1, 2.0), row(1, 2.0), row(2, 3.5), row(9, 1.0), row(9, 1.0)]
    problems = sorted((m.problem, m.window_start) for m in compare_lake(stored, lake))
    assert problems == [
        ("duplicate_in_lake", T0 + MIN),
        ("duplicate_in_lake", T0 + 9 * MIN),
        ("lake_value_mismatch", T0 + 2 * MIN),
        ("missing_in_lake", T0 + 3 * MIN),
    ]
    assert [m.stored for m in duplicate_events(["a", "b", "a", "c", "a"])] == [3]


def test_report_rendering() -> None:
    result = compare_kpi(
        "k", [row(0)], [], lateness=timedelta(0), watermark=T0 + MIN, definition_version=None
    )
    report = Report(
        start=T0,
        end=T0 + MIN,
        definitions_source="test",
        mismatches=result.mismatches,
        kpis=[result.summary] if result.summary else [],
    )
    text = render_text(report)
    assert "missing_window" in text and text.endswith("FAILED: 1 mismatch(es)")
    assert "before_version" in text
    assert '"ok": false' in render_json(report)
    assert '"before_version_skipped": 0' in render_json(report)


def test_recompute_query_shape() -> None:
    definition = KPIDefinition.model_validate(
        {
            "code": "rev",
            "display_name": "R",
            "entity_type": "order",
            "aggregation": "sum",
            "field": "amount",
            "filter": "status == 'done'",
            "group_by": ["region"],
            "window": {"type": "sliding", "size": "2m", "slide": "1m", "allowed_lateness": "5s"},
        }
    )
    query = recompute_query(definition, start=T0, end=T0 + 10 * MIN)
    assert query.params[:1] == ["order"] and query.params[-1] == "done"
    assert "$5::text" in query.sql
    assert f"p_us < ws_us + {125_000_000}" in query.sql
    assert query.group_by == ("region",) and query.size_us == 120_000_000


def test_a_window_recomputed_under_a_new_version_is_not_a_lake_duplicate() -> None:
    old, new = row(0, 5.0, version=1), row(0, 5.0, version=2)
    assert compare_lake([new], [old, new]) == []
    problems = {m.problem for m in compare_lake([new], [old, new, new])}
    assert problems == {"duplicate_in_lake"}


def test_a_result_archived_only_under_another_version_is_missing_in_the_lake() -> None:
    """v2's result was never archived, only v1's (same value): the lake lacks it. Reporting a
    value mismatch between two equal values would send the reader the wrong way."""
    old, new = row(0, 5.0, version=1), row(0, 5.0, version=2)
    [problem] = compare_lake([new], [old])
    assert problem.problem == "missing_in_lake"
    assert "archived only under version 1" in problem.detail
    # the same version archived with another value is a value mismatch, as before
    [problem] = compare_lake([new], [old, row(0, 6.0, version=2)])
    assert (problem.problem, problem.expected, problem.stored) == ("lake_value_mismatch", 5.0, 6.0)
