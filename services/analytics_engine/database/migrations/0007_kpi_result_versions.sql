-- Where each definition version of a KPI begins: the earliest window_start among its stored
-- results. A changed KPI is recomputed from a point in the past (the calculation engine's
-- backfill), and its new windows may not have the old ones' keys (another size, other groups):
-- a result of an older version starting at or after a newer version's `since` is superseded,
-- and `kpi_history` leaves it out (it stays in the table and in the lake, with its version).
-- Kept by the KPI result consumer in the transaction that stores the results.
CREATE TABLE kpi_result_versions (
    kpi_code            text        NOT NULL,
    definition_version  integer     NOT NULL,
    since               timestamptz NOT NULL,
    PRIMARY KEY (kpi_code, definition_version)
);
INSERT INTO kpi_result_versions (kpi_code, definition_version, since)
SELECT kpi_code, definition_version, min(window_start) FROM kpi_results GROUP BY 1, 2;
