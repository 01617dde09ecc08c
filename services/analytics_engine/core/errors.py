"""The core's exception hierarchy; adapters wrap library errors into these with `from`."""

from __future__ import annotations


class AnalyticsError(Exception):
    """Base of every error the platform raises on purpose."""


class RequestError(AnalyticsError):
    """A request/reply call failed."""

    code = "request_failed"


class RequestTimeout(RequestError):
    code = "timeout"


class NoResponder(RequestError):
    """Nobody listens on the request channel: the responder service is down."""

    code = "no_responder"


class RemoteError(RequestError):
    """The responder answered with an error reply."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or "remote_error"
        self.message = message


class HandlerError(AnalyticsError):
    """Raised by a request handler to answer with a clean error reply (no stack trace logged)."""

    def __init__(self, message: str, *, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TransientError(AnalyticsError):
    """A dependency is unavailable for now (database down, S3 unreachable).

    Raised by event handlers to ask the bus to back off and retry the same batch later, without
    counting the attempt towards dead-lettering: an outage must never dead-letter good events.
    """


class InvalidEvent(AnalyticsError):
    """Raised by an event handler for an event that can never be handled (its payload breaks
    the protocol): the bus dead-letters it at once, with this message as the reason, and goes
    on with the rest of the batch."""


def describe_error(exc: BaseException, *, limit: int = 500) -> str:
    """`Type: message` of an exception, short enough for a dead letter or a log line."""
    return f"{type(exc).__name__}: {str(exc)[:limit]}"
