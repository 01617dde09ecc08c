"""Prometheus metrics of the core (bus, request/reply), one registry per service runtime.

Names follow Prometheus conventions: `_total` counters, `_seconds` histograms, base units,
labels of low cardinality (channel, group, request type, outcome).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class CoreMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.published = Counter(
            "analytics_bus_messages_published", "Events published", ["channel"], registry=r
        )
        self.consumed = Counter(
            "analytics_bus_messages_consumed",
            "Events handled and acknowledged",
            ["channel", "group"],
            registry=r,
        )
        self.handler_seconds = Histogram(
            "analytics_bus_handler_duration_seconds",
            "Time to handle one batch of events",
            ["channel"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.handler_errors = Counter(
            "analytics_bus_handler_errors", "Handler failures", ["channel"], registry=r
        )
        self.dead_letters = Counter(
            "analytics_bus_dead_letters",
            "Messages sent to a dead-letter stream",
            ["channel", "reason"],
            registry=r,
        )
        self.publish_wait_seconds = Counter(
            "analytics_bus_publish_wait_seconds",
            "Time publishers waited for room in a full stream (backpressure: its readers are "
            "down or behind)",
            ["channel"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "analytics_bus_consumer_lag_messages",
            "Entries not yet delivered to the consumer group",
            ["channel", "group"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "analytics_request_duration_seconds",
            "Request/reply round trip seen by the caller",
            ["channel", "request_type", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests_handled = Counter(
            "analytics_requests_handled",
            "Requests handled by this responder",
            ["channel", "request_type", "outcome"],
            registry=r,
        )
        self.handle_seconds = Histogram(
            "analytics_request_handle_duration_seconds",
            "Time a responder spends executing one request",
            ["channel", "request_type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
