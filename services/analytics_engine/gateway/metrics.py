"""The gateway's Prometheus metrics, on the runtime's registry (served at `/metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from analytics_engine.core.metrics import LATENCY_BUCKETS


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter(
            "analytics_gateway_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "analytics_gateway_request_duration_seconds",
            "Time to answer a request (streams excluded: they stay open)",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sse_clients = Gauge(
            "analytics_gateway_sse_clients", "Connected Server-Sent Events clients", registry=r
        )
        self.sse_results = Counter(
            "analytics_gateway_sse_results",
            "KPI results received from kpi.calculated.* for the live streams",
            registry=r,
        )
        self.rate_limited = Counter(
            "analytics_gateway_rate_limited",
            "Requests refused with 429, by key id",
            ["key_id"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "analytics_gateway_upstream_errors",
            "Upstream calls that failed, by service and outcome",
            ["service", "outcome"],
            registry=r,
        )
