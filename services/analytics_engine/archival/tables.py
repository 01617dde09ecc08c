"""Payloads -> Arrow tables -> Parquet bytes, and back to fingerprints (pure, no I/O).

Column types are fixed here (not inferred per file) so every file of a dataset has the same
schema and DuckDB / pyarrow.dataset can read the whole prefix as one table.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Final

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from analytics_engine.archival.event_columns import events_columns
from analytics_engine.archival.layout import (
    dims_key,
    entity_events_object_key,
    epoch_us,
    result_fingerprint,
)
from analytics_engine.core.envelopes import validation_summary
from analytics_engine.core.payloads import KPIResult, scalar_dimensions
from analytics_engine.core.storable import MAX_NAME

TS: Final = pa.timestamp("us", tz="UTC")
MAX_KPI_CODE: Final = 63  # as `KPIResult.kpi_code`
MAX_BATCH_ID: Final = 100  # as `ArchivalBatch.batch_id` in core/payloads.py
MAX_ENTITY_TYPE: Final = MAX_NAME  # as the entity events' `entity_type` the database stores
MAX_S3_KEY_BYTES: Final = 1024
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()

KPI_RESULTS_SCHEMA: Final = pa.schema(
    [
        pa.field("kpi_code", pa.string(), nullable=False),
        pa.field("window_start", TS, nullable=False),
        pa.field("window_end", TS, nullable=False),
        pa.field("dims_key", pa.string(), nullable=False),
        pa.field("dimensions", pa.map_(pa.string(), pa.string())),
        pa.field("value", pa.float64()),
        pa.field("sample_count", pa.int64(), nullable=False),
        pa.field("definition_version", pa.int32(), nullable=False),
        pa.field("computed_at", TS),
    ]
)
"""`dims_key` is the canonical JSON of the dimensions (the exact key); `dimensions` is the same
as a map for convenient filtering (string values as-is, other JSON values as JSON text)."""

ENTITY_EVENTS_SCHEMA: Final = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("event_kind", pa.string()),
        pa.field("entity_type", pa.string()),
        pa.field("entity_id", pa.string()),
        pa.field("version", pa.int64()),
        pa.field("occurred_at", TS),
        pa.field("published_at", TS),
        pa.field("attributes", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("source", pa.string()),
    ]
)
"""`attributes` is the event's attribute object as JSON text."""


class PayloadError(ValueError):
    """A payload that can never be archived (missing or mistyped field): dead-letter it."""


def parse_time(value: Any, field: str) -> datetime:
    """ISO 8601 text (or a datetime) as an aware UTC datetime; naive means UTC."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise PayloadError(f"{field}: not an ISO 8601 time: {value[:40]!r}") from None
    else:
        raise PayloadError(f"{field}: expected an ISO 8601 time")
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@functools.lru_cache(maxsize=8192)
def iso_us(text: str) -> int | None:
    """Epoch microseconds of an ISO 8601 text (None when it does not parse). Cached: within a
    batch most results share their window bounds and emission time."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return epoch_us(moment)


def time_us(value: Any, field: str) -> int:
    """Epoch microseconds of an ISO 8601 time (naive means UTC)."""
    if isinstance(value, str):
        us = iso_us(value)
        if us is None:
            raise PayloadError(f"{field}: not an ISO 8601 time: {value[:40]!r}")
        return us
    return epoch_us(parse_time(value, field))


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"{field}: expected an integer")
    if isinstance(value, float) and not value.is_integer():
        raise PayloadError(f"{field}: expected an integer")
    return int(value)


def dimension_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


@functools.lru_cache(maxsize=1024)
def _day_of(day_number: int) -> str:
    return date.fromordinal(_EPOCH_ORDINAL + day_number).isoformat()


def utc_day(us: int) -> str:
    """UTC date (`YYYY-MM-DD`) of epoch microseconds."""
    return _day_of(us // 86_400_000_000)


@dataclass(frozen=True, slots=True)
class KpiRow:
    """One KPI result ready for the lake."""

    kpi_code: str
    window_start_us: int
    window_end_us: int
    dims_key: str
    dimensions: tuple[tuple[str, str | None], ...]
    value: float
    sample_count: int
    definition_version: int
    computed_at_us: int | None
    day: str
    fingerprint: bytes


def parse_kpi_result(payload: Mapping[str, Any]) -> KpiRow:
    """Validate a stored-KPI-result payload; raises `PayloadError` on anything unusable."""
    code = payload.get("kpi_code")
    if not isinstance(code, str) or not code:
        raise PayloadError("kpi_code: expected a non-empty string")
    if len(code) > MAX_KPI_CODE:
        # it names the lake partition: S3 would refuse the key on every flush (poison message)
        raise PayloadError(f"kpi_code: at most {MAX_KPI_CODE} characters")
    start_us = time_us(payload.get("window_start"), "window_start")
    end_us = time_us(payload.get("window_end"), "window_end")
    if end_us <= start_us:
        raise PayloadError("window_end must be after window_start")
    try:  # the protocol's own rules first (~10 us a row; archival is batch work)
        KPIResult.model_validate(payload)
    except ValidationError as exc:
        raise PayloadError(validation_summary(exc)) from None
    raw_value = payload["value"]
    if isinstance(raw_value, bool) or not isinstance(raw_value, int | float):
        raise PayloadError("value: expected a number")
    value = float(raw_value)
    dims = payload.get("dimensions") or {}
    if not isinstance(dims, dict):
        raise PayloadError("dimensions: expected an object")
    if not scalar_dimensions(dims):
        raise PayloadError("dimensions: values must be strings, numbers, booleans or null")
    raw_count = payload["sample_count"]
    sample_count = raw_count if type(raw_count) is int else _int(raw_count, "sample_count")
    if sample_count >= 2**63:
        # the column is int64: the writer would fail on every flush (poison message)
        raise PayloadError("sample_count: out of range")
    raw_version = payload["definition_version"]
    version = raw_version if type(raw_version) is int else _int(raw_version, "definition_version")
    if not -(2**31) <= version < 2**31:
        raise PayloadError("definition_version: out of range")
    computed_us = time_us(payload["computed_at"], "computed_at")
    try:
        key = dims_key(dims)
        code.encode()
    except (TypeError, UnicodeError):  # a lone surrogate (only a Python caller can make one)
        raise PayloadError("kpi_code / dimensions: not valid Unicode text") from None
    return KpiRow(
        kpi_code=code,
        window_start_us=start_us,
        window_end_us=end_us,
        dims_key=key,
        dimensions=tuple((str(k), dimension_text(v)) for k, v in sorted(dims.items()))
        if dims
        else (),
        value=value,
        sample_count=sample_count,
        definition_version=version,
        computed_at_us=computed_us,
        day=utc_day(start_us),
        fingerprint=result_fingerprint(
            kpi_code=code,
            window_start_us=start_us,
            window_end_us=end_us,
            dims=key,
            value=value,
            sample_count=sample_count,
            definition_version=version,
        ),
    )


def kpi_rows_table(rows: Sequence[KpiRow]) -> pa.Table:
    """Rows as a table, in their order."""
    return pa.table(
        {
            "kpi_code": pa.array([r.kpi_code for r in rows], pa.string()),
            "window_start": pa.array([r.window_start_us for r in rows], TS),
            "window_end": pa.array([r.window_end_us for r in rows], TS),
            "dims_key": pa.array([r.dims_key for r in rows], pa.string()),
            "dimensions": pa.array(
                [list(r.dimensions) for r in rows], pa.map_(pa.string(), pa.string())
            ),
            "value": nan_to_null(pa.array([r.value for r in rows], pa.float64())),
            "sample_count": pa.array([r.sample_count for r in rows], pa.int64()),
            "definition_version": pa.array([r.definition_version for r in rows], pa.int32()),
            "computed_at": pa.array([r.computed_at_us for r in rows], TS),
        },
        schema=KPI_RESULTS_SCHEMA,
    )


def nan_to_null(values: pa.Array) -> pa.Array:
    """A NaN value is stored as null."""
    nan = pc.is_nan(values)
    if not pc.any(nan).as_py():
        return values
    return pc.if_else(nan, pa.scalar(None, pa.float64()), values)


def lake_order(table: pa.Table) -> pa.Table:
    """A partition's rows sorted by window then dimensions (compresses well and makes range
    scans cheap); stable, so equal keys keep their arrival order."""
    return table.sort_by(
        [("window_start", "ascending"), ("dims_key", "ascending"), ("window_end", "ascending")]
    )


def kpi_table(rows: Sequence[KpiRow]) -> pa.Table:
    """Rows of one partition as a table, in lake order."""
    return lake_order(kpi_rows_table(rows))


def fingerprints_of(table: pa.Table) -> list[bytes]:
    """Fingerprints of the rows of a KPI-results table (recovery reads a written file back)."""
    columns = {
        name: table.column(name).to_pylist()
        for name in ("kpi_code", "dims_key", "value", "sample_count", "definition_version")
    }
    starts = table.column("window_start").cast(pa.int64()).to_pylist()
    ends = table.column("window_end").cast(pa.int64()).to_pylist()
    return [
        result_fingerprint(
            kpi_code=code,
            window_start_us=start,
            window_end_us=end,
            dims=key,
            value=math.nan if value is None else value,
            sample_count=count,
            definition_version=version,
        )
        for code, start, end, key, value, count, version in zip(
            columns["kpi_code"],
            starts,
            ends,
            columns["dims_key"],
            columns["value"],
            columns["sample_count"],
            columns["definition_version"],
            strict=True,
        )
    ]


@dataclass(frozen=True, slots=True)
class EventBatch:
    """An `archival.events` payload, validated."""

    batch_id: str
    entity_type: str
    day: date
    table: pa.Table


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def parse_event_batch(payload: Mapping[str, Any]) -> EventBatch:
    """Validate an `archival.events` payload and build its table; raises `PayloadError`.

    Rows repeating an `event_id` within the batch are kept once (the first), so the archive
    never holds the same event twice even if the sender's batch did."""
    batch_id = payload.get("batch_id")
    if isinstance(batch_id, int) and not isinstance(batch_id, bool):
        batch_id = str(batch_id)
    if not isinstance(batch_id, str) or not batch_id:
        raise PayloadError("batch_id: expected a non-empty string")
    entity_type = payload.get("entity_type")
    if not isinstance(entity_type, str) or not entity_type:
        raise PayloadError("entity_type: expected a non-empty string")
    try:
        day = date.fromisoformat(str(payload.get("date")))
    except ValueError:
        raise PayloadError("date: expected YYYY-MM-DD") from None
    if len(batch_id) > MAX_BATCH_ID or len(entity_type) > MAX_ENTITY_TYPE:
        raise PayloadError(
            f"batch_id / entity_type: at most {MAX_BATCH_ID} / {MAX_ENTITY_TYPE} characters"
        )
    if len(entity_events_object_key(entity_type, day, batch_id).encode()) > MAX_S3_KEY_BYTES:
        # S3 would refuse the key on every retry: a poison message, not an outage
        raise PayloadError("batch_id and entity_type make an object key longer than S3 allows")
    rows = payload.get("rows")
    if not isinstance(rows, list):
        raise PayloadError("rows: expected a list")
    return EventBatch(batch_id, entity_type, day, events_table(rows))


def events_table(rows: list[Any]) -> pa.Table:
    """The rows of an event batch as a table (column by column when they are in the plain
    shape the database sends, else row by row)."""
    table = events_columns(rows, ENTITY_EVENTS_SCHEMA)
    return table if table is not None else events_table_by_row(rows)


def events_table_by_row(rows: Iterable[Any]) -> pa.Table:
    """The reference builder: any accepted shape, and the reason for a row it rejects."""
    cols: dict[str, list[Any]] = {name: [] for name in ENTITY_EVENTS_SCHEMA.names}
    seen: set[str] = set()
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PayloadError(f"rows[{index}]: expected an object")
        event_id = row.get("event_id")
        if not isinstance(event_id, str) or not event_id:
            raise PayloadError(f"rows[{index}].event_id: expected a non-empty string")
        if event_id in seen:
            continue
        seen.add(event_id)
        version = row.get("version")
        attributes = row.get("attributes")
        cols["event_id"].append(event_id)
        cols["event_kind"].append(_optional_text(row.get("event_kind")))
        cols["entity_type"].append(_optional_text(row.get("entity_type")))
        cols["entity_id"].append(_optional_text(row.get("entity_id")))
        if version is not None:
            version = _int(version, "version")
            if not -(2**63) <= version < 2**63:  # int64: the writer would fail on every retry
                raise PayloadError(f"rows[{index}].version: out of range")
        cols["version"].append(version)
        for field in ("occurred_at", "published_at"):
            moment = row.get(field)
            cols[field].append(None if moment is None else epoch_us(parse_time(moment, field)))
        cols["attributes"].append(
            None
            if attributes is None
            else attributes
            if isinstance(attributes, str)
            else orjson.dumps(attributes, option=orjson.OPT_SORT_KEYS).decode()
        )
        cols["reason"].append(_optional_text(row.get("reason")))
        cols["source"].append(_optional_text(row.get("source")))
    return pa.table(
        {f.name: pa.array(cols[f.name], f.type) for f in ENTITY_EVENTS_SCHEMA},
        schema=ENTITY_EVENTS_SCHEMA,
    )


def to_parquet(table: pa.Table, *, compression_level: int | None = None) -> bytes:
    """Parquet (zstd) bytes of a table."""
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        compression_level=compression_level,
        use_dictionary=True,
        write_statistics=True,
    )
    return bytes(sink.getvalue().to_pybytes())


def from_parquet(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))
