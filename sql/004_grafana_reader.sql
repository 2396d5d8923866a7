-- A read-only role for Grafana's PostgreSQL datasource (grafana/provisioning/datasources/).
--
-- No password here: `flead up` creates the role beforehand as the administrator and sets its
-- password (FLEAD_GRAFANA_DB_PASSWORD, else generated into <state>/secrets/grafana_db_password)
-- and its statement timeout (flead.db.provision). Databases where an earlier version of this
-- file was applied got the role with a development password; `flead up` replaces it.
--
-- Roles are cluster-wide and this migration runs once in every database of the server (the
-- application database, each test database...): the role is created only when missing (also
-- when another database's migration creates it at the same moment), and the grants are made in
-- the current database, whatever its name.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'flead_grafana') THEN
        BEGIN
            -- Reached only where flead.db.provision did not run (no administrator): the role
            -- can log in once an administrator gives it a password.
            CREATE ROLE flead_grafana LOGIN
                NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION;
            -- A second guard: even a privilege granted by mistake cannot be used to write
            -- (a session would have to switch it off explicitly).
            ALTER ROLE flead_grafana SET default_transaction_read_only = on;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created concurrently by the migration of another database
            WHEN insufficient_privilege THEN
                RAISE EXCEPTION 'creating the role flead_grafana needs CREATEROLE'
                    USING HINT = 'run `flead up` with the administrator''s credentials'
                                 ' (FLEAD_DATABASE_ADMIN_URL), or create it once as an'
                                 ' administrator: CREATE ROLE flead_grafana LOGIN; then apply'
                                 ' the migrations again';
        END;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO flead_grafana', current_database());
END
$$;

GRANT USAGE ON SCHEMA public TO flead_grafana;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO flead_grafana;
-- Tables that later migrations create (as the role applying them) are readable too.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO flead_grafana;
