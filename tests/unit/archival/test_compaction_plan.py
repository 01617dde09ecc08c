"""Pure planning of lake compaction: which partitions, which groups of files, which intents."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from analytics_engine.archival.compaction import (
    CompactionIntent,
    LakeObject,
    compacted_key,
    may_drop_unlanded,
    merged_parquet,
    old_enough,
    partition_of,
    plan_compaction,
)
from analytics_engine.archival.layout import entity_events_object_key, kpi_object_key
from analytics_engine.archival.tables import (
    KPI_RESULTS_SCHEMA,
    fingerprints_of,
    from_parquet,
    kpi_table,
    parse_kpi_result,
)

NOW = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
MiB = 1024 * 1024


def files(code: str, day: str, count: int, size: int = 1000) -> list[LakeObject]:
    return [
        LakeObject(kpi_object_key(code, day, f"20240301T0000{i:02d}Z-x"), size)
        for i in range(count)
    ]


def plan(objects: list[LakeObject], **kw: object) -> list[tuple[str, int]]:
    options: dict[str, object] = {
        "now": NOW,
        "min_age": DAY,
        "min_files": 16,
        "max_bytes": 64 * MiB,
        **kw,
    }
    groups = plan_compaction(objects, **options)  # type: ignore[arg-type]
    return [(g.partition.prefix, len(g.keys)) for g in groups]


def test_partition_of_reads_kpi_keys_only() -> None:
    part = partition_of(kpi_object_key("orders count", "2024-03-01", "b1"))
    assert part is not None
    assert part.prefix == "kpi_results/kpi_code=orders%20count/date=2024-03-01"
    assert (part.kpi_code, part.day) == ("orders count", date(2024, 3, 1))
    assert partition_of(entity_events_object_key("order", "2024-03-01", "b1")) is None
    assert partition_of("kpi_results/kpi_code=a/date=2024-13-01/b.parquet") is None
    assert partition_of("kpi_results/kpi_code=a/date=2024-03-01/b.json") is None
    assert partition_of("kpi_results/kpi_code=a/b.parquet") is None
    key = compacted_key(part, "abc")
    assert key == "kpi_results/kpi_code=orders%20count/date=2024-03-01/compacted-abc.parquet"
    assert partition_of(key) == part


def test_a_day_is_old_enough_once_it_ended_min_age_ago() -> None:
    end_of_first = datetime(2024, 3, 2, tzinfo=UTC)
    assert not old_enough(
        date(2024, 3, 1), now=end_of_first + DAY - timedelta(seconds=1), min_age=DAY
    )
    assert old_enough(date(2024, 3, 1), now=end_of_first + DAY, min_age=DAY)
    assert old_enough(date(2024, 3, 1), now=end_of_first, min_age=timedelta(0))
    assert not old_enough(date(2024, 3, 2), now=end_of_first, min_age=timedelta(0))


def test_old_partitions_with_enough_files_are_merged_young_or_sparse_ones_are_not() -> None:
    objects = [
        *files("a", "2024-03-01", 20),
        *files("b", "2024-03-01", 15),  # too few
        *files("a", "2024-03-09", 30),  # ended 12 h ago: too young
        *files("a", "2024-03-08", 16),
        LakeObject(entity_events_object_key("order", "2024-03-01", "b1"), 10),
        LakeObject("kpi_results/stray.parquet", 10),
    ]
    assert plan(objects) == [
        ("kpi_results/kpi_code=a/date=2024-03-01", 20),
        ("kpi_results/kpi_code=a/date=2024-03-08", 16),
    ]
    assert plan(objects, min_files=15) == [
        ("kpi_results/kpi_code=a/date=2024-03-01", 20),
        ("kpi_results/kpi_code=a/date=2024-03-08", 16),
        ("kpi_results/kpi_code=b/date=2024-03-01", 15),
    ]


def test_busy_objects_are_left_alone_and_do_not_count() -> None:
    objects = files("a", "2024-03-01", 17)
    busy = {objects[3].key, objects[9].key}
    groups = plan_compaction(
        objects, now=NOW, min_age=DAY, min_files=15, max_bytes=64 * MiB, busy=busy
    )
    assert len(groups) == 1
    assert set(groups[0].keys) == {o.key for o in objects} - busy
    assert plan(objects, busy=busy) == []  # 15 left, fewer than 16


def test_a_big_partition_is_merged_in_groups_and_large_files_stay() -> None:
    small = files("a", "2024-03-01", 40, size=10 * MiB)
    large = LakeObject(kpi_object_key("a", "2024-03-01", "compacted-big"), 40 * MiB)
    groups = plan_compaction(
        [*small, large], now=NOW, min_age=DAY, min_files=16, max_bytes=64 * MiB
    )
    assert [len(g.keys) for g in groups] == [6, 6, 6, 6, 6, 6, 4]
    assert all(g.size <= 64 * MiB for g in groups)
    assert large.key not in {k for g in groups for k in g.keys}
    assert [k for g in groups for k in g.keys] == sorted(o.key for o in small)


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=5000), min_size=0, max_size=60),
    max_bytes=st.integers(min_value=2, max_value=20_000),
    min_files=st.integers(min_value=2, max_value=20),
)
def test_groups_respect_the_cap_and_never_hold_one_file(
    sizes: list[int], max_bytes: int, min_files: int
) -> None:
    objects = [
        LakeObject(kpi_object_key("a", "2024-03-01", f"b{i:03d}"), size)
        for i, size in enumerate(sizes)
    ]
    groups = plan_compaction(
        objects, now=NOW, min_age=DAY, min_files=min_files, max_bytes=max_bytes
    )
    merged = [k for g in groups for k in g.keys]
    assert len(merged) == len(set(merged))  # no file in two groups
    mergeable = [o for o in objects if o.size < max_bytes // 2]
    if len(mergeable) < min_files:
        assert groups == []
    for g in groups:
        assert len(g.keys) >= 2
        assert g.size <= max_bytes
        assert g.size == sum(o.size for o in objects if o.key in g.keys)
    # at most one mergeable file left out (a last group of one)
    if len(mergeable) >= min_files:
        assert len(mergeable) - len(merged) <= 1


def test_intent_round_trip_and_who_may_drop_an_unlanded_one() -> None:
    intent = CompactionIntent("n1", "kpi_results/x/compacted-n1.parquet", ("a", "b"), "r-1", 100.0)
    assert CompactionIntent.decode("n1", intent.encode()) == intent
    assert may_drop_unlanded(intent, owner="r-1", now=101.0, in_flight_s=600)
    assert not may_drop_unlanded(intent, owner="r-2", now=101.0, in_flight_s=600)
    assert may_drop_unlanded(intent, owner="r-2", now=700.0, in_flight_s=600)


def result(i: int) -> dict[str, object]:
    start = datetime(2024, 3, 1, tzinfo=UTC) + timedelta(minutes=i % 7)
    return {
        "kpi_code": "a",
        "value": float(i) if i % 5 else float("nan"),
        "window_start": start.isoformat(),
        "window_end": (start + timedelta(minutes=1)).isoformat(),
        "dimensions": {"region": ["eu", "us"][i % 2]},
        "sample_count": i,
        "definition_version": 1,
        "computed_at": start.isoformat(),
    }


def test_merged_parquet_holds_the_same_rows_in_lake_order() -> None:
    rows = [parse_kpi_result(result(i)) for i in range(30)]
    tables = [kpi_table(rows[i : i + 4]) for i in range(0, 30, 4)]
    merged = from_parquet(merged_parquet(tables, compression_level=None))
    assert merged.schema.equals(KPI_RESULTS_SCHEMA)
    assert sorted(fingerprints_of(merged)) == sorted(r.fingerprint for r in rows)
    starts = merged.column("window_start").to_pylist()
    assert starts == sorted(starts)
    order = list(zip(starts, merged.column("dims_key").to_pylist(), strict=True))
    assert order == sorted(order)
    assert pa.concat_tables(tables).num_rows == merged.num_rows == 30
