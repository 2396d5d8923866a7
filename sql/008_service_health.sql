-- What `flead supervise` sees of the services it keeps alive (flead/supervision.py), for
-- Grafana's alert rules (grafana/provisioning/alerting/flead-alerts.yaml): one row per service,
-- updated every supervision pass, and one row per restart.
CREATE TABLE IF NOT EXISTS service_health (
    service text PRIMARY KEY,
    pid integer,
    alive boolean NOT NULL,
    restarts integer NOT NULL DEFAULT 0,  -- since the state folder was created
    last_restart_at timestamptz,
    lag bigint,  -- messages its consumer group has not committed (streaming services)
    lag_growing boolean NOT NULL DEFAULT false,  -- rose over the whole lag window
    stalled boolean NOT NULL DEFAULT false,  -- lag > 0 and no committed progress for a while
    checked_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS service_restarts (
    id bigserial PRIMARY KEY,
    service text NOT NULL,
    restarted_at timestamptz NOT NULL DEFAULT now(),
    reason text NOT NULL DEFAULT 'died'
);
CREATE INDEX IF NOT EXISTS service_restarts_at ON service_restarts (restarted_at);
