"""Conversions between JSON values and PostgreSQL values for `execute_query` (pure).

Results: timestamps -> ISO strings, numeric -> float, uuid -> string, jsonb -> objects (decoded
by the pool's codec), bytea -> hex, intervals -> seconds. Parameters: JSON values are coerced
to the type PostgreSQL inferred for each `$n`, so `["2024-01-01T00:00:00Z"]` binds to a
timestamptz and `[42]` to a text parameter as `'42'` (always as a bound value, never spliced).
"""

from __future__ import annotations

import decimal
import ipaddress
import math
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

import orjson

from analytics_engine.core.storable import InvalidPayload, parse_timestamp

_INT_TYPES: Final = frozenset({"int2", "int4", "int8", "oid"})
_FLOAT_TYPES: Final = frozenset({"float4", "float8"})
_TEXT_TYPES: Final = frozenset({"text", "varchar", "bpchar", "name", "char", "citext", "unknown"})


def to_json_value(value: Any) -> Any:
    """A value from a result row as something JSON can carry."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else None
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    return str(value)


def row_to_json(row: Sequence[Any]) -> list[Any]:
    return [to_json_value(v) for v in row]


def coerce_param(value: Any, type_name: str, index: int) -> Any:
    """Turn the JSON value of parameter `$index` into what asyncpg encodes for `type_name`."""
    if value is None:
        return None
    where = f"params[{index - 1}] (${index}, {type_name})"
    if type_name.startswith("_"):
        if not isinstance(value, list):
            raise InvalidPayload(f"{where}: an array is required")
        return [coerce_param(v, type_name[1:], index) for v in value]
    try:
        return _coerce_scalar(value, type_name)
    except (ValueError, TypeError, decimal.InvalidOperation, InvalidPayload) as exc:
        raise InvalidPayload(f"{where}: {exc}") from None


def _coerce_scalar(value: Any, t: str) -> Any:
    if t in ("json", "jsonb"):
        return orjson.dumps(value).decode()
    if isinstance(value, dict | list):
        raise ValueError("only json/jsonb parameters take objects or arrays")
    if t in _TEXT_TYPES:
        if isinstance(value, bool):
            return "true" if value else "false"
        return value if isinstance(value, str) else str(value)
    if t == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError("a boolean is required")
    if t in _INT_TYPES:
        if isinstance(value, bool):
            raise ValueError("an integer is required")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("an integer is required")
        return int(value)
    if t in _FLOAT_TYPES:
        if isinstance(value, bool):
            raise ValueError("a number is required")
        return float(value)
    if t == "numeric":
        if isinstance(value, bool):
            raise ValueError("a number is required")
        return decimal.Decimal(str(value))
    if t == "uuid":
        return uuid.UUID(str(value))
    if t in ("timestamptz", "timestamp"):
        parsed = parse_timestamp(value, "value")
        return parsed if t == "timestamptz" else parsed.astimezone(UTC).replace(tzinfo=None)
    if t == "date":
        return date.fromisoformat(str(value))
    if t == "interval":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("an interval is given in seconds")
        return timedelta(seconds=value)
    return value
