-- FLEAD's tables (DESIGN §3). Names and columns of the original system are kept; columns are
-- only ever added. Natural keys make every write an idempotent upsert, so a replay or restart
-- never duplicates a row.

CREATE TABLE IF NOT EXISTS local_models (
    device_id         text             NOT NULL,
    model_version     integer          NOT NULL,  -- the device's own round counter
    global_version    integer          NOT NULL DEFAULT 0,  -- the global model the round started from
    accuracy          double precision,           -- training accuracy of the round (not held-out)
    loss              double precision,
    samples_processed integer          NOT NULL,
    weights           double precision[] NOT NULL,
    bias              double precision NOT NULL DEFAULT 0,
    aggregated_into   integer,                    -- the global version built from this update
    created_at        timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, model_version)
);
CREATE INDEX IF NOT EXISTS local_models_created_at ON local_models (created_at);
CREATE INDEX IF NOT EXISTS local_models_aggregated_into ON local_models (aggregated_into);

CREATE TABLE IF NOT EXISTS federated_models (
    global_version    integer          PRIMARY KEY,
    aggregation_round integer          NOT NULL,
    num_devices       integer          NOT NULL,
    accuracy          double precision,           -- mean training accuracy of the updates
    weights           double precision[] NOT NULL,
    bias              double precision NOT NULL,
    strategy          text             NOT NULL,
    created_at        timestamptz      NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS federated_models_created_at ON federated_models (created_at);

CREATE TABLE IF NOT EXISTS anomalies (
    device_id  text             NOT NULL,
    value      double precision NOT NULL,
    z_score    double precision NOT NULL,
    severity   text             NOT NULL CHECK (severity IN ('warning', 'critical')),
    timestamp  timestamptz      NOT NULL,
    created_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, timestamp)
);
CREATE INDEX IF NOT EXISTS anomalies_timestamp ON anomalies (timestamp);

-- Per-sample scores of a global version on held-out readings (as the original system kept).
CREATE TABLE IF NOT EXISTS model_evaluations (
    model_version     integer          NOT NULL,  -- the global version evaluated
    device_id         text             NOT NULL,
    reading_timestamp timestamptz      NOT NULL,
    prediction        smallint         NOT NULL,
    actual_result     smallint         NOT NULL,
    is_correct        boolean          NOT NULL,
    confidence        double precision NOT NULL,
    created_at        timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (model_version, device_id, reading_timestamp)
);
CREATE INDEX IF NOT EXISTS model_evaluations_reading_timestamp
    ON model_evaluations (reading_timestamp);

CREATE TABLE IF NOT EXISTS model_evaluation_summaries (
    model_version     integer          PRIMARY KEY,
    samples           integer          NOT NULL,
    tp                integer          NOT NULL,
    fp                integer          NOT NULL,
    tn                integer          NOT NULL,
    fn                integer          NOT NULL,
    accuracy          double precision NOT NULL,
    precision         double precision NOT NULL,
    recall            double precision NOT NULL,
    f1                double precision NOT NULL,
    baseline_accuracy double precision NOT NULL,  -- always predicting the majority class
    created_at        timestamptz      NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS hourly_device_analytics (
    device_id    text             NOT NULL,
    hour         timestamptz      NOT NULL,
    readings     bigint           NOT NULL,
    mean         double precision,
    std          double precision,
    min          double precision,
    max          double precision,
    anomaly_rate double precision,  -- share of labelled anomalies in the hour
    created_at   timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, hour)
);
CREATE INDEX IF NOT EXISTS hourly_device_analytics_hour ON hourly_device_analytics (hour);

CREATE TABLE IF NOT EXISTS accuracy_reports (
    model_version     integer          PRIMARY KEY,
    samples           integer          NOT NULL,
    accuracy          double precision NOT NULL,
    precision         double precision NOT NULL,
    recall            double precision NOT NULL,
    f1                double precision NOT NULL,
    baseline_accuracy double precision NOT NULL,
    created_at        timestamptz      NOT NULL DEFAULT now()
);
