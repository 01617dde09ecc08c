"""KPIEngine: the semantics of docs/architecture.md "KPI semantics", checked example by example
and against a brute-force reference (hypothesis)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analytics_engine.kpi import (
    EntityEventView,
    KPIEngine,
    KPIResult,
    VersionedKPIDefinition,
    compile_filter,
    windows_for,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def kpi(code: str = "revenue", version: int = 1, **spec: Any) -> VersionedKPIDefinition:
    base: dict[str, Any] = {
        "code": code,
        "display_name": code,
        "entity_type": "order",
        "aggregation": "sum",
        "field": "amount",
        "window": {"type": "tumbling", "size": "10s"},
        "version": version,
    }
    return VersionedKPIDefinition.model_validate({**base, **spec})


def ev(
    i: int | str,
    occurred: float,
    published: float | None = None,
    *,
    kind: str = "created",
    entity_type: str = "order",
    **attrs: Any,
) -> EntityEventView:
    return EntityEventView(
        event_id=str(i),
        event_kind=kind,
        entity_type=entity_type,
        entity_id=f"o{i}",
        version=1,
        occurred_at=at(occurred),
        published_at=at(occurred if published is None else published),
        attributes=attrs,
    )


def engine(*defs: VersionedKPIDefinition, **kw: Any) -> KPIEngine:
    e = KPIEngine(clock=lambda: NOW, **kw)
    e.set_definitions(defs)
    return e


def values(results: list[KPIResult]) -> list[tuple[str, float, float, dict[str, Any], int]]:
    return [
        (r.kpi_code, (r.window_start - T0).total_seconds(), r.value, r.dimensions, r.sample_count)
        for r in results
    ]


def test_tumbling_sum_grouped_emitted_once_on_close() -> None:
    e = engine(kpi(group_by=["region"]))
    e.process(ev(1, 1, amount=10, region="eu"))
    e.process(ev(2, 2, amount=5.5, region="us"))
    e.process(ev(3, 9.9, amount=1, region="eu"))
    assert e.drain_results() == []
    e.process(ev(4, 10, amount=100, region="eu"))  # published at 10s: closes [0, 10)
    results = e.drain_results()
    assert values(results) == [
        ("revenue", 0, 11.0, {"region": "eu"}, 2),
        ("revenue", 0, 5.5, {"region": "us"}, 1),
    ]
    r = results[0]
    assert (r.window_end - r.window_start, r.definition_version, r.computed_at) == (
        timedelta(seconds=10),
        1,
        NOW,
    )
    e.process(ev(5, 15, amount=1, region="eu"))
    assert e.drain_results() == []  # [0, 10) is not emitted again
    e.advance(at(25) + timedelta(seconds=5))
    assert values(e.drain_results()) == [("revenue", 10, 101.0, {"region": "eu"}, 2)]
    e.advance(NOW)
    assert e.drain_results() == []


def test_out_of_order_within_lateness_is_included_late_is_counted() -> None:
    e = engine(kpi(window={"type": "tumbling", "size": "10s", "allowed_lateness": "5s"}))
    e.process(ev(1, 5, amount=1))
    e.process(ev(2, 12, amount=2))  # next window
    e.process(ev(3, 3, 14.9, amount=4))  # occurred in [0,10), published before 15: in
    e.process(ev(4, 4, 15, amount=8))  # published at the close time: late, and closes [0,10)
    e.process(ev(5, 6, 16, amount=16))  # late
    assert values(e.drain_results()) == [("revenue", 0, 5.0, {}, 2)]
    assert e.stats().kpis["revenue"].late_events == 2
    e.advance(NOW)
    assert values(e.drain_results()) == [("revenue", 10, 2.0, {}, 1)]


def test_duplicates_are_dropped() -> None:
    e = engine(kpi(aggregation="count", field=None))
    for _ in range(3):
        e.process(ev("same", 1))
    e.process(ev("other", 2))
    e.advance(NOW)
    assert values(e.drain_results()) == [("revenue", 0, 2.0, {}, 2)]
    assert e.stats().duplicates == 2


def test_dedupe_capacity_is_bounded() -> None:
    e = engine(kpi(aggregation="count", field=None), dedupe_capacity=2)
    for i in ("a", "b", "c", "a"):  # "a" was forgotten after "c"
        e.process(ev(i, 1))
    e.advance(NOW)
    assert e.drain_results()[0].value == 4.0
    assert len(e.snapshot()["recent_event_ids"]) == 2


def test_the_dedupe_ring_is_numbered_and_restores_without_the_snapshot() -> None:
    """The ring's ids are numbered so that its owner can store only what is new
    (`calculation.recent_ids_log`); a snapshot without them restores them from there."""
    e = engine(kpi(aggregation="count", field=None), dedupe_capacity=3)
    for i in ("a", "b", "a", "c", "d"):  # the second "a" is a duplicate: not numbered
        e.process(ev(i, 1))
    assert (e.recent_start, e.recent_end) == (1, 4)
    assert e.recent_ids() == ["b", "c", "d"] and e.recent_ids(3) == ["d"]
    snap = json.loads(json.dumps(e.snapshot(recent_ids=False)))
    assert "recent_event_ids" not in snap
    again = engine(kpi(aggregation="count", field=None), dedupe_capacity=3)
    again.restore(snap)
    again.restore_recent(e.recent_ids(), e.recent_end)
    again.process(ev("c", 1))  # still known: dropped
    again.process(ev("e", 1))
    assert again.stats().duplicates == 1
    assert (again.recent_start, again.recent_end, again.recent_ids()) == (2, 5, ["c", "d", "e"])
    # a snapshot with the ids (as every snapshot had before) restores them itself
    old = engine(kpi(aggregation="count", field=None), dedupe_capacity=3)
    old.restore(json.loads(json.dumps(e.snapshot())))
    assert (old.recent_start, old.recent_end, old.recent_ids()) == (1, 4, ["b", "c", "d"])


def test_sliding_windows() -> None:
    e = engine(
        kpi(
            aggregation="count",
            field=None,
            window={"type": "sliding", "size": "30s", "slide": "10s"},
        )
    )
    e.process(ev(1, 25))
    e.advance(NOW)
    assert [(v[1], v[2]) for v in values(e.drain_results())] == [(0, 1.0), (10, 1.0), (20, 1.0)]


def test_filters_values_and_empty_groups() -> None:
    defs = [
        kpi("s", filter="status == 'ok'"),
        kpi("a", aggregation="avg"),
        kpi("c", aggregation="count", field="amount"),
        kpi("d", aggregation="count_distinct", field="customer"),
        kpi("k", aggregation="count", field=None, filter="event == 'updated' && version == 1"),
        kpi("m", aggregation="min", filter="amount > missing"),  # always errors
    ]
    e = engine(*defs)
    e.process(ev(1, 1, status="ok", amount="12", customer="x"))  # non-numeric amount
    e.process(ev(2, 2, status="ok", customer="x", kind="updated"))  # no amount
    e.process(ev(3, 3, status="no", amount=2, customer=None))
    e.process(ev(4, 4, kind="deactivated", amount=1000))
    e.process(ev(5, 5, entity_type="invoice", amount=1000))
    e.advance(NOW)
    got = {v[0]: v[1:] for v in values(e.drain_results())}
    assert got == {
        "s": (0, 0.0, {}, 2),  # sum of no numeric values is 0, two matching events
        "a": (0, 2.0, {}, 3),
        "c": (0, 2.0, {}, 3),  # events with a non-null amount
        "d": (0, 1.0, {}, 3),
        "k": (0, 1.0, {}, 1),
    }  # "m": min of nothing is not emitted
    stats = e.stats()
    assert stats.kpis["s"].filtered_out == 1
    assert stats.kpis["s"].invalid_values == 1
    assert stats.kpis["m"].evaluation_errors == 3
    assert stats.ignored_events == 1


def test_dimensions_missing_null_and_typed() -> None:
    e = engine(kpi(aggregation="count", field=None, group_by=["region", "tier"]))
    for i, attrs in enumerate(
        [
            {"region": "eu"},
            {"region": "eu", "tier": None},
            {"region": "eu", "tier": 1},
            {"region": "eu", "tier": 1.0},
            {"region": "eu", "tier": True},
        ]
    ):
        e.process(ev(i, 1, **attrs))
    e.advance(NOW)
    assert [(r.dimensions, r.value) for r in e.drain_results()] == [
        ({"region": "eu", "tier": None}, 2.0),
        ({"region": "eu", "tier": 1}, 2.0),
        ({"region": "eu", "tier": True}, 1.0),
    ]


def test_list_or_object_dimension_leaves_the_event_out_and_is_counted() -> None:
    """Results carry scalar dimension values only (the protocol), so an event with a list or
    an object in a group_by attribute has no group: it is left out of that KPI, counted, and
    still counts for the KPIs that do not group by it."""
    by_tag = kpi("by_tag", aggregation="count", field=None, group_by=["tag"])
    by_two = kpi("by_two", aggregation="count", field=None, group_by=["region", "tag"])
    total = kpi("total", aggregation="count", field=None)
    e = engine(by_tag, by_two, total)
    for i, tag in enumerate(["a", ["a"], {"k": 1}, None, "a"]):
        e.process(ev(i, 1, region="eu", tag=tag))
    e.advance(NOW)
    assert sorted((r.kpi_code, json.dumps(r.dimensions), r.value) for r in e.drain_results()) == [
        ("by_tag", '{"tag": "a"}', 2.0),
        ("by_tag", '{"tag": null}', 1.0),
        ("by_two", '{"region": "eu", "tag": "a"}', 2.0),
        ("by_two", '{"region": "eu", "tag": null}', 1.0),
        ("total", "{}", 5.0),
    ]
    stats = e.stats().kpis
    assert (stats["by_tag"].invalid_dimensions, stats["by_two"].invalid_dimensions) == (2, 2)
    assert stats["total"].invalid_dimensions == 0


def test_hot_reload() -> None:
    e = engine(kpi("a"), kpi("b"), kpi("c"))
    for i in range(3):
        e.process(ev(i, 1, amount=1))
    e.set_definitions(
        [
            kpi("a"),  # unchanged: keeps state
            kpi("b", version=2),  # new version: reset
            kpi("d"),  # new
        ]
    )  # "c" removed: dropped without emitting
    e.process(ev(9, 2, amount=10))
    e.advance(NOW)
    assert [(r.kpi_code, r.value, r.definition_version) for r in e.drain_results()] == [
        ("a", 13.0, 1),
        ("b", 10.0, 2),
        ("d", 10.0, 1),
    ]
    e.set_definitions([kpi("a", enabled=False)])
    assert e.definitions == {}
    with pytest.raises(ValueError, match="duplicate"):
        e.set_definitions([kpi("a"), kpi("a")])


def test_changed_content_same_version_resets() -> None:
    e = engine(kpi("a"))
    e.process(ev(1, 1, amount=1))
    e.set_definitions([kpi("a", filter="amount > 0")])
    e.process(ev(2, 2, amount=2))
    e.advance(NOW)
    assert [r.value for r in e.drain_results()] == [2.0]


def test_watermark_and_snapshot_shape() -> None:
    e = engine(kpi())
    assert e.watermark is None
    e.process(ev(1, 1, 3, amount=1))
    e.process(ev(2, 2, 2, amount=1))  # older publish time does not move the watermark back
    assert e.watermark == at(3)
    snap = json.loads(json.dumps(e.snapshot()))
    assert snap["watermark"] == 1_704_067_203_000_000
    assert snap["kpis"]["revenue"]["windows"][0][0] == 1_704_067_200_000_000


def test_restore_rejects_unknown_format_and_changed_definitions() -> None:
    e = engine(kpi())
    e.process(ev(1, 1, amount=5))
    snap = e.snapshot()
    with pytest.raises(ValueError):
        engine(kpi()).restore({**snap, "format": 99})
    other = engine(kpi(version=2))
    other.restore(snap)
    other.advance(NOW)
    assert other.drain_results() == []
    same = engine(kpi())
    same.restore(snap)
    same.advance(NOW)
    assert [r.value for r in same.drain_results()] == [5.0]


# --------------------------------------------------------------------------------------------
# properties

DEFS = [
    kpi(
        "sum_g",
        group_by=["g"],
        filter="amount > -50.0",
        window={"type": "tumbling", "size": "10s", "allowed_lateness": "3s"},
    ),
    kpi(
        "avg_s",
        aggregation="avg",
        window={"type": "sliding", "size": "20s", "slide": "5s", "allowed_lateness": "2s"},
    ),
    kpi(
        "cnt",
        aggregation="count",
        field=None,
        group_by=["g"],
        window={"type": "tumbling", "size": "5s"},
    ),
    kpi("mx", aggregation="max", window={"type": "tumbling", "size": "10s"}),
    kpi(
        "dist",
        aggregation="count_distinct",
        field="g",
        filter="event == 'created'",
        window={"type": "tumbling", "size": "10s", "allowed_lateness": "10s"},
    ),
]


@st.composite
def streams(draw: st.DrawFn) -> list[EntityEventView]:
    """Events in publish order (as the bus delivers them), occurred_at up to 15 s earlier,
    with occasional re-deliveries."""
    n = draw(st.integers(0, 60))
    published = 0.0
    events: list[EntityEventView] = []
    for i in range(n):
        published += draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]))
        occurred = published - draw(st.sampled_from([0.0, 0.1, 1.0, 4.0, 9.0, 15.0]))
        attrs: dict[str, Any] = {"g": draw(st.sampled_from(["x", "y", None]))}
        amount = draw(
            st.one_of(
                st.none(), st.integers(-100, 100), st.floats(-100, 100).map(lambda x: round(x, 2))
            )
        )
        if amount is not None:
            attrs["amount"] = amount
        events.append(
            ev(i, occurred, published, kind=draw(st.sampled_from(["created", "updated"])), **attrs)
        )
        if events and draw(st.integers(0, 9)) == 0:
            events.append(draw(st.sampled_from(events)))
    return events


def reference(
    defs: list[VersionedKPIDefinition], events: list[EntityEventView]
) -> list[tuple[Any, ...]]:
    """The documented semantics, computed directly from the (deduplicated) events."""
    seen: set[str] = set()
    unique = [e for e in events if not (e.event_id in seen or seen.add(e.event_id))]  # type: ignore[func-returns-value]
    out = []
    for d in defs:
        assert d.window is not None
        flt = compile_filter(d.filter) if d.filter else None
        groups: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
        for e in unique:
            act = {
                **e.attributes,
                "event": e.event_kind,
                "entity_id": e.entity_id,
                "version": e.version,
            }
            if flt is not None and not flt.matches(act):
                continue
            for start, end in windows_for(e.occurred_at, d.window):
                if e.published_at < end + d.window.allowed_lateness:
                    key = (start, tuple(e.attributes.get(g) for g in d.group_by))
                    groups[key].append(e.attributes.get(d.field) if d.field else 1)
        for (start, dims), vals in groups.items():
            present = [v for v in vals if v is not None]
            nums = [float(v) for v in present if type(v) in (int, float)]
            value: float | None
            if d.aggregation == "count":
                value = float(len(present))
            elif d.aggregation == "count_distinct":
                value = float(len(set(present)))
            elif d.aggregation == "sum":
                value = math.fsum(nums)
            elif not nums:
                value = None
            elif d.aggregation == "avg":
                value = math.fsum(nums) / len(nums)
            else:
                value = max(nums)
            if value is not None:
                out.append(
                    (d.code, start, dict(zip(d.group_by, dims, strict=True)), value, len(vals))
                )
    return sorted(out, key=repr)


def run(events: list[EntityEventView], e: KPIEngine | None = None) -> list[KPIResult]:
    e = e or engine(*DEFS)
    for event in events:
        e.process(event)
    return e.drain_results()


def as_tuples(results: list[KPIResult]) -> list[tuple[Any, ...]]:
    return sorted(
        ((r.kpi_code, r.window_start, r.dimensions, r.value, r.sample_count) for r in results),
        key=repr,
    )


def same(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> bool:
    return len(a) == len(b) and all(
        x[:3] == y[:3] and x[4] == y[4] and math.isclose(x[3], y[3], rel_tol=1e-9, abs_tol=1e-9)
        for x, y in zip(a, b, strict=True)
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_engine_equals_reference_semantics(events: list[EntityEventView]) -> None:
    e = engine(*DEFS)
    results = run(events, e)
    e.advance(NOW)
    results += e.drain_results()
    assert same(as_tuples(results), reference(DEFS, events))
    keys = [(r.kpi_code, r.window_start, tuple(r.dimensions.items())) for r in results]
    assert len(keys) == len(set(keys))  # every (window, group) emitted at most once


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.floats(0, 1), st.booleans())
def test_snapshot_restore_mid_stream_is_invisible(
    events: list[EntityEventView], cut: float, drain_before_snapshot: bool
) -> None:
    split = int(len(events) * cut)
    uninterrupted = engine(*DEFS)
    expected = run(events, uninterrupted)
    uninterrupted.advance(NOW)
    expected += uninterrupted.drain_results()

    first = engine(*DEFS)
    for event in events[:split]:
        first.process(event)
    # undrained results travel in the snapshot
    partial = first.drain_results() if drain_before_snapshot else []
    snapshot = json.loads(json.dumps(first.snapshot()))
    second = engine(*DEFS)
    second.restore(snapshot)
    rest = run(events[split:], second)
    second.advance(NOW)
    rest += second.drain_results()
    assert partial + rest == expected


def test_closes_by_tells_whether_an_event_would_close_a_window() -> None:
    e = engine(kpi(window={"type": "tumbling", "size": "10s", "allowed_lateness": "2s"}))
    assert not e.closes_by(at(1000))  # no open window
    e.process(ev(1, 3, amount=1))
    assert not e.closes_by(at(11.999))
    assert e.closes_by(at(12))  # [0,10) closes at 10 + 2
    e.process(ev(2, 12.5, amount=1))
    assert [r.value for r in e.drain_results()] == [1.0]
    assert not e.closes_by(at(21.9)) and e.closes_by(at(22))
