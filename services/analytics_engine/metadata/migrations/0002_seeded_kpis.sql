-- The spec each KPI_DEFINITIONS_DIR definition had when it was last applied: a start applies a
-- file's definition again only once the file says something else, so edits and deletions made
-- through the API since then survive restarts.
CREATE TABLE seeded_kpis (
    code       text PRIMARY KEY,
    spec       jsonb NOT NULL,
    seeded_at  timestamptz NOT NULL DEFAULT now()
);
