-- Least privilege (issue 8). The application role owns this database and its tables (it
-- applies these migrations) and is not a superuser; Grafana's role only reads.
--
-- Nobody but the owner creates anything here: not in the public schema (PostgreSQL < 15
-- grants that to everyone), not even temporary tables. A session of flead_grafana that switches
-- off its read-only default still cannot create or write anything.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
END
$$;

-- 004's default privileges belong to the role that applied it. On a cluster adopted from an
-- earlier FLEAD (flead.db._adopt_legacy_cluster) that was the old superuser; tables the
-- application role creates from now on are readable by Grafana too.
GRANT SELECT ON ALL TABLES IN SCHEMA public TO flead_grafana;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO flead_grafana;
