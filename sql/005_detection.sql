-- The detection learner (issue 7): anomaly records say what flagged them and why, global
-- versions carry their calibrated detectors and the server's state, and every version gets
-- prequential (test-then-train) counts from the devices that used it. Columns are added,
-- never removed: rows of the first model stay readable.

ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS score double precision;
ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS threshold double precision;
ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS model_version integer;  -- 0 = the z-score rule
ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS detector text;  -- supervised | label_free | zscore
ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS channels text[];  -- the channels that drove it
ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS reason text;

ALTER TABLE federated_models ADD COLUMN IF NOT EXISTS hidden integer;
ALTER TABLE federated_models ADD COLUMN IF NOT EXISTS threshold double precision;
ALTER TABLE federated_models ADD COLUMN IF NOT EXISTS normal_threshold double precision;
ALTER TABLE federated_models ADD COLUMN IF NOT EXISTS label_source text;
ALTER TABLE federated_models ADD COLUMN IF NOT EXISTS detector text;
-- Everything the server carries to the next version (normal-model statistics, faded score
-- histograms, detector comparison counts, momentum velocity): a restart resumes exactly.
ALTER TABLE federated_models ADD COLUMN IF NOT EXISTS server_state jsonb;

ALTER TABLE local_models ADD COLUMN IF NOT EXISTS label_source text;

-- How each version did on the readings of the devices that held it, scored before the
-- devices trained on them (reported by the devices with their next local round).
CREATE TABLE IF NOT EXISTS prequential_evaluations (
    model_version integer          PRIMARY KEY,
    tp            bigint           NOT NULL DEFAULT 0,
    fp            bigint           NOT NULL DEFAULT 0,
    tn            bigint           NOT NULL DEFAULT 0,
    fn            bigint           NOT NULL DEFAULT 0,
    updated_at    timestamptz      NOT NULL DEFAULT now()
);
CREATE OR REPLACE VIEW prequential_metrics AS
SELECT model_version, tp, fp, tn, fn, tp + fp + tn + fn AS samples,
       CASE WHEN tp + fp + tn + fn > 0 THEN (tp + tn)::double precision / (tp + fp + tn + fn) END
           AS accuracy,
       CASE WHEN tp + fp > 0 THEN tp::double precision / (tp + fp) END AS precision,
       CASE WHEN tp + fn > 0 THEN tp::double precision / (tp + fn) END AS recall,
       CASE WHEN 2 * tp + fp + fn > 0 THEN 2 * tp::double precision / (2 * tp + fp + fn) END
           AS f1,
       CASE WHEN (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn) > 0
            THEN (tp::double precision * tn - fp::double precision * fn)
                 / sqrt((tp + fp)::double precision * (tp + fn) * (tn + fp) * (tn + fn))
       END AS mcc
FROM prequential_evaluations;
GRANT SELECT ON prequential_evaluations, prequential_metrics TO flead_grafana;
