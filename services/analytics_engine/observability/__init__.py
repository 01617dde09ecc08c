"""Observability Service: a registry of service heartbeats, simulation ticks, KPI freshness and
dead letters, served as a status API for the gateway and as Prometheus metrics."""
