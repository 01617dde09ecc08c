-- Keys of archived events that had been stored shortly before they were archived and deleted.
-- Such an event can still come again: the writer that stored it may not have acknowledged it
-- yet (it dies, its batch is re-delivered), or its publisher sent it twice. Stored again, it
-- would be archived again, in another batch and object: the lake would hold it twice. A
-- retention pass deletes such a row instead of archiving it (the lake has it). Only events
-- stored within the window are kept here (`archival.REDELIVERY_WINDOW`), and only for as long:
-- in the steady state (events archived days after they were stored) the table stays empty.
CREATE TABLE archived_event_keys (
    entity_type  text        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    event_id     uuid        NOT NULL,
    archived_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entity_type, occurred_at, event_id)
);
CREATE INDEX archived_event_keys_archived_at_idx ON archived_event_keys (archived_at);
