"""The shared core every service is composed from: channels, envelopes, settings, the event bus,
request/reply, the service runtime, logging and metrics."""

from analytics_engine.core import channels
from analytics_engine.core.bus import DeadLetters, Delivery, DurableConsumer, EventPublisher
from analytics_engine.core.envelopes import Event, Request, Response, new_id, utcnow
from analytics_engine.core.errors import (
    AnalyticsError,
    HandlerError,
    InvalidEvent,
    NoResponder,
    RemoteError,
    RequestError,
    RequestTimeout,
    TransientError,
)
from analytics_engine.core.logs import configure_logging
from analytics_engine.core.request_reply import RequestReplyClient, RequestReplyServer
from analytics_engine.core.runtime import ServiceRuntime
from analytics_engine.core.settings import (
    BaseServiceSettings,
    DatabaseSettings,
    S3Settings,
    load_settings,
)

__all__ = [
    "AnalyticsError",
    "BaseServiceSettings",
    "DatabaseSettings",
    "DeadLetters",
    "Delivery",
    "DurableConsumer",
    "Event",
    "EventPublisher",
    "HandlerError",
    "InvalidEvent",
    "NoResponder",
    "RemoteError",
    "Request",
    "RequestError",
    "RequestReplyClient",
    "RequestReplyServer",
    "RequestTimeout",
    "Response",
    "S3Settings",
    "ServiceRuntime",
    "TransientError",
    "channels",
    "configure_logging",
    "load_settings",
    "new_id",
    "utcnow",
]
