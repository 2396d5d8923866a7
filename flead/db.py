"""The application database: connections, schema migrations and row counts."""

from __future__ import annotations

from pathlib import Path

import psycopg

from flead.config import REPO_ROOT

SQL_DIR = REPO_ROOT / "sql"


def connect(url: str, **kwargs) -> psycopg.Connection:
    return psycopg.connect(url, **kwargs)


def migration_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    return sorted(sql_dir.glob("[0-9][0-9][0-9]_*.sql"))


def apply_schema(url: str, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply the migrations not applied yet, each in its own transaction; return their names.

    Migrations are recorded in ``schema_migrations`` so applying twice changes nothing, and no
    migration drops a table: schema changes keep data.
    """
    applied: list[str] = []
    with connect(url) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.commit()
        done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
        for path in migration_files(sql_dir):
            if path.name in done:
                continue
            with conn.transaction():
                conn.execute(path.read_text())
                conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (path.name,))
            applied.append(path.name)
    return applied


def table_row_counts(url: str) -> dict[str, int]:
    """Exact row counts of every table in the public schema."""
    with connect(url, connect_timeout=3) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
            )
        ]
        return {
            table: conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] for table in tables
        }
