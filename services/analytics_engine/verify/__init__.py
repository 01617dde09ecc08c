"""`analytics-engine verify`: prove the stored KPI results (and their archive) right by
recomputing them from the stored events with SQL (see docs/architecture.md, "KPI semantics")."""
