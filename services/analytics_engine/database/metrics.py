"""Prometheus metrics of the database service, registered on the runtime's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from analytics_engine.core.metrics import LATENCY_BUCKETS

BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10_000)


class DatabaseMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.rows_written = Counter(
            "analytics_db_rows_written",
            "Rows inserted or updated, by table",
            ["table"],
            registry=r,
        )
        self.duplicates = Counter(
            "analytics_db_duplicate_events",
            "Redelivered events that were already stored (skipped)",
            ["table"],
            registry=r,
        )
        self.batch_size = Histogram(
            "analytics_db_write_batch_size",
            "Events per write batch",
            ["table"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.write_seconds = Histogram(
            "analytics_db_write_duration_seconds",
            "Time to write one batch (one transaction)",
            ["table"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.invalid = Counter(
            "analytics_db_invalid_events",
            "Events dead-lettered because their payload failed validation",
            ["channel"],
            registry=r,
        )
        self.forwarded = Counter(
            "analytics_db_kpi_results_forwarded",
            "KPI results forwarded to archive.kpi_results",
            registry=r,
        )
        self.queries = Histogram(
            "analytics_db_query_duration_seconds",
            "execute_query / kpi_history / ... time, by request type",
            ["request_type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.archival_batches = Counter(
            "analytics_db_archival_batches",
            "Archival batches by what happened to them (sent, resent, deleted)",
            ["outcome"],
            registry=r,
        )
        self.archived_rows = Counter(
            "analytics_db_archived_rows_deleted",
            "entity_events rows deleted after the archival service confirmed them",
            registry=r,
        )
        self.replayed = Counter(
            "analytics_db_replayed_events",
            "Stored events replayed to stream subscriptions",
            registry=r,
        )
        self.subscription_controls_ignored = Counter(
            "analytics_db_subscription_controls_ignored",
            "stream.heartbeat / stream.unsubscribe naming a subscription that is not live, by "
            "channel and reason (unknown: never subscribed or its state expired; ended: a "
            "heartbeat after the subscription ended)",
            ["channel", "reason"],
            registry=r,
        )
