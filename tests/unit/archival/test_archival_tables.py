"""Pure parts of the archival service: layout, payload parsing, tables, dedup planning."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import orjson
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from analytics_engine.archival.kpi_results import new_positions, plan_flush
from analytics_engine.archival.layout import (
    dims_key,
    entity_events_object_key,
    kpi_object_key,
    new_batch_name,
)
from analytics_engine.archival.ledger import Intent, PlannedObject
from analytics_engine.archival.tables import (
    KPI_RESULTS_SCHEMA,
    PayloadError,
    fingerprints_of,
    from_parquet,
    kpi_table,
    parse_event_batch,
    parse_kpi_result,
    to_parquet,
)
from analytics_engine.core.storable import MAX_NAME


def payload(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "kpi_code": "revenue",
        "value": 12.5,
        "window_start": "2024-03-01T23:59:00Z",
        "window_end": "2024-03-02T00:00:00+00:00",
        "dimensions": {"region": "eu", "tier": 2, "flag": None},
        "sample_count": 4,
        "definition_version": 3,
        "computed_at": "2024-03-02T00:00:05.250000Z",
    }
    base.update(over)
    return base


def test_keys_are_hive_partitioned_and_safe() -> None:
    assert kpi_object_key("revenue", "2024-03-01", "b") == (
        "kpi_results/kpi_code=revenue/date=2024-03-01/b.parquet"
    )
    assert entity_events_object_key("order", date(2024, 3, 1), "42") == (
        "entity_events/entity_type=order/date=2024-03-01/batch-42.parquet"
    )
    odd = entity_events_object_key("a/b", "2024-03-01", "x/=1")
    assert odd.count("/") == 3 and odd.count("=") == 2
    first, second = new_batch_name(), new_batch_name()
    assert first != second and len(first) == len(second)


def test_dims_key_is_canonical() -> None:
    assert dims_key({"b": 1, "a": None}) == dims_key({"a": None, "b": 1}) == '{"a":null,"b":1}'
    assert dims_key(None) == dims_key({}) == "{}"


def test_parse_kpi_result_partition_and_times() -> None:
    row = parse_kpi_result(payload())
    assert row.day == "2024-03-01"
    assert row.window_end_us - row.window_start_us == 60_000_000
    assert row.computed_at_us is not None and row.computed_at_us % 1_000_000 == 250_000
    assert row.dimensions == (("flag", None), ("region", "eu"), ("tier", "2"))
    # the same result with other spellings of the same times has the same fingerprint
    same = parse_kpi_result(payload(window_start="2024-03-02T00:59:00+01:00", value=12.5))
    assert same.fingerprint == row.fingerprint
    assert parse_kpi_result(payload(value=12.6)).fingerprint != row.fingerprint
    assert parse_kpi_result(payload(dimensions={"region": "us"})).fingerprint != row.fingerprint


@pytest.mark.parametrize(
    "bad",
    [
        {"kpi_code": ""},
        {"window_start": "yesterday"},
        {"window_end": "2024-03-01T23:58:00Z"},
        {"value": "12"},
        {"dimensions": [1]},
        {"sample_count": 1.5},
        {"definition_version": 2**40},
    ],
)
def test_unarchivable_results_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(PayloadError):
        parse_kpi_result(payload(**bad))


def test_table_roundtrip_and_recovered_fingerprints() -> None:
    rows = [parse_kpi_result(payload(value=float(i), dimensions={"r": i % 3})) for i in range(50)]
    table = from_parquet(to_parquet(kpi_table(rows)))
    assert table.schema.equals(KPI_RESULTS_SCHEMA)
    assert table.num_rows == 50
    assert sorted(fingerprints_of(table)) == sorted(r.fingerprint for r in rows)
    first = table.slice(0, 1).to_pylist()[0]
    assert first["window_start"] == datetime(2024, 3, 1, 23, 59, tzinfo=UTC)


def test_plan_flush_drops_archived_and_repeated_results() -> None:
    a = parse_kpi_result(payload(value=1.0))
    b = parse_kpi_result(payload(value=2.0))
    c = parse_kpi_result(payload(kpi_code="other", value=3.0))
    plan = plan_flush([a, b, a, c], archived={b.fingerprint})
    assert plan.dropped == 2
    assert plan.partitions == {("revenue", "2024-03-01"): [a], ("other", "2024-03-01"): [c]}


def test_event_batch_parsing_dedups_event_ids() -> None:
    row = {
        "event_id": "e1",
        "event_kind": "created",
        "entity_type": "order",
        "entity_id": "o",
        "version": 1,
        "occurred_at": "2024-03-01T10:00:00Z",
        "published_at": "2024-03-01T10:00:01Z",
        "attributes": {"b": 1, "a": "x"},
        "reason": None,
        "source": "sim",
    }
    batch = parse_event_batch(
        {
            "batch_id": "b",
            "entity_type": "order",
            "date": "2024-03-01",
            "rows": [row, row, {**row, "event_id": "e2"}],
        }
    )
    assert batch.table.num_rows == 2
    assert batch.table.schema.field("occurred_at").type == pa.timestamp("us", tz="UTC")
    assert orjson.loads(batch.table.column("attributes")[0].as_py()) == {"a": "x", "b": 1}
    with pytest.raises(PayloadError):
        parse_event_batch(
            {"batch_id": "b", "entity_type": "order", "date": "03/01/2024", "rows": []}
        )
    with pytest.raises(PayloadError):
        parse_event_batch(
            {
                "batch_id": "b",
                "entity_type": "order",
                "date": "2024-03-01",
                "rows": [{"event_kind": "created"}],
            }
        )


def test_intent_roundtrip() -> None:
    intent = Intent("b1", "me", 12.5, (PlannedObject("k/x.parquet", "revenue", "2024-03-01"),))
    assert Intent.decode("b1", intent.encode()) == intent


_IDS = st.lists(st.sampled_from([b"1-0", b"1-1", b"2-0", b"3-0", b"4-0"]), max_size=8)


@given(_IDS, _IDS)
def test_new_positions_skips_held_and_repeated_ids(ids: list[bytes], held: list[bytes]) -> None:
    """The batch check equals the plain loop: first occurrences of the ids not held."""
    expected: list[int] = []
    seen = set(held)
    for position, entry_id in enumerate(ids):
        if entry_id not in seen:
            seen.add(entry_id)
            expected.append(position)
    assert list(new_positions(ids, dict.fromkeys(held, "ch"))) == expected


def test_every_entity_type_the_database_stores_is_archivable() -> None:
    """The database stores entity types of up to `MAX_NAME` (200) characters and sends their
    old events here: a batch of a longer type than this service took was dead-lettered on
    every re-send, never confirmed, and held one of the database's in-flight slots forever."""
    entity_type = "t" * MAX_NAME
    row = {
        "event_id": "e1",
        "event_kind": "created",
        "entity_type": entity_type,
        "entity_id": "o",
        "version": 1,
        "occurred_at": "2024-03-01T10:00:00+00:00",
        "published_at": "2024-03-01T10:00:01+00:00",
        "attributes": "{}",
        "reason": None,
        "source": "sim",
    }
    batch = parse_event_batch(
        {
            "batch_id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "entity_type": entity_type,
            "date": "2024-03-01",
            "rows": [row],
        }
    )
    assert batch.entity_type == entity_type and batch.table.num_rows == 1
