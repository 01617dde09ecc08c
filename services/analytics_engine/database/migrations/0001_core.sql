-- Current entity state, KPI results and archival bookkeeping (same on PostgreSQL and TimescaleDB).

CREATE TABLE entities (
    entity_type          text        NOT NULL,
    entity_id            text        NOT NULL,
    version              bigint      NOT NULL,
    attributes           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    active               boolean     NOT NULL,
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL,
    deactivated_at       timestamptz,
    deactivation_reason  text,
    last_event_id        uuid        NOT NULL,
    PRIMARY KEY (entity_type, entity_id)
) WITH (fillfactor = 70);  -- room for HOT updates: entities are updated far more than inserted

CREATE TABLE kpi_results (
    kpi_code            text             NOT NULL,
    window_start        timestamptz      NOT NULL,
    window_end          timestamptz      NOT NULL,
    dimensions          jsonb            NOT NULL,
    dims_key            text             NOT NULL,
    value               double precision NOT NULL,
    sample_count        bigint           NOT NULL,
    definition_version  integer          NOT NULL,
    computed_at         timestamptz      NOT NULL,
    stored_at           timestamptz      NOT NULL DEFAULT now(),
    forwarded           boolean          NOT NULL DEFAULT false,
    -- bumped on every change; marking a row forwarded checks it so a newer value is never
    -- marked forwarded by a writer that published an older one
    revision            bigint           NOT NULL DEFAULT 1,
    PRIMARY KEY (kpi_code, window_start, window_end, dims_key)
);
-- latest window per KPI and group (latest_kpi_values)
CREATE INDEX kpi_results_latest_idx ON kpi_results (kpi_code, dims_key, window_end DESC);

-- One row per batch of old entity events sent to the archival service. The batch's rows are
-- named by key (occurred_at, event_id) so a re-send carries exactly the same rows, and rows are
-- deleted only when the archival service confirms the batch.
CREATE TABLE archival_batches (
    batch_id      uuid        PRIMARY KEY,
    entity_type   text        NOT NULL,
    day           date        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('pending', 'sent', 'deleted')),
    row_count     integer     NOT NULL,
    occurred_ats  timestamptz[],
    event_ids     uuid[],
    created_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,
    send_count    integer     NOT NULL DEFAULT 0,
    confirmed_at  timestamptz,
    object_key    text
);
CREATE INDEX archival_batches_open_idx ON archival_batches (created_at)
    WHERE status IN ('pending', 'sent');
