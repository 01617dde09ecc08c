"""ISO 8601 timestamps from outside (requests, payloads) read as UTC (pure)."""

from __future__ import annotations

from datetime import UTC, datetime


class BadTimestamp(ValueError):
    """`reason`: what is wrong, for the caller's own error message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_utc(text: str) -> datetime:
    """`text` as an aware UTC datetime; one without an offset is taken as UTC. Raises
    `BadTimestamp`: not ISO 8601, or a UTC time outside the years 1-9999
    (`0001-01-01T00:00:00+14:00` is in year 0 in UTC)."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise BadTimestamp("not an ISO 8601 timestamp") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise BadTimestamp("out of range: its UTC time must be in years 1-9999") from None
