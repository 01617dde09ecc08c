"""KPI-result payloads -> validated Arrow columns, a batch at a time (pure, no I/O).

Why: validating and converting one result at a time (`tables.parse_kpi_result`: the protocol's
pydantic model, a dozen checks, a `KpiRow`) cost more CPU than everything else the archival
service does per result. Here the same rules are applied to whole columns: type checks over a
column at once, range checks as Arrow kernels, and the values a batch repeats (window bounds,
emission times, KPI codes, dimension objects) are validated once per distinct value, with the
same functions the per-row path uses.

Exactness: a batch is accepted here only when every payload passes these checks, and then gives
the rows `parse_kpi_result` would give. Anything the columnar checks cannot vouch for (a wrong
type, a bad time, one poison payload among good ones) sends the batch down in halves until the
payloads in doubt go through `parse_kpi_result` one by one, which accepts them or names the
reason to dead-letter them. The columnar path assumes payloads decoded from JSON (what the bus
delivers): dimension values are compared by their canonical JSON text.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter, methodcaller
from typing import Any, Final

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import TypeAdapter, ValidationError

from analytics_engine.archival.layout import FINGERPRINT_BYTES
from analytics_engine.archival.tables import (
    KPI_RESULTS_SCHEMA,
    MAX_KPI_CODE,
    TS,
    KpiRow,
    PayloadError,
    dimension_text,
    iso_us,
    kpi_rows_table,
    nan_to_null,
    parse_kpi_result,
    utc_day,
)
from analytics_engine.core.payloads import DimensionValue

Partition = tuple[str, str]

_MISSING: Final = object()
_INT32: Final = 2**31
_BISECT_BELOW: Final = 8
"""Batches this small that fail the columnar checks go row by row."""
_DIMS_OPTIONS: Final = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
"""As `layout.dims_key`, but anything that is not plain JSON raises (and takes the exact path)."""


class _Unsure(Exception):
    """The columnar checks cannot accept this batch as a whole."""


@dataclass(frozen=True, slots=True)
class KpiChunk:
    """Accepted KPI results as a table (`KPI_RESULTS_SCHEMA`, in arrival order), with each row's
    fingerprint and partition, and its position among the parsed payloads."""

    table: pa.Table
    fingerprints: list[bytes]
    partitions: list[Partition]
    positions: list[int]

    def __len__(self) -> int:
        return len(self.fingerprints)


@dataclass(frozen=True, slots=True)
class KpiParse:
    chunks: list[KpiChunk]
    rejected: list[tuple[int, str]]
    """(position among the payloads, reason) of each payload that can never be archived."""


def parse_kpi_results(payloads: Sequence[Mapping[str, Any]]) -> KpiParse:
    """Validate a batch of stored-KPI-result payloads (the rules of `parse_kpi_result`)."""
    parsed = KpiParse([], [])
    _parse_into(payloads, 0, parsed)
    return parsed


def _parse_into(payloads: Sequence[Mapping[str, Any]], offset: int, out: KpiParse) -> None:
    if not payloads:
        return
    if len(payloads) >= _BISECT_BELOW:
        try:
            out.chunks.append(_columnar(payloads, offset))
            return
        except _Unsure:
            half = len(payloads) // 2
            _parse_into(payloads[:half], offset, out)
            _parse_into(payloads[half:], offset + half, out)
            return
    rows: list[KpiRow] = []
    positions: list[int] = []
    for index, payload in enumerate(payloads, start=offset):
        try:
            rows.append(parse_kpi_result(payload))
        except PayloadError as exc:
            out.rejected.append((index, str(exc)))
            continue
        positions.append(index)
    if rows:
        out.chunks.append(chunk_of_rows(rows, positions))


def chunk_of_rows(rows: Sequence[KpiRow], positions: list[int]) -> KpiChunk:
    """A chunk from rows parsed one by one."""
    return KpiChunk(
        kpi_rows_table(rows),
        [r.fingerprint for r in rows],
        [(r.kpi_code, r.day) for r in rows],
        positions,
    )


# -- the columnar path -----------------------------------------------------------------------
def _columnar(payloads: Sequence[Mapping[str, Any]], offset: int) -> KpiChunk:
    try:  # a missing field fails the checks below anyway (None is never a valid value)
        codes, starts, ends, computed, raw_values, raw_counts, raw_versions = (
            list(map(field, payloads)) for field in _REQUIRED
        )
    except KeyError:
        raise _Unsure from None
    raw_dims = [p.get("dimensions", _EMPTY) for p in payloads]

    code_array = _dictionary(codes, str)
    for code in code_array.dictionary.to_pylist():
        if not 0 < len(code) <= MAX_KPI_CODE:
            raise _Unsure
    start_index = _dictionary(starts, str)
    start_us_of = _times(start_index.dictionary)
    start_us = start_us_of.take(start_index.indices)
    end_us = _times_of(ends)
    if not pc.all(pc.greater(end_us, start_us)).as_py():
        raise _Unsure
    computed_us = _times_of(computed)

    _only(raw_values, float, int)
    try:
        values = pa.array(raw_values, pa.float64())
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        raise _Unsure from None
    counts = _integers(raw_counts, 0, 2**63)
    versions = _integers(raw_versions, 0, _INT32)

    _only(raw_dims, dict)
    try:
        dims_texts = [orjson.dumps(d, option=_DIMS_OPTIONS) for d in raw_dims]
    except TypeError:
        raise _Unsure from None
    dims_index = pa.array(dims_texts, pa.binary()).dictionary_encode()
    distinct_dims = dims_index.dictionary.to_pylist()
    _no_hidden_nan(raw_dims, distinct_dims, dims_index.indices)
    dims_keys, dims_maps = _dimensions(distinct_dims)

    # partitions: (kpi_code, date of window_start), one tuple object per distinct pair
    days = [utc_day(us) for us in start_us_of.to_pylist()]
    day_codes = pc.add(
        pc.multiply(code_array.indices.cast(pa.int64()), len(days)),
        start_index.indices.cast(pa.int64()),
    )
    names = code_array.dictionary.to_pylist()
    pair_index = day_codes.dictionary_encode()
    distinct = [
        (names[pair // len(days)], days[pair % len(days)])
        for pair in pair_index.dictionary.to_pylist()
    ]
    partitions: list[Partition] = list(map(distinct.__getitem__, pair_index.indices.to_pylist()))

    row_keys = dims_keys.take(dims_index.indices)
    row_codes = code_array.dictionary.take(code_array.indices)
    fingerprints = _fingerprints(
        codes=row_codes,
        starts=start_us,
        ends=end_us,
        dims=row_keys,
        values=values,
        counts=counts,
        versions=versions,
    )
    table = pa.table(
        {
            "kpi_code": row_codes,
            "window_start": start_us.cast(TS),
            "window_end": end_us.cast(TS),
            "dims_key": row_keys,
            "dimensions": dims_maps.take(dims_index.indices),
            "value": nan_to_null(values),
            "sample_count": counts,
            "definition_version": versions.cast(pa.int32()),
            "computed_at": computed_us.cast(TS),
        },
        schema=KPI_RESULTS_SCHEMA,
    )
    return KpiChunk(table, fingerprints, partitions, list(range(offset, offset + len(payloads))))


_EMPTY: Final[Mapping[str, Any]] = {}
_REQUIRED: Final = tuple(
    map(
        itemgetter,
        (
            "kpi_code",
            "window_start",
            "window_end",
            "computed_at",
            "value",
            "sample_count",
            "definition_version",
        ),
    )
)


def _only(column: list[Any], *types: type) -> None:
    """Every value is exactly one of `types` (no subclasses: `bool` is not an `int` here)."""
    if not set(map(type, column)).issubset(types):
        raise _Unsure


def _dictionary(column: list[Any], kind: type) -> pa.DictionaryArray:
    _only(column, kind)
    try:
        return pa.array(column, pa.string()).dictionary_encode()
    except (pa.ArrowException, UnicodeError):  # e.g. a lone surrogate
        raise _Unsure from None


def _times_of(column: list[Any]) -> pa.Array:
    index = _dictionary(column, str)
    return _times(index.dictionary).take(index.indices)


def _times(texts: pa.Array) -> pa.Array:
    """Epoch microseconds of distinct ISO 8601 texts, each accepted by both the protocol's model
    and `datetime.fromisoformat` (as `parse_kpi_result` requires)."""
    out = [_valid_time_us(text) for text in texts.to_pylist()]
    if None in out:
        raise _Unsure
    return pa.array(out, pa.int64())


_DATETIME: Final = TypeAdapter(datetime)
_DIMENSIONS: Final = TypeAdapter(dict[str, DimensionValue])


@functools.lru_cache(maxsize=8192)
def _valid_time_us(text: str) -> int | None:
    us = iso_us(text)
    if us is None:
        return None
    try:
        _DATETIME.validate_python(text)
    except ValidationError:
        return None
    return us


def _integers(column: list[Any], low: int, high: int) -> pa.Array:
    """Exact ints in [low, high) as int64."""
    _only(column, int)
    try:
        array = pa.array(column, pa.int64())
    except (pa.ArrowException, OverflowError):
        raise _Unsure from None
    bounds = pc.min_max(array).as_py()
    if bounds["min"] < low or bounds["max"] >= high:
        raise _Unsure
    return array


def _no_hidden_nan(dims: list[Any], distinct: list[bytes], indices: pa.Array) -> None:
    """JSON text cannot tell a NaN or infinite dimension value (a Python float, never off the
    wire) from null, yet the per-row path stores them differently: such rows take that path."""
    with_null = [code for code, text in enumerate(distinct) if b"null" in text]
    if not with_null:
        return
    rows = pc.indices_nonzero(pc.is_in(indices, pa.array(with_null, indices.type)))
    for row in rows.to_pylist():
        if any(type(v) is float and not math.isfinite(v) for v in dims[row].values()):
            raise _Unsure


def _dimensions(texts: list[bytes]) -> tuple[pa.Array, pa.Array]:
    """(`dims_key`, `dimensions` map) of each distinct canonical dimensions JSON."""
    keys: list[str] = []
    maps: list[list[tuple[str, str | None]]] = []
    for text in texts:
        dims = orjson.loads(text)
        try:
            _DIMENSIONS.validate_python(dims)
        except ValidationError:
            raise _Unsure from None
        if any(isinstance(v, dict | list) for v in dims.values()):
            raise _Unsure
        keys.append(text.decode())
        maps.append([(str(k), dimension_text(v)) for k, v in sorted(dims.items())])
    return pa.array(keys, pa.string()), pa.array(maps, KPI_RESULTS_SCHEMA.field("dimensions").type)


def _fingerprints(
    *,
    codes: pa.Array,
    starts: pa.Array,
    ends: pa.Array,
    dims: pa.Array,
    values: pa.Array,
    counts: pa.Array,
    versions: pa.Array,
) -> list[bytes]:
    """`layout.result_fingerprint` of every row, the same bytes: Arrow joins the text of the
    fields (numbers as decimal text, the value spelled by Python's `repr` as there), then one
    digest per row."""
    text = pa.string()
    joined = pc.binary_join_element_wise(
        codes,
        starts.cast(text),
        ends.cast(text),
        dims,
        pa.array(list(map(repr, values.to_pylist())), text),
        counts.cast(text),
        versions.cast(text),
        "\x1f",
    )
    rows = joined.cast(pa.binary()).to_pylist()
    return list(map(_DIGEST, map(_BLAKE2B, rows)))


_BLAKE2B: Final = functools.partial(hashlib.blake2b, digest_size=FINGERPRINT_BYTES)
_DIGEST: Final = methodcaller("digest")
