"""Start, stop and health-check the local services FLEAD runs without Docker.

Each service records the pid it started in ``<state>/run/<name>.pid``; ``stop`` signals exactly
that pid, nothing broader. A service whose address answers already (started earlier, or an
external cluster named in the settings) is reused, never started twice.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flead.config import REPO_ROOT, Settings, to_env

log = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    """A service could not be started or reached; the message says what to look at."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def is_local(self) -> bool:
        return self.host in {"127.0.0.1", "localhost", "::1"}

    def answers(self, timeout: float = 0.5) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                return True
        except OSError:
            return False


def kafka_endpoint(settings: Settings) -> Endpoint:
    host, _, port = settings.kafka_bootstrap.split(",")[0].rpartition(":")
    return Endpoint(host or "127.0.0.1", int(port))


def postgres_endpoint(url: str) -> Endpoint:
    parts = urlsplit(url)
    return Endpoint(parts.hostname or "127.0.0.1", parts.port or 5432)


def wait_until(predicate, timeout: float, what: str, log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    hint = f"; see {log_file}" if log_file else ""
    raise ServiceError(f"{what} did not come up within {timeout:.0f} s{hint}")


# --- pid files -------------------------------------------------------------------------------


def pid_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.pid"


def _alive(pid: int) -> bool:
    try:
        # Reap it first if it is our own exited child, or it would linger as a zombie.
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def recorded_pid(settings: Settings, name: str) -> int | None:
    """The pid recorded for ``name`` if that process is still alive."""
    try:
        pid = int(pid_file(settings, name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def spawn(
    settings: Settings,
    name: str,
    argv: list[str],
    env: dict[str, str] | None = None,
    user: str | None = None,
) -> int:
    """Start ``argv`` detached, logging to ``<state>/logs/<name>.log``, and record its pid."""
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.log_dir / f"{name}.log"
    with log_path.open("ab") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            user=user,
            cwd=REPO_ROOT,
        )
    pid_file(settings, name).write_text(f"{process.pid}\n")
    return process.pid


def stop_pid(settings: Settings, name: str, timeout: float = 30.0, group: bool = True) -> bool:
    """SIGTERM the recorded process (and, with ``group``, the process group it leads, such as
    the JVM a PyFlink job starts), SIGKILL after ``timeout``; True if something was stopped."""
    pid = recorded_pid(settings, name)
    pid_file(settings, name).unlink(missing_ok=True)
    if pid is None:
        return False
    send = (lambda sig: os.killpg(pid, sig)) if group else (lambda sig: os.kill(pid, sig))
    send(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            _reap_group(pid, group)
            return True
        time.sleep(0.2)
    log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, pid, timeout)
    send(signal.SIGKILL)
    return True


def _reap_group(pgid: int, group: bool) -> None:
    """Children left in the group after its leader exited get the same SIGTERM."""
    if group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)


# --- PostgreSQL ------------------------------------------------------------------------------


def _postgres_bin(tool: str) -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), reverse=True)
    if not candidates:
        raise ServiceError(
            f"PostgreSQL's {tool} is not installed; `make run` installs it from Debian's packages"
        )
    return candidates[0]


def _postgres_user() -> str | None:
    """initdb refuses to run as root: run the server as the ``postgres`` user then."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise ServiceError("running as root needs the 'postgres' system user") from exc
    return "postgres"


def ensure_postgres(settings: Settings) -> str:
    """Start the project-local PostgreSQL cluster unless the database URL already answers."""
    endpoint = postgres_endpoint(settings.database_url)
    if endpoint.answers():
        _create_databases(settings)
        return "reused"
    if not endpoint.is_local():
        raise ServiceError(f"PostgreSQL at {endpoint.host}:{endpoint.port} does not answer")
    data_dir = settings.state_dir / "postgres"
    user = _postgres_user()
    if not (data_dir / "PG_VERSION").exists():
        _init_postgres(settings, data_dir, user)
    argv = [
        str(_postgres_bin("postgres")),
        "-D",
        str(data_dir),
        "-c",
        f"listen_addresses={endpoint.host}",
        "-c",
        f"port={endpoint.port}",
        "-c",
        f"unix_socket_directories={data_dir}",
    ]
    spawn(settings, "postgres", argv, user=user)
    wait_until(endpoint.answers, 60, "PostgreSQL", settings.log_dir / "postgres.log")
    _wait_accepting(settings)
    _create_databases(settings)
    return "started"


def _init_postgres(settings: Settings, data_dir: Path, user: str | None) -> None:
    parts = urlsplit(settings.database_url)
    data_dir.mkdir(parents=True, exist_ok=True)
    pwfile = data_dir.parent / ".pgpass-init"
    pwfile.write_text(f"{parts.password or 'flead'}\n")
    if user:
        shutil.chown(data_dir, user)
        shutil.chown(pwfile, user)
    data_dir.chmod(0o700)
    subprocess.run(
        [
            str(_postgres_bin("initdb")),
            "-D",
            str(data_dir),
            "-U",
            parts.username or "flead",
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
    pwfile.unlink()


def _wait_accepting(settings: Settings) -> None:
    import psycopg

    def accepting() -> bool:
        try:
            with psycopg.connect(_admin_url(settings), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    wait_until(accepting, 60, "PostgreSQL connections", settings.log_dir / "postgres.log")


def _admin_url(settings: Settings) -> str:
    return urlsplit(settings.database_url)._replace(path="/postgres").geturl()


def _create_databases(settings: Settings) -> None:
    """Create the application's and Dagster's databases where they are missing. On a server
    flead does not own, lacking the right to do so is a warning: the owner creates them."""
    import psycopg

    try:
        conn = psycopg.connect(_admin_url(settings), autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        log.warning("cannot check the databases on the server (%s); create them yourself", exc)
        return
    with conn:
        for url in (settings.database_url, settings.dagster_database_url):
            name = urlsplit(url).path.lstrip("/")
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')


def stop_postgres(settings: Settings) -> bool:
    # SIGTERM is PostgreSQL's "smart" shutdown; SIGINT ("fast") would not wait for clients
    # either, but smart may wait forever on an idle Dagster connection, so stop_pid escalates.
    return stop_pid(settings, "postgres", timeout=30, group=False)


# --- Kafka -----------------------------------------------------------------------------------

_LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
"""


def _kafka_properties(settings: Settings, data_dir: Path) -> str:
    endpoint = kafka_endpoint(settings)
    controller_port = endpoint.port + 1
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{endpoint.host}:{controller_port}",
            f"listeners=PLAINTEXT://{endpoint.host}:{endpoint.port},"
            f"CONTROLLER://{endpoint.host}:{controller_port}",
            f"advertised.listeners=PLAINTEXT://{endpoint.host}:{endpoint.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={data_dir}",
            f"num.partitions={settings.kafka_partitions}",
            "offsets.topic.replication.factor=1",
            "share.coordinator.state.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "",
        ]
    )


def _kafka_java(settings: Settings, main_class: str, *args: str) -> list[str]:
    jars = settings.jars_dir / "kafka"
    if not any(jars.glob("kafka_2.13-*.jar")):
        raise ServiceError(f"no Kafka jars in {jars}; `make run` copies them with Maven")
    config_dir = settings.state_dir / "kafka"
    return [
        shutil.which("java") or "java",
        "-Xms256m",
        f"-Xmx{settings.kafka_heap}",
        f"-Dlog4j2.configurationFile={config_dir / 'log4j2.properties'}",
        "-cp",
        f"{jars}/*",
        main_class,
        *args,
    ]


def ensure_kafka(settings: Settings) -> str:
    """Start a single-node KRaft broker with its data under the state folder, unless the
    bootstrap address already answers."""
    endpoint = kafka_endpoint(settings)
    if endpoint.answers():
        return "reused"
    if not endpoint.is_local():
        raise ServiceError(f"Kafka at {settings.kafka_bootstrap} does not answer")
    config_dir = settings.state_dir / "kafka"
    data_dir = config_dir / "data"
    config_dir.mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    properties = config_dir / "server.properties"
    properties.write_text(_kafka_properties(settings, data_dir))
    (config_dir / "log4j2.properties").write_text(
        _LOG4J2.format(log=settings.log_dir / "kafka-server.log")
    )
    if not (data_dir / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        subprocess.run(
            _kafka_java(
                settings,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(properties),
            ),
            check=True,
            capture_output=True,
        )
    spawn(settings, "kafka", _kafka_java(settings, "kafka.Kafka", str(properties)))
    wait_until(endpoint.answers, 90, "Kafka", settings.log_dir / "kafka.log")
    return "started"


def stop_kafka(settings: Settings) -> bool:
    return stop_pid(settings, "kafka", timeout=60)


# --- the streaming services ------------------------------------------------------------------


def flink_env(settings: Settings) -> dict[str, str]:
    """PyFlink's thread mode loads ``pemja`` from PyFlink's own site-packages."""
    site = subprocess.run(
        [str(settings.flink_python), "-c", "import site; print(site.getsitepackages()[0])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "PYTHONPATH": os.pathsep.join([site, str(REPO_ROOT)]),
        # The mini-cluster's own logs, per state folder rather than inside site-packages.
        "FLINK_LOG_DIR": str(settings.log_dir / "flink"),
    }


def streaming_commands(settings: Settings) -> dict[str, list[str]]:
    """name → argv of each long-running streaming process, in start order."""
    python = str(REPO_ROOT / ".venv" / "bin" / "python")
    return {
        "flink-job": [str(settings.flink_python), "-m", "streaming.flink_job"],
        "fedavg": [python, "-m", "streaming.fedavg"],
        "anomaly-sink": [python, "-m", "streaming.anomaly_sink"],
    }


STREAMING_SERVICES = ("flink-job", "fedavg", "anomaly-sink")


def flink_checkpoint_dir(settings: Settings) -> Path:
    return settings.state_dir / "flink" / "checkpoints"


def latest_flink_checkpoint(settings: Settings) -> Path | None:
    """The newest completed, retained checkpoint (one with its ``_metadata``): the Flink job
    resumes from it when it starts."""
    completed = [p.parent for p in flink_checkpoint_dir(settings).glob("*/chk-*/_metadata")]
    return max(completed, key=lambda p: p.stat().st_mtime, default=None)


def start_streaming(settings: Settings, name: str) -> int:
    """Start one streaming process with exactly ``settings`` (passed as ``FLEAD_*``)."""
    env = to_env(settings)
    if name == "flink-job":
        if not settings.flink_python.exists():
            raise ServiceError(
                f"the PyFlink environment {settings.flink_python} is missing; `make run` makes it"
            )
        env |= flink_env(settings)
    return spawn(settings, name, streaming_commands(settings)[name], env=env)


def ensure_streaming(settings: Settings) -> dict[str, str]:
    """Start the Flink job, the FedAvg service and the anomaly sink unless they are running."""
    outcome: dict[str, str] = {}
    for name in STREAMING_SERVICES:
        if recorded_pid(settings, name) is not None:
            outcome[name] = "running"
        else:
            start_streaming(settings, name)
            outcome[name] = "started"
    return outcome


def stop_streaming(settings: Settings) -> dict[str, bool]:
    # The job first: what it emits last is still aggregated and written by the others.
    return {name: stop_pid(settings, name, timeout=60) for name in STREAMING_SERVICES}
