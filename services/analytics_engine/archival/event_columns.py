"""`archival.events` rows -> an Arrow table, column by column (pure, no I/O).

The fast path of `tables.events_table`: building the table row by row in Python cost more than
writing it to Parquet. This path accepts only rows in the shape the database sends (each field of
its own type or null, times as ISO 8601 with seconds and a zone offset, event ids distinct) and
lets Arrow convert whole columns; for anything else it returns None and the row-by-row builder
decides (the same table, or the `PayloadError` that names the bad row).
"""

from __future__ import annotations

from typing import Any, Final

import orjson
import pyarrow as pa
import pyarrow.compute as pc

TEXT_FIELDS: Final = ("event_kind", "entity_type", "entity_id", "reason", "source")
TIME_FIELDS: Final = ("occurred_at", "published_at")
ISO_WITH_ZONE: Final = (
    r"^[12]\d{3}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)$"
)
"""Times Arrow and `datetime.fromisoformat` read alike (Arrow rejects what does not exist, such
as Feb 30 or 24:00, and the row path then names it)."""


def events_columns(rows: list[Any], schema: pa.Schema) -> pa.Table | None:
    """The table of `rows` (in `schema`, the entity-events schema), or None when a row is not
    in the plain shape this path handles."""
    if not _only(rows, dict):
        return None
    ids = [row.get("event_id") for row in rows]
    if not _only(ids, str) or len(set(ids)) != len(ids):
        return None  # the row path drops repeated ids (first kept) or names the bad one
    try:
        columns: dict[str, pa.Array] = {"event_id": pa.array(ids, pa.string())}
        if rows and pc.min(pc.utf8_length(columns["event_id"])).as_py() == 0:
            return None
        for field in TEXT_FIELDS:
            values = [row.get(field) for row in rows]
            if not _only(values, str, type(None)):
                return None
            columns[field] = pa.array(values, pa.string())
        versions = [row.get("version") for row in rows]
        if not _only(versions, int, type(None)):
            return None
        columns["version"] = pa.array(versions, pa.int64())
        for field in TIME_FIELDS:
            times = _times([row.get(field) for row in rows], schema.field(field).type)
            if times is None:
                return None
            columns[field] = times
        attributes = _attributes([row.get("attributes") for row in rows])
        if attributes is None:
            return None
        columns["attributes"] = attributes
    except (pa.ArrowException, OverflowError, UnicodeError, TypeError):
        return None
    return pa.table([columns[name] for name in schema.names], schema=schema)


def _only(values: list[Any], *types: type) -> bool:
    """Every value is exactly one of `types` (no subclasses: `bool` is not an `int` here)."""
    return set(map(type, values)).issubset(types)


def _times(values: list[Any], target: pa.DataType) -> pa.Array | None:
    if not _only(values, str, type(None)):
        return None
    texts = pa.array(values, pa.string())
    if not pc.all(pc.match_substring_regex(texts, ISO_WITH_ZONE)).as_py():
        return None
    return texts.cast(target)


def _attributes(values: list[Any]) -> pa.Array | None:
    """JSON text as sent, or objects as canonical JSON text (sorted keys), as the row path."""
    kinds = set(map(type, values))
    if not kinds.issubset((str, dict, type(None))):
        return None
    if dict in kinds:
        values = [
            orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode() if type(v) is dict else v
            for v in values
        ]
    return pa.array(values, pa.string())
