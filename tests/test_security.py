"""Least privilege and secrets (issue 8 §3) against the real PostgreSQL: the application role
is an ordinary role, Grafana's role reads and nothing else, every password is generated into
0600 files or taken from the environment, and no status output or repository file shows one."""

from __future__ import annotations

import json
import os
import secrets as random
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import errors

from flead import db, secrets, services
from flead.config import REPO_ROOT, Settings, load_settings, to_env

pytestmark = pytest.mark.integration


def _as_grafana(settings: Settings, database_url: str) -> str:
    return secrets.url_with_password(
        urlsplit(database_url)
        ._replace(netloc=f"{db.GRAFANA_ROLE}@{urlsplit(database_url).netloc.rpartition('@')[2]}")
        .geturl(),
        db.grafana_password(settings),
    )


def test_grafana_role_reads_but_cannot_write_or_create(postgres: Settings, database: str) -> None:
    with psycopg.connect(database, autocommit=True) as owner:
        owner.execute(
            "INSERT INTO anomalies (device_id, value, z_score, severity, timestamp)"
            " VALUES ('d', 1, 3, 'warning', now())"
        )
    with psycopg.connect(_as_grafana(postgres, database), autocommit=True) as reader:
        assert reader.execute("SELECT count(*) FROM anomalies").fetchone() == (1,)
        assert reader.execute("SHOW statement_timeout").fetchone() == (
            postgres.grafana_statement_timeout,
        )
        assert reader.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        # Switched off, the read-only default is no guard: the privileges must refuse.
        reader.execute("SET default_transaction_read_only = off")
        for statement in (
            "INSERT INTO anomalies (device_id, value, z_score, severity, timestamp)"
            " VALUES ('e', 1, 3, 'warning', now())",
            "UPDATE anomalies SET value = 2",
            "DELETE FROM anomalies",
            "TRUNCATE anomalies",
            "CREATE TABLE grafana_table (x integer)",
            "CREATE TEMP TABLE grafana_temp (x integer)",
            "CREATE SCHEMA grafana_schema",
            "CREATE FUNCTION grafana_f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                reader.execute(statement)
        assert reader.execute("SELECT count(*) FROM anomalies").fetchone() == (1,)
        # The timeout is enforced, not only configured.
        reader.execute("SET statement_timeout = '100ms'")
        with pytest.raises(errors.QueryCanceled):
            reader.execute("SELECT pg_sleep(2)")


def test_grafana_role_cannot_reach_dagster_database(postgres: Settings) -> None:
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(_as_grafana(postgres, postgres.dagster_database_url)).close()


def test_application_role_is_not_a_superuser_and_owns_its_tables(database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        super_, createdb, createrole, bypassrls = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls FROM pg_roles"
            " WHERE rolname = current_user"
        ).fetchone()
        assert (super_, createdb, createrole, bypassrls) == (False, False, False, False)
        owners = conn.execute(
            "SELECT DISTINCT tableowner = current_user FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
        assert owners == [(True,)]
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("CREATE DATABASE flead_not_allowed")


def test_status_json_shows_no_password(postgres: Settings, database: str, tmp_path) -> None:
    """``flead status --json`` with passwords in every URL and secret file it can see: none of
    them appears in the output, and the tables are counted (so the password was used)."""
    generated = {name: random.token_urlsafe(24) for name in ("dagster", "admin", "file")}
    state = tmp_path / "state"
    secrets.secret(state, "grafana_db_password", env={"FLEAD_GRAFANA_DB_PASSWORD": ""})
    (state / "secrets" / "extra").write_text(generated["file"])
    settings_env = to_env(postgres)
    settings_env.update(
        FLEAD_DATABASE_URL=database,
        FLEAD_DAGSTER_DATABASE_URL=secrets.url_with_password(
            postgres.dagster_database_url, generated["dagster"]
        ),
        FLEAD_DATABASE_ADMIN_URL=secrets.url_with_password(
            db.admin_url(postgres), generated["admin"]
        ),
        FLEAD_STATE_DIR=str(state),
    )
    out = subprocess.run(
        [sys.executable, "-m", "flead.cli", "status", "--json"],
        env={**os.environ, **settings_env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    report = json.loads(out.stdout)  # exit status 1 = some service is down (not asserted)
    assert "local_models" in report["tables"], report["tables"]
    shown = out.stdout + out.stderr
    leaked = [
        value
        for value in (
            secrets.url_password(database),
            *generated.values(),
            secrets.secret(state, "grafana_db_password"),
        )
        if value in shown
    ]
    assert leaked == [], "passwords printed by flead status --json"
    assert report["settings"]["database_url"] == secrets.redact_url(database)
    assert ":***@" in report["settings"]["dagster_database_url"]


def test_secret_files_are_private_and_stable(tmp_path) -> None:
    first = secrets.secret(tmp_path, "db_password", env={})
    assert secrets.secret(tmp_path, "db_password", env={}) == first
    path = tmp_path / "secrets" / "db_password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # The environment wins and is never written to disk.
    assert secrets.secret(tmp_path, "other", env={"FLEAD_OTHER": "from-env"}) == "from-env"
    assert not (tmp_path / "secrets" / "other").exists()


def test_state_folder_secrets_of_the_running_server_are_0600(postgres: Settings) -> None:
    folder = secrets.secrets_dir(postgres.state_dir)
    names = [
        n
        for n in ("db_password", "db_admin_password", "grafana_db_password")
        if not os.environ.get(secrets.env_name(n))
    ]
    for name in names:
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name


def test_default_urls_and_repository_hold_no_password() -> None:
    settings = Settings()
    for url in (settings.database_url, settings.dagster_database_url):
        assert secrets.url_password(url) is None, url
    filled = load_settings(
        {"FLEAD_STATE_DIR": "/nonexistent-but-unused", "FLEAD_DB_PASSWORD": "p w"}
    )
    assert secrets.url_password(filled.database_url) == "p w"
    assert secrets.url_password(filled.dagster_database_url) == "p w"
    # No migration sets a password: passwords are set from code as the administrator.
    for path in db.migration_files():
        assert "PASSWORD '" not in path.read_text().upper().replace("PASSWORD ''", ""), path.name
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    assert "admin/admin" not in compose and "flead:flead@" not in compose


def test_earlier_superuser_cluster_is_adopted(tmp_path) -> None:
    """A cluster made by FLEAD before issue 8 (initdb's superuser ``flead``, password ``flead``,
    data in place): ``ensure_postgres`` with the password-less settings makes ``flead_admin`` its
    administrator, ``flead`` an ordinary role with the generated password still owning the
    data, and the old password stops working."""
    state = Path(tempfile.mkdtemp(prefix="flead-legacy-"))
    state.chmod(0o755)  # the server may run as the postgres user
    try:
        port = _free_port()
        env = {
            "FLEAD_STATE_DIR": str(state),
            "FLEAD_DATABASE_URL": f"postgresql://flead@127.0.0.1:{port}/flead",
            "FLEAD_DAGSTER_DATABASE_URL": f"postgresql://flead@127.0.0.1:{port}/flead_dagster",
        }
        legacy = load_settings({k: v.replace("flead@", "flead:flead@") for k, v in env.items()})
        _legacy_initdb(legacy)
        services.ensure_postgres(legacy)  # the old configuration keeps working (a warning)
        with psycopg.connect(legacy.database_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x integer)")
            conn.execute("INSERT INTO kept VALUES (42)")
        settings = load_settings(env)
        assert services.ensure_postgres(settings) == "reused"
        with psycopg.connect(settings.database_url) as conn:
            assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]
            assert conn.execute(
                "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles"
                " WHERE rolname = current_user"
            ).fetchone() == (False, False, False)
            conn.execute("INSERT INTO kept VALUES (43)")  # still the owner
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(legacy.database_url).close()
        with psycopg.connect(db.admin_url(settings)) as conn:
            assert conn.execute(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            ).fetchone() == (True,)
        assert services.ensure_postgres(settings) == "reused"  # a second start changes nothing
        db.apply_schema(settings.database_url)
    finally:
        services.stop_postgres(load_settings({"FLEAD_STATE_DIR": str(state)}))
        shutil.rmtree(state, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _legacy_initdb(settings: Settings) -> None:
    """What services._init_postgres did before issue 8: initdb with the superuser flead/flead."""
    data_dir = settings.state_dir / "postgres"
    data_dir.mkdir(parents=True)
    pwfile = settings.state_dir / "pw"
    pwfile.write_text("flead\n")
    user = services._postgres_user()
    if user:
        shutil.chown(data_dir, user)
        shutil.chown(pwfile, user)
    data_dir.chmod(0o700)
    subprocess.run(
        [
            str(services._postgres_bin("initdb")),
            "-D",
            str(data_dir),
            "-U",
            "flead",
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        ],
        check=True,
        user=user,
        capture_output=True,
    )
