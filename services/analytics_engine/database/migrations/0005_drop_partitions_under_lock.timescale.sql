-- TimescaleDB has no day partitions of its own making: its
-- ae_drop_empty_entity_events_partitions stays the no-op of 0002 (see the postgres variant).
SELECT 1;
