-- On TimescaleDB entity_events keeps the key and index of 0002: a hypertable with compression
-- enabled refuses key changes, and its compressed chunks are segmented by entity_type already.
-- (The PostgreSQL variant of 0003 moves entity_type into the key.) Queries work on both.
SELECT 1;
