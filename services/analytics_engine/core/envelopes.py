"""Message envelopes exactly as the architecture document shows them (pydantic v2, JSON)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class Event(BaseModel):
    """A fire-and-forget event; `event_type` is the channel it was published on."""

    model_config = ConfigDict(extra="allow", frozen=True)

    event_id: str = Field(default_factory=new_id, min_length=1, max_length=200)
    event_type: str = Field(min_length=1, max_length=200)
    source: str = Field(min_length=1, max_length=200)
    timestamp: datetime = Field(default_factory=utcnow)
    payload: dict[str, Any] = Field(default_factory=dict)


class Request(BaseModel):
    """A request on a request channel; the reply goes to `reply_to`.

    `deadline` is our extension: the caller's absolute timeout. A responder does not start work
    on a request past its deadline, since nobody is waiting for the answer any more.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    correlation_id: str = Field(min_length=1, max_length=200)
    reply_to: str = Field(min_length=1, max_length=300)
    request_type: str = Field(min_length=1, max_length=200)
    source: str = Field(min_length=1, max_length=200)
    timestamp: datetime = Field(default_factory=utcnow)
    payload: dict[str, Any] = Field(default_factory=dict)
    deadline: datetime | None = None


class Response(BaseModel):
    """A reply: exactly one of `payload` or `error`.

    `error` is the spec's human-readable message; `error_code` (our extension) lets clients map
    the failure to a typed exception without parsing text.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    correlation_id: str
    source: str
    timestamp: datetime = Field(default_factory=utcnow)
    payload: dict[str, Any] | None = None
    error: str | None = None
    error_code: str | None = None

    @model_validator(mode="after")
    def _one_of_payload_or_error(self) -> Response:
        if (self.payload is None) == (self.error is None):
            raise ValueError("a response carries exactly one of payload or error")
        return self


def dumps(model: BaseModel) -> bytes:
    """Serialize an envelope; `None` extension fields are left out so messages stay spec-shaped."""
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))


def validation_summary(exc: ValidationError, *, limit: int = 5) -> str:
    """`field: message` pairs of a validation error, short enough for a reply or a log line."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}"
        for e in exc.errors()[:limit]
    )


class MalformedMessage(ValueError):
    """A message that is not a valid envelope; the text says which field is wrong."""


_EVENT_TEXT_FIELDS = ("event_id", "event_type", "source")


def parse_event(raw: bytes) -> Event:
    """Parse an event from the bus: the same rules as `Event`, checked by hand.

    This is the consume hot path (every delivery of every consumer); pydantic's full validation
    cost more than the rest of a consumer's per-event work, so the checks are done directly and
    the model is built with `model_construct`.
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedMessage("message: not a JSON object")
    for name in _EVENT_TEXT_FIELDS:
        value = data.get(name)
        if not isinstance(value, str) or not 0 < len(value) <= 200:
            raise MalformedMessage(f"{name}: must be a string of 1 to 200 characters")
    payload = data.get("payload", {})
    if not isinstance(payload, dict):
        raise MalformedMessage("payload: must be an object")
    timestamp = data.get("timestamp")
    try:
        when = datetime.fromisoformat(timestamp) if isinstance(timestamp, str) else None
    except ValueError:
        when = None
    if when is None:
        raise MalformedMessage("timestamp: must be an ISO 8601 date-time")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    data["timestamp"] = when
    data["payload"] = payload
    return Event.model_construct(**data)
