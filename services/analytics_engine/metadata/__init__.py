"""Metadata Ingestion Service: versioned KPI definitions and entity types in PostgreSQL, served
over HTTP (gateway, operator) and `metadata.lookup` (request/reply), with `metadata.changed`
events published through a transactional outbox."""
