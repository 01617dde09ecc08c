"""The calculation engine's own Prometheus metrics, on the runtime's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# KPICounters fields exported as `analytics_kpi_event_issues_total{issue=...}`
EVENT_ISSUES = {
    "evaluation_errors": "filter_error",
    "invalid_values": "invalid_value",
    "invalid_dimensions": "invalid_dimension",
}

FRESHNESS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)


class CalculationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.freshness = Histogram(
            "analytics_kpi_freshness_seconds",
            "Window close time (end + allowed lateness) to result published",
            ["kpi_code"],
            buckets=FRESHNESS_BUCKETS,
            registry=r,
        )
        self.late_events = Counter(
            "analytics_kpi_late_events",
            "Events that missed at least one of their windows (published after its close)",
            ["kpi_code"],
            registry=r,
        )
        self.event_issues = Counter(
            "analytics_kpi_event_issues",
            "Events of a KPI's entity type it could not use as they are, by issue: "
            "filter_error (the filter failed to evaluate: no match), invalid_value (the field "
            "is not a number: value ignored), invalid_dimension (a group_by attribute holds a "
            "list or an object: event left out)",
            ["kpi_code", "issue"],
            registry=r,
        )
        self.results = Counter(
            "analytics_kpi_results_published",
            "KPI results published on kpi.calculated",
            ["kpi_code", "origin"],
            registry=r,
        )
        self.events = Counter(
            "analytics_calc_events_processed", "Entity events fed to the KPI engine", registry=r
        )
        self.invalid_events = Counter(
            "analytics_calc_invalid_events",
            "Entity events skipped because their payload lacks what the engine needs",
            registry=r,
        )
        self.buffered = Gauge(
            "analytics_calc_reorder_buffered",
            "Events held back to merge the created/updated streams in publication order",
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "analytics_calc_checkpoint_duration_seconds",
            "Time to write one checkpoint (snapshot + acks + results in one MULTI)",
            registry=r,
        )
        self.checkpoint_bytes = Gauge(
            "analytics_calc_checkpoint_bytes", "Size of the last checkpoint", registry=r
        )
        self.backfills = Counter(
            "analytics_calc_backfills",
            "Backfills of new or changed definitions",
            ["outcome"],
            registry=r,
        )
