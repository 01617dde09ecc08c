-- entity_events on plain PostgreSQL: native daily range partitions on occurred_at (UTC days),
-- created ahead by the service and on demand, plus a default partition for anything else.

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
) PARTITION BY RANGE (occurred_at);

CREATE TABLE entity_events_default PARTITION OF entity_events DEFAULT;

CREATE INDEX entity_events_occurred_brin ON entity_events USING brin (occurred_at);
-- replay of one entity type in time order, and archival batches (one type per batch)
CREATE INDEX entity_events_type_time_idx
    ON entity_events (entity_type, occurred_at, published_at, event_id);

-- Create the partition of one UTC day if missing. Rows of that day already in the default
-- partition are moved into it first (PostgreSQL refuses to attach over them otherwise).
-- Serialised by an advisory lock so replicas never race. Returns true if it created one.
CREATE FUNCTION ae_ensure_entity_events_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := 'entity_events_p' || to_char(day, 'YYYYMMDD');
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('ae_entity_events_partitions'));
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE entity_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   part);
    EXECUTE format('WITH moved AS (DELETE FROM entity_events_default
                                   WHERE occurred_at >= %L AND occurred_at < %L RETURNING *)
                    INSERT INTO %I SELECT * FROM moved', lo, hi, part);
    EXECUTE format('ALTER TABLE entity_events ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   part, lo, hi);
    RETURN true;
END $$;

-- Drop day partitions entirely before `cutoff` that are empty (their rows were archived).
CREATE FUNCTION ae_drop_empty_entity_events_partitions(cutoff timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    part record;
    dropped integer := 0;
    is_empty boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('ae_entity_events_partitions'));
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'entity_events'::regclass AND c.relname ~ '^entity_events_p[0-9]{8}$'
          AND (to_date(substr(c.relname, 16), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
              <= cutoff
    LOOP
        EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM %I)', part.relname) INTO is_empty;
        IF is_empty THEN
            EXECUTE format('DROP TABLE %I', part.relname);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    RETURN dropped;
END $$;

-- Epoch-aligned time buckets (TimescaleDB's time_bucket on the Timescale variant).
CREATE FUNCTION ae_time_bucket(width interval, ts timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN date_bin(width, ts, TIMESTAMPTZ '1970-01-01 00:00:00+00');
