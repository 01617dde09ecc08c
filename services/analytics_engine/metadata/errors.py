"""Outcomes of metadata operations that callers map to HTTP statuses and reply codes."""

from __future__ import annotations

from collections.abc import Sequence

from analytics_engine.core.errors import AnalyticsError, HandlerError, TransientError
from analytics_engine.kpi.definitions import FieldError


class MetadataError(AnalyticsError):
    """Base of the metadata service's expected failures."""


class NotFound(MetadataError):
    def __init__(self, what: str, key: str) -> None:
        super().__init__(f"{what} {key!r} not found")
        self.message = str(self)


class PreconditionFailed(MetadataError):
    """`If-Match` / `If-None-Match` did not hold; `current` is the stored version (None: absent)."""

    def __init__(self, message: str, current: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.current = current


class Invalid(MetadataError):
    """The definition is invalid; `errors` are field-level."""

    def __init__(self, message: str, errors: Sequence[FieldError]) -> None:
        super().__init__(f"{message}: " + "; ".join(f"{e.field}: {e.message}" for e in errors))
        self.message = message
        self.errors = list(errors)


class Conflict(MetadataError):
    """The change is valid on its own but contradicts stored definitions (e.g. deleting an
    entity type that KPIs still use)."""

    def __init__(self, message: str, errors: Sequence[FieldError] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.errors = list(errors)


class BadInput(MetadataError, HandlerError):
    """Text the store cannot hold (a NUL character): the client's mistake, HTTP 400 and the
    request/reply code `bad_request`."""

    def __init__(self, message: str) -> None:
        HandlerError.__init__(self, message, code="bad_request")


class StoreUnavailable(TransientError):
    """PostgreSQL is unreachable or the schema is not migrated yet; retry later."""
