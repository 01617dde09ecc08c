"""Calculation Engine: the `StreamProcessor` feeding the pure `KPIEngine` from the entity event
streams, checkpointing it to Redis, publishing closed windows on `kpi.calculated` and
`kpi.calculated.{kpi_code}`; query KPIs, backfills of new definitions, and the HTTP API."""
