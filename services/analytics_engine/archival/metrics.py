"""Prometheus metrics of the archival service's lake compaction, on the runtime's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class CompactionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.passes = Counter(
            "analytics_archival_compaction_passes",
            "Compaction passes completed (this replica held the lock)",
            registry=r,
        )
        self.failures = Counter(
            "analytics_archival_compaction_failures",
            "Compaction passes or start-up resolutions that failed (S3 or Redis down, lock "
            "lost); retried at the next pass",
            registry=r,
        )
        self.files_compacted = Counter(
            "analytics_archival_compaction_files",
            "Small kpi_results objects merged and deleted",
            registry=r,
        )
        self.objects_written = Counter(
            "analytics_archival_compaction_objects_written",
            "Merged kpi_results objects written",
            registry=r,
        )
        self.rows = Counter(
            "analytics_archival_compaction_rows",
            "KPI results rewritten into merged objects",
            registry=r,
        )
