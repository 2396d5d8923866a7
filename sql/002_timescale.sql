-- TimescaleDB where the extension is available; plain PostgreSQL (with the time indexes of
-- 001) where it is not. Every hypertable's unique key contains its time column, as Timescale
-- requires. migrate_data keeps rows already stored.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        PERFORM create_hypertable('anomalies', 'timestamp',
                                  if_not_exists => TRUE, migrate_data => TRUE);
        PERFORM create_hypertable('model_evaluations', 'reading_timestamp',
                                  if_not_exists => TRUE, migrate_data => TRUE);
        PERFORM create_hypertable('hourly_device_analytics', 'hour',
                                  if_not_exists => TRUE, migrate_data => TRUE);
    ELSE
        RAISE NOTICE 'timescaledb is not available: using plain tables with time indexes';
    END IF;
END
$$;
