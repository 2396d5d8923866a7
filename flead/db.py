"""The application database: connections, roles, schema migrations and row counts.

Three PostgreSQL roles, each with the least it needs (DESIGN §3, issue 8):

- the **administrator** (``flead_admin`` by default, a superuser): creates the cluster, the
  roles and the databases, and is used for nothing else (``flead up``, the tests' scratch
  databases); no service is ever given its password;
- the **application role** (``flead``, the user of ``database_url``): owns the databases and
  every table, applies the migrations; not a superuser, cannot create roles or databases;
- **``flead_grafana``**: SELECT only, read-only sessions, a statement timeout.

Every password is taken from the environment (``FLEAD_DB_PASSWORD``, ``FLEAD_DB_ADMIN_PASSWORD``,
``FLEAD_GRAFANA_DB_PASSWORD``) or generated at first start into ``<state>/secrets/`` (mode
0600; :mod:`flead.secrets`); none is in the repository, and none is ever printed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from flead import secrets
from flead.config import REPO_ROOT, Settings

log = logging.getLogger(__name__)

ADMIN_ROLE = "flead_admin"
GRAFANA_ROLE = "flead_grafana"
# What clusters made by FLEAD before issue 8 have: the application role as the superuser,
# with this password. ``provision`` adopts such a cluster (see ``_adopt_legacy_cluster``).
LEGACY_SUPERUSER = ("flead", "flead")


class DatabaseSetupError(RuntimeError):
    """The roles or databases could not be set up; the message says what to do."""


SQL_DIR = REPO_ROOT / "sql"


def connect(url: str, **kwargs) -> psycopg.Connection:
    return psycopg.connect(url, **kwargs)


def with_database(url: str, name: str) -> str:
    """``url`` pointing at the database ``name`` of the same server, as the same user."""
    return urlsplit(url)._replace(path=f"/{name}").geturl()


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def app_role(settings: Settings) -> str:
    return urlsplit(settings.database_url).username or "flead"


def admin_url(settings: Settings, database: str = "postgres") -> str:
    """The administrator's URL (with its password): ``database_admin_url``, else
    ``flead_admin`` on the application database's server. Only for setting up roles and
    databases; never hand it to a service."""
    url = (
        settings.database_admin_url
        or urlsplit(settings.database_url)
        ._replace(
            netloc=f"{ADMIN_ROLE}@{urlsplit(settings.database_url).netloc.rpartition('@')[2]}"
        )
        .geturl()
    )
    url = with_database(url, database)
    if secrets.url_password(url) is None:
        url = secrets.url_with_password(url, admin_password(settings))
    return url


def admin_password(settings: Settings) -> str:
    return secrets.secret(settings.state_dir, "db_admin_password")


def grafana_password(settings: Settings) -> str:
    return secrets.secret(settings.state_dir, "grafana_db_password")


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677).

    ``CREATE/ALTER ROLE ... PASSWORD`` takes no bind parameters; sending the verifier instead of
    the password means the clear text never reaches the server, so it cannot appear in its log
    (a failed statement is logged with its text). Non-ASCII passwords would need SASLprep,
    which the server applies too: those are sent as a quoted literal instead.
    """
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _password_literal(password: str) -> sql.Composable:
    return sql.Literal(scram_verifier(password) if password.isascii() else password)


def set_password(conn: psycopg.Connection, role: str, password: str) -> None:
    """``ALTER ROLE role PASSWORD ...`` with the role quoted as an identifier and the password
    sent as its SCRAM verifier (a quoted literal), never spliced into the SQL text."""
    conn.execute(
        sql.SQL("ALTER ROLE {} PASSWORD {}").format(
            sql.Identifier(role), _password_literal(password)
        )
    )


def _role_exists(conn: psycopg.Connection, role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def _ensure_login_role(conn: psycopg.Connection, role: str, password: str) -> None:
    """``role`` exists as an ordinary login role (no superuser, no CREATEDB, no CREATEROLE)
    with ``password``; a role that had more (the superuser of an earlier FLEAD) loses it."""
    if not _role_exists(conn, role):
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    conn.execute(
        sql.SQL(
            "ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
        ).format(sql.Identifier(role))
    )
    set_password(conn, role, password)


def _ensure_database(conn: psycopg.Connection, name: str, owner: str) -> None:
    row = conn.execute(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    if row is None:
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(owner)
            )
        )
    elif row[0] != owner:
        # Tables stay with whoever created them; only a database we just made is handed over.
        log.warning("database %s is owned by %s, not by the application role %s", name, *row, owner)


def provision(settings: Settings) -> str:
    """Create or update, as the administrator, the application role, Grafana's role and the
    application's and Dagster's databases; return what was done ("provisioned", "adopted" or
    "skipped").

    Runs at every ``flead up``: the roles' passwords follow the configured secrets (set
    ``FLEAD_DB_PASSWORD`` and run ``flead up`` to change one). On a server flead does not
    administer (no administrator credentials), the roles and databases must exist already:
    that is checked by connecting as the application role, and a failure says what to do.
    """
    try:
        admin = connect(admin_url(settings), autocommit=True, connect_timeout=5)
        outcome = "provisioned"
    except psycopg.OperationalError as exc:
        admin = _adopt_legacy_cluster(settings)
        outcome = "adopted"
        if admin is None:
            return _check_without_admin(settings, exc)
    with admin:
        app = app_role(settings)
        if app == admin.info.user:
            raise DatabaseSetupError(
                f"the application role and the administrator are both {app!r}: the application"
                " must not connect as the administrator (set FLEAD_DATABASE_ADMIN_URL)"
            )
        app_password = secrets.url_password(settings.database_url)
        if app_password is None:
            raise DatabaseSetupError("database_url has no password (load_settings fills it)")
        _ensure_login_role(admin, app, app_password)
        _ensure_login_role(admin, GRAFANA_ROLE, grafana_password(settings))
        # Grafana's sessions: read-only by default (the privileges refuse writes anyway) and
        # no query may run long enough to load the database for everyone else.
        for setting, value in (
            ("default_transaction_read_only", "on"),
            ("statement_timeout", settings.grafana_statement_timeout),
        ):
            admin.execute(
                sql.SQL("ALTER ROLE {} SET {} = {}").format(
                    sql.Identifier(GRAFANA_ROLE), sql.Identifier(setting), sql.Literal(value)
                )
            )
        for url in (settings.database_url, settings.dagster_database_url):
            _ensure_database(admin, database_name(url), app)
        # Dagster's database is not for Grafana (nor anyone but the application role).
        admin.execute(
            sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(
                sql.Identifier(database_name(settings.dagster_database_url))
            )
        )
    _create_extensions(settings)
    return outcome


def _create_extensions(settings: Settings) -> None:
    """TimescaleDB, where the server has it, created by the administrator: the application
    role cannot create an untrusted extension (sql/002 then finds it present)."""
    with connect(
        admin_url(settings, database_name(settings.database_url)), autocommit=True
    ) as conn:
        if conn.execute(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
        ).fetchone():
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")


def _adopt_legacy_cluster(settings: Settings) -> psycopg.Connection | None:
    """A cluster made by FLEAD before issue 8 has one role, the superuser ``flead`` with the
    password ``flead``, which initdb made (PostgreSQL never lets that bootstrap role stop being
    a superuser). If the administrator cannot log in but those credentials work (and are not
    what the settings ask for), adopt the cluster and return the administrator's connection:

    1. as ``flead``, create the administrator ``flead_admin`` with its generated password;
    2. as ``flead_admin``, rename ``flead`` to ``flead_bootstrap`` and forbid it to log in;
    3. create ``flead`` again as an ordinary role and hand it the application's and Dagster's
       databases and every object in them (``provision`` then sets its generated password).

    Otherwise None. Data, tables and grants are kept."""
    user, password = LEGACY_SUPERUSER
    if app_role(settings) != user or secrets.url_password(settings.database_url) == password:
        return None
    legacy = secrets.url_with_password(with_database(settings.database_url, "postgres"), password)
    try:
        conn = connect(legacy, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError:
        return None
    with conn:
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        if not row[0]:
            return None
        if _role_exists(conn, ADMIN_ROLE):
            # The administrator exists but refused its password: the secret was replaced.
            raise DatabaseSetupError(
                f"PostgreSQL refused {ADMIN_ROLE}'s password; set FLEAD_DB_ADMIN_PASSWORD to the"
                " password it was created with, or write it to"
                f" {secrets.secrets_dir(settings.state_dir) / 'db_admin_password'}"
            )
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(ADMIN_ROLE), _password_literal(admin_password(settings))
            )
        )
    admin = connect(admin_url(settings), autocommit=True, connect_timeout=5)
    old = f"{user}_bootstrap"
    admin.execute(
        sql.SQL("ALTER ROLE {} RENAME TO {}").format(sql.Identifier(user), sql.Identifier(old))
    )
    admin.execute(sql.SQL("ALTER ROLE {} NOLOGIN PASSWORD NULL").format(sql.Identifier(old)))
    admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(user)))
    for url in (settings.database_url, settings.dagster_database_url):
        _hand_over_database(settings, admin, database_name(url), old, user)
    log.warning(
        "PostgreSQL: this cluster was made by an earlier FLEAD (superuser %s, password known to"
        " everyone). Now %s is its administrator, that superuser is renamed %s and cannot log"
        " in, and %s is an ordinary role owning the databases and tables; passwords are in %s",
        user,
        ADMIN_ROLE,
        old,
        user,
        secrets.secrets_dir(settings.state_dir),
    )
    return admin


def _hand_over_database(
    settings: Settings, admin: psycopg.Connection, name: str, old: str, new: str
) -> None:
    """Database ``name`` and every object in it that ``old`` owns become ``new``'s (one by
    one: REASSIGN OWNED refuses the bootstrap role, which owns the system catalogs)."""
    if not admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
        return
    admin.execute(
        sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(name), sql.Identifier(new))
    )
    with connect(admin_url(settings, name), autocommit=True) as conn, conn.transaction():
        schemas = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE pg_get_userbyid(nspowner) = %s", (old,)
        ).fetchall()
        for (schema,) in schemas:
            conn.execute(
                sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(
                    sql.Identifier(schema), sql.Identifier(new)
                )
            )
        # Tables, views and foreign tables first: their sequences and indexes follow them.
        relations = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE pg_get_userbyid(c.relowner) = %s"
            " AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')"
            " AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
            " AND n.nspname NOT LIKE 'pg_toast%%'"
            " ORDER BY c.relkind = 'S', n.nspname, c.relname",
            (old,),
        ).fetchall()
        for schema, relation in relations:
            still_old = conn.execute(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relname = %s AND pg_get_userbyid(c.relowner) = %s",
                (schema, relation, old),
            ).fetchone()
            if still_old:
                conn.execute(
                    sql.SQL("ALTER TABLE {}.{} OWNER TO {}").format(
                        sql.Identifier(schema), sql.Identifier(relation), sql.Identifier(new)
                    )
                )
        functions = conn.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE pg_get_userbyid(p.proowner) = %s"
            " AND n.nspname NOT IN ('pg_catalog', 'information_schema')",
            (old,),
        ).fetchall()
        for (signature,) in functions:  # regprocedure text is already quoted
            conn.execute(
                sql.SQL("ALTER ROUTINE {} OWNER TO {}").format(
                    sql.SQL(signature), sql.Identifier(new)
                )
            )


def _check_without_admin(settings: Settings, admin_error: Exception) -> str:
    """No administrator: fine if the application role can reach the server (one run by someone
    else, who made the roles and databases); a superuser application role (configured so
    explicitly) creates missing databases as before, with a warning. Otherwise a message that
    says what to do."""
    try:
        conn = connect(
            with_database(settings.database_url, "postgres"), autocommit=True, connect_timeout=5
        )
    except psycopg.OperationalError as exc:
        raise DatabaseSetupError(
            "cannot set up PostgreSQL: neither the administrator"
            f" ({secrets.redact_url(admin_url(settings))}) nor the application role"
            f" ({secrets.redact_url(settings.database_url)}) can log in."
            f" Administrator: {_first_line(admin_error)}. Application: {_first_line(exc)}."
            " Give the passwords through FLEAD_DB_ADMIN_PASSWORD / FLEAD_DB_PASSWORD (or the"
            f" files in {secrets.secrets_dir(settings.state_dir)})."
        ) from exc
    with conn:
        superuser = conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()[0]
        if superuser:
            log.warning(
                "the application connects to PostgreSQL as a superuser (%s): remove the password"
                " from FLEAD_DATABASE_URL to let flead give it an ordinary role",
                secrets.redact_url(settings.database_url),
            )
        for url in (settings.database_url, settings.dagster_database_url):
            name = database_name(url)
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                continue
            if not superuser:
                raise DatabaseSetupError(
                    f"database {name!r} does not exist and flead has no administrator to create"
                    " it: create it owned by the application role, or set"
                    " FLEAD_DATABASE_ADMIN_URL / FLEAD_DB_ADMIN_PASSWORD"
                )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    log.info("no PostgreSQL administrator credentials: using the existing roles and databases")
    return "skipped"


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def create_database(settings: Settings, name: str) -> str:
    """A new empty database ``name`` owned by the application role (as the administrator);
    return its URL as the application role."""
    with connect(admin_url(settings), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(app_role(settings))
            )
        )
    return with_database(settings.database_url, name)


def drop_database(settings: Settings, name: str) -> None:
    with connect(admin_url(settings), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


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
