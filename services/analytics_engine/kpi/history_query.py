"""The HTTP query of a KPI's history (`start`, `end`, `limit`, `dimension.<name>` or
`dimension[<name>]`, nothing else), parsed and checked once for the gateway (the edge) and the
calculation engine's API (pure: no I/O).

Everything out of range is refused here with a field-level message, before a request is built:
a `limit` past 64 bits cannot even be encoded on the bus, and a timestamp whose UTC time falls
outside the years 1-9999 (`0001-01-01T00:00:00+14:00`) cannot be converted to UTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from analytics_engine.core.timestamps import BadTimestamp, parse_utc

HISTORY_LIMIT: Final = 10_000
"""Most rows one history request returns (the database service's `kpi_history` cap too)."""
DIMENSION_PREFIX: Final = "dimension."
HISTORY_PARAMETERS: Final = frozenset({"start", "end", "limit"})
UNKNOWN_PARAMETER: Final = (
    "unknown parameter (a typo would silently filter nothing): expected start, end, limit, "
    "dimension.<name> or dimension[<name>]"
)
_LIMIT_DIGITS: Final = 6


class InvalidHistoryQuery(ValueError):
    """`problems`: `[{field, message}]`, the `details` of a 422 answer."""

    def __init__(self, problems: list[dict[str, str]]) -> None:
        super().__init__(
            "invalid query parameters: "
            + "; ".join(f"{p['field']}: {p['message']}" for p in problems)
        )
        self.problems = problems


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    start: datetime
    """Inclusive, in UTC."""
    end: datetime
    """Exclusive, in UTC; not before `start`."""
    limit: int | None = None
    dimensions: dict[str, str] = field(default_factory=dict)


def parse_timestamp(value: str | None, name: str) -> datetime:
    """An ISO 8601 timestamp in UTC (one without an offset is taken as UTC). A `+` decoded
    as a space from an unescaped query string is read as `+`. Raises `InvalidHistoryQuery`."""
    if not value:
        raise InvalidHistoryQuery([{"field": name, "message": "required (ISO 8601 timestamp)"}])
    try:
        return parse_utc(value.replace(" ", "+"))
    except BadTimestamp as exc:
        raise InvalidHistoryQuery([{"field": name, "message": exc.reason}]) from None


def parse_limit(value: str, maximum: int = HISTORY_LIMIT) -> int:
    """`limit`: an integer from 1 to `maximum` (the gateway's entity list has its own).
    Raises `InvalidHistoryQuery`."""
    text = value.strip()
    digits = text.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):
        raise InvalidHistoryQuery([{"field": "limit", "message": "not an integer"}])
    if len(digits) > _LIMIT_DIGITS or not 1 <= int(text) <= maximum:
        raise InvalidHistoryQuery(
            [{"field": "limit", "message": f"must be between 1 and {maximum}"}]
        )
    return int(text)


def parse_history_query(query: Mapping[str, str]) -> HistoryQuery:
    """The history query, every problem reported at once. Raises `InvalidHistoryQuery`."""
    problems: list[dict[str, str]] = []
    times: dict[str, datetime] = {}
    for name in ("start", "end"):
        try:
            times[name] = parse_timestamp(query.get(name), name)
        except InvalidHistoryQuery as exc:
            problems.extend(exc.problems)
    limit: int | None = None
    if "limit" in query:
        try:
            limit = parse_limit(query["limit"])
        except InvalidHistoryQuery as exc:
            problems.extend(exc.problems)
    if len(times) == 2 and times["end"] < times["start"]:
        problems.append({"field": "end", "message": "must not be before start"})
    problems.extend(
        {"field": name, "message": UNKNOWN_PARAMETER}
        for name in query
        if name not in HISTORY_PARAMETERS and dimension_name(name) is None
    )
    if problems:
        raise InvalidHistoryQuery(problems)
    dimensions = {
        dimension: value
        for name, value in query.items()
        if (dimension := dimension_name(name)) is not None
    }
    return HistoryQuery(times["start"], times["end"], limit, dimensions)


def dimension_name(parameter: str) -> str | None:
    """The dimension a query parameter filters on: `dimension.<name>`, or `dimension[<name>]`
    (OpenAPI's deepObject style, which the gateway's OpenAPI document declares); else None."""
    if parameter.startswith(DIMENSION_PREFIX):
        name = parameter[len(DIMENSION_PREFIX) :]
    elif parameter.startswith("dimension[") and parameter.endswith("]"):
        name = parameter[len("dimension[") : -1]
    else:
        return None
    return name or None
