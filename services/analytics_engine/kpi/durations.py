"""Durations as written in KPI definitions: ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"1d"``
or an integer number of seconds. Stored as ``timedelta`` (millisecond resolution, the finest a
definition can express) and written back in the largest exact unit, so a definition survives
``model_dump(mode="json")`` -> ``model_validate`` unchanged.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Final

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = ["Duration", "format_duration", "parse_duration"]

_PATTERN: Final = re.compile(r"^\s*(\d{1,12})\s*(ms|s|m|h|d)?\s*$")
_UNITS: Final = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_MS: Final = timedelta(milliseconds=1)
_MAX_MS: Final = 3650 * _UNITS["d"]


def parse_duration(value: Any) -> timedelta:
    """Parse a duration; raises ``ValueError`` with a message fit for a form field."""
    if isinstance(value, timedelta):
        if value % _MS:
            raise ValueError("durations have millisecond resolution")
        millis = value // _MS
    elif isinstance(value, bool):
        raise ValueError("a duration is a string like '30s' or an integer number of seconds")
    elif isinstance(value, int):
        millis = value * 1000
    elif isinstance(value, float) and value.is_integer():
        millis = int(value) * 1000
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None:
            raise ValueError(
                f"invalid duration {value!r}: use <integer><unit> with unit ms, s, m, h or d "
                f"(e.g. '30s', '500ms', '5m') or an integer number of seconds"
            )
        millis = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        raise ValueError("a duration is a string like '30s' or an integer number of seconds")
    if millis < 0:
        raise ValueError("a duration cannot be negative")
    if millis > _MAX_MS:
        raise ValueError("a duration cannot exceed 3650d")
    return timedelta(milliseconds=millis)


def format_duration(value: timedelta) -> str:
    """Canonical text: the largest unit that represents ``value`` exactly (``0`` -> ``"0s"``)."""
    millis = value // _MS
    if millis == 0:
        return "0s"
    for unit in ("d", "h", "m", "s", "ms"):
        if millis % _UNITS[unit] == 0:
            return f"{millis // _UNITS[unit]}{unit}"
    raise AssertionError("unreachable")  # pragma: no cover


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^\d+(ms|s|m|h|d)?$"},
                {"type": "integer", "minimum": 0},
            ],
            "description": "duration: '500ms', '30s', '5m', '1h', '1d' or integer seconds",
        }
    ),
]
"""A pydantic field type for durations."""
