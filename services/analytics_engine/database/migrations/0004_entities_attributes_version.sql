-- entities.attributes_version: the version of the event whose attributes the row holds, apart
-- from the row's `version` (its newest event, which sets `active` and the deactivation fields).
-- A deactivation keeps the attributes it finds, so a row deactivated at version 3 may hold the
-- attributes of version 1 while the update of version 2 is still on its way (deactivations
-- travel on their own stream and writers commit in any order): that update must still set the
-- attributes, though it is older than the row. A created/updated event sets them when its
-- version is above `attributes_version`. -1: no created/updated event applied yet (the row was
-- made by its deactivation). The default serves rows inserted by hand; the writer always sets it.
ALTER TABLE entities ADD COLUMN attributes_version bigint NOT NULL DEFAULT -1;

-- Existing rows. An active row holds its own version's attributes: exact. A deactivated row's
-- are of its version or an older one, which only its events could tell (retention may have
-- deleted them; scanning them here would hold the start up for as long as a full read of
-- entity_events): taken as the row's version, so an older update arriving after the upgrade
-- leaves them, as it did before. One pass over `entities`, none over `entity_events`.
UPDATE entities SET attributes_version = version;
