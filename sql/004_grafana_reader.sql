-- A read-only role for Grafana's PostgreSQL datasource (grafana/provisioning/datasources/).
--
-- The password 'flead_grafana' is for local development only. Anywhere else change it outside
-- this file, e.g. `ALTER ROLE flead_grafana PASSWORD '...'` as an administrator, and give Grafana
-- the new one through FLEAD_GRAFANA_DB_PASSWORD; this migration never resets an existing role.
--
-- Roles are cluster-wide and this migration runs once in every database of the server (the
-- application database, each test database...): the role is created only when missing (also
-- when another database's migration creates it at the same moment), and the grants are made in
-- the current database, whatever its name.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'flead_grafana') THEN
        BEGIN
            CREATE ROLE flead_grafana LOGIN PASSWORD 'flead_grafana'
                NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
            -- A second guard: even a privilege granted by mistake cannot be used to write
            -- (a session would have to switch it off explicitly).
            ALTER ROLE flead_grafana SET default_transaction_read_only = on;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created concurrently by the migration of another database
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'creating the role flead_grafana needs CREATEROLE'
                    USING HINT = 'create it once as an administrator: CREATE ROLE flead_grafana '
                                 'LOGIN PASSWORD ''...''; then apply the migrations again';
        END;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO flead_grafana', current_database());
END
$$;

GRANT USAGE ON SCHEMA public TO flead_grafana;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO flead_grafana;
-- Tables that later migrations create (as the role applying them) are readable too.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO flead_grafana;
