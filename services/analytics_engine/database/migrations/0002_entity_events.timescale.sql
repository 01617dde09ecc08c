-- entity_events on TimescaleDB: a hypertable with daily chunks and native compression.
-- Rows are deleted by the archival flow (after the archival service confirms), so there is no
-- retention policy: dropping chunks would lose events that were never archived.

CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE entity_events (
    event_id      uuid        NOT NULL,
    event_kind    text        NOT NULL CHECK (event_kind IN ('created', 'updated', 'deactivated')),
    entity_type   text        NOT NULL,
    entity_id     text        NOT NULL,
    version       bigint      NOT NULL,
    occurred_at   timestamptz NOT NULL,
    published_at  timestamptz NOT NULL,
    attributes    jsonb,
    reason        text,
    source        text        NOT NULL,
    stored_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (occurred_at, event_id)
);
SELECT create_hypertable('entity_events', 'occurred_at', chunk_time_interval => INTERVAL '1 day');
CREATE INDEX entity_events_type_time_idx
    ON entity_events (entity_type, occurred_at, published_at, event_id);

ALTER TABLE entity_events SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'entity_type',
    timescaledb.compress_orderby = 'occurred_at, event_id'
);
SELECT add_compression_policy('entity_events', INTERVAL '2 days');

-- Chunks are created by TimescaleDB itself: the partition helpers are no-ops here.
CREATE FUNCTION ae_ensure_entity_events_partition(day date) RETURNS boolean
LANGUAGE sql AS $$ SELECT false $$;

CREATE FUNCTION ae_drop_empty_entity_events_partitions(cutoff timestamptz) RETURNS integer
LANGUAGE sql AS $$ SELECT 0 $$;

CREATE FUNCTION ae_time_bucket(width interval, ts timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN time_bucket(width, ts, TIMESTAMPTZ '1970-01-01 00:00:00+00');
