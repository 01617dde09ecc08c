-- Metadata service schema: current definitions (soft-deleted, versioned), full history, and the
-- transactional outbox of `metadata.changed` events.

CREATE TABLE entity_types (
    entity_type text PRIMARY KEY,
    version     integer NOT NULL CHECK (version >= 0),
    spec        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);

CREATE TABLE entity_type_history (
    entity_type text NOT NULL,
    version     integer NOT NULL,
    spec        jsonb NOT NULL,
    action      text NOT NULL CHECK (action IN ('created', 'updated', 'deleted')),
    changed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entity_type, version)
);

CREATE TABLE kpi_definitions (
    code        text PRIMARY KEY,
    version     integer NOT NULL CHECK (version >= 0),
    spec        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);

-- Entity-type changes re-check the KPIs built on that type.
CREATE INDEX kpi_definitions_entity_type_idx
    ON kpi_definitions ((spec ->> 'entity_type'))
    WHERE deleted_at IS NULL;

CREATE TABLE kpi_definition_history (
    code        text NOT NULL,
    version     integer NOT NULL,
    spec        jsonb NOT NULL,
    action      text NOT NULL CHECK (action IN ('created', 'updated', 'deleted')),
    changed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (code, version)
);

-- Written in the same transaction as the change; a relay publishes and deletes the rows, so a
-- crash between commit and publish delays the event instead of losing it.
CREATE TABLE metadata_outbox (
    id          bigserial PRIMARY KEY,
    event_id    uuid NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
