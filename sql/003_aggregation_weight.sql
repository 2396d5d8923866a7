-- The weight each local update was given in the global version it went into
-- (samples_processed × staleness factor), so every version can be recomputed from its rows.
ALTER TABLE local_models ADD COLUMN IF NOT EXISTS aggregation_weight double precision;
