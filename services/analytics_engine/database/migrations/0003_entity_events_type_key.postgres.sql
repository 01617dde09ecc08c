-- entity_events keyed by (entity_type, occurred_at, event_id): one btree serves what two did.
-- The key still makes a stored event's redelivery a conflict (an event keeps its type), and in
-- type-then-time order it is also the index of replays of one type and of archival batches,
-- so the separate (entity_type, occurred_at, published_at, event_id) index goes: every event
-- paid a second btree insert for it, about 15% of PostgreSQL's time in a backlog drain.
-- (TimescaleDB keeps its 0002 layout; see the timescale variant of this migration.)

ALTER TABLE entity_events DROP CONSTRAINT entity_events_pkey;
ALTER TABLE entity_events ADD PRIMARY KEY (entity_type, occurred_at, event_id);
DROP INDEX entity_events_type_time_idx;
