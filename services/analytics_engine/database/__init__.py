"""Database Service: stores entity events, entity state and KPI results in PostgreSQL
(TimescaleDB when available), answers read queries, runs retention via the archival service
and replays history to stream subscribers. See README.md in this package."""
