-- Held-out evaluation and analytics of the detection learner (issue 7, items 1 and 3).
-- Columns are added, never removed; rows written before this migration stay readable.

-- Matthews correlation beside F1 (0 for any constant predictor, which F1 on anomaly-heavy data
-- is not), and which detector the version published (what `auto` devices decided with).
ALTER TABLE model_evaluation_summaries ADD COLUMN IF NOT EXISTS mcc double precision;
ALTER TABLE model_evaluation_summaries ADD COLUMN IF NOT EXISTS detector text;
ALTER TABLE accuracy_reports ADD COLUMN IF NOT EXISTS mcc double precision;
ALTER TABLE accuracy_reports ADD COLUMN IF NOT EXISTS detector text;
-- Per-sample: the detector's score (logit, normal-model score or max |z|) and its threshold.
ALTER TABLE model_evaluations ADD COLUMN IF NOT EXISTS score double precision;
ALTER TABLE model_evaluations ADD COLUMN IF NOT EXISTS threshold double precision;

-- Hourly analytics of multichannel readings: one row per device, channel and hour. A
-- univariate reading ("data": 42.5) is the channel 'value' (streaming.messages.SINGLE_CHANNEL),
-- which is what every row stored before this migration was.
ALTER TABLE hourly_device_analytics ADD COLUMN IF NOT EXISTS channel text NOT NULL DEFAULT 'value';
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint c JOIN pg_attribute a
          ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
        WHERE c.conrelid = 'hourly_device_analytics'::regclass AND c.contype = 'p'
          AND a.attname = 'channel'
    ) THEN
        ALTER TABLE hourly_device_analytics DROP CONSTRAINT IF EXISTS hourly_device_analytics_pkey;
        ALTER TABLE hourly_device_analytics ADD PRIMARY KEY (device_id, channel, hour);
    END IF;
END
$$;
