-- ae_drop_empty_entity_events_partitions checked a partition's emptiness with its snapshot and
-- then dropped it: a writer whose transaction had inserted into that day and not committed yet
-- was invisible to the check, DROP TABLE waited for the writer's lock, and the row the writer
-- then committed (and acknowledged) went with the partition.
--
-- Now the emptiness that decides a drop is read under locks no writer can hold at the same
-- time, with a fresh snapshot (a VOLATILE function takes one per statement under READ
-- COMMITTED, hence the isolation check):
--   1. under the partitions' advisory lock (skipped if a writer is creating one), a look
--      without table locks picks the candidates (most passes find none and lock nothing);
--   2. the parent `entity_events` in ACCESS EXCLUSIVE mode (DROP of a partition takes it and
--      the default partition's anyway; taking the parent first is the writers' order, parent
--      then partition, so the two cannot deadlock). A writer inside its batch transaction holds
--      the parent: the lock waits at most `lock_timeout`, then the pass drops nothing (the next
--      one retries). Writers queued behind the request wait no longer than that either (plus
--      the drops themselves: catalog work, the partitions are empty);
--   3. each candidate in ACCESS EXCLUSIVE mode NOWAIT (skipped if busy: read directly, say),
--      then checked again and dropped if still empty.
-- Signature and result unchanged: the number of partitions dropped.
CREATE OR REPLACE FUNCTION ae_drop_empty_entity_events_partitions(cutoff timestamptz)
RETURNS integer
LANGUAGE plpgsql
SET lock_timeout = '200ms'
AS $$
DECLARE
    part text;
    candidates text[] := '{}';
    dropped integer := 0;
    is_empty boolean;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'ae_drop_empty_entity_events_partitions needs READ COMMITTED, not %',
            current_setting('transaction_isolation');
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtext('ae_entity_events_partitions')) THEN
        RETURN 0;  -- a writer is creating a partition: the next pass
    END IF;
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'entity_events'::regclass AND c.relname ~ '^entity_events_p[0-9]{8}$'
          AND (to_date(substr(c.relname, 16), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
              <= cutoff
        ORDER BY c.relname
    LOOP
        EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM %I)', part) INTO is_empty;
        IF is_empty THEN
            candidates := candidates || part;
        END IF;
    END LOOP;
    IF cardinality(candidates) = 0 THEN
        RETURN 0;
    END IF;
    BEGIN
        LOCK TABLE ONLY entity_events IN ACCESS EXCLUSIVE MODE;
    EXCEPTION WHEN lock_not_available THEN
        RETURN 0;  -- a writer's (or reader's) transaction is open: the next pass
    END;
    FOREACH part IN ARRAY candidates LOOP
        BEGIN
            EXECUTE format('LOCK TABLE %I IN ACCESS EXCLUSIVE MODE NOWAIT', part);
            EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM %I)', part) INTO is_empty;
            IF is_empty THEN
                EXECUTE format('DROP TABLE %I', part);
                dropped := dropped + 1;
            END IF;
        EXCEPTION WHEN lock_not_available THEN
            NULL;  -- the partition (or the default one, which DROP locks too) is busy
        END;
    END LOOP;
    RETURN dropped;
END $$;
