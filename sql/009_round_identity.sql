-- A local round is identified by (device_id, state_since_ms, model_version): a device whose keyed
-- state expired (silent longer than device_state_ttl_s), or any device after a fresh job, numbers
-- its rounds from 1 again; state_since_ms (event time of the first reading that state held) tells
-- the new rounds from replays of the old ones. 0 for rounds from before the field existed.
ALTER TABLE local_models ADD COLUMN IF NOT EXISTS state_since_ms bigint NOT NULL DEFAULT 0;
ALTER TABLE local_models DROP CONSTRAINT IF EXISTS local_models_pkey;
ALTER TABLE local_models ADD PRIMARY KEY (device_id, state_since_ms, model_version);
