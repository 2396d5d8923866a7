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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flead.config import REPO_ROOT, Settings, to_env
from flead.secrets import secret

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


def kafka_endpoints(settings: Settings) -> list[Endpoint]:
    """Every address of the bootstrap list: flead's local brokers, one per address (node ids
    1..n, each node's controller listener on its port + 1)."""
    endpoints = []
    for address in settings.kafka_bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        endpoints.append(Endpoint(host or "127.0.0.1", int(port)))
    return endpoints


def kafka_endpoint(settings: Settings) -> Endpoint:
    return kafka_endpoints(settings)[0]


def kafka_node_name(settings: Settings, node: int) -> str:
    """Pid, log and folder name of local broker ``node`` (0-based): ``kafka`` for the single
    broker of local mode (as before), ``kafka-<node id>`` for each broker of a cluster."""
    return "kafka" if len(kafka_endpoints(settings)) == 1 else f"kafka-{node + 1}"


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
    # A zombie (dead, not yet reaped by a parent other than us) answers kill(pid, 0).
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return False
    return True


pid_alive = _alive


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of the process group a dead service led (``spawn`` makes every
    service a group leader): a PyFlink job's JVM outlives its Python parent otherwise."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def service_lock(settings: Settings) -> Iterator[None]:
    """Held while services are started (``flead up``, the supervisor's restarts): the two
    never start the same service twice."""
    import fcntl

    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with (settings.run_dir / "services.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    # The cluster's superuser is the administrator (flead_admin), used only to set up roles
    # and databases; the application gets an ordinary role (flead.db.provision).
    from flead import db

    admin = urlsplit(db.admin_url(settings))
    data_dir.mkdir(parents=True, exist_ok=True)
    pwfile = data_dir.parent / ".pgpass-init"
    # Created 0600 before the password is written: it is readable by its owner only.
    pwfile.unlink(missing_ok=True)
    with os.fdopen(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(f"{db.admin_password(settings)}\n")
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
            admin.username or db.ADMIN_ROLE,
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
    # pg_isready, not a login: which roles can log in is for _create_databases to find out.
    endpoint = postgres_endpoint(settings.database_url)
    argv = [str(_postgres_bin("pg_isready")), "-q", "-t", "2"]
    argv += ["-h", endpoint.host, "-p", str(endpoint.port)]

    def accepting() -> bool:
        return subprocess.run(argv, check=False).returncode == 0

    wait_until(accepting, 60, "PostgreSQL connections", settings.log_dir / "postgres.log")


def _create_databases(settings: Settings) -> None:
    """The roles (administrator, application, Grafana) and the application's and Dagster's
    databases, created or updated by the administrator (flead.db.provision)."""
    from flead import db

    try:
        outcome = db.provision(settings)
    except db.DatabaseSetupError as exc:
        raise ServiceError(str(exc)) from exc
    log.info("PostgreSQL roles and databases: %s", outcome)


def stop_postgres(settings: Settings) -> bool:
    # SIGTERM is PostgreSQL's "smart" shutdown; SIGINT ("fast") would not wait for clients
    # either, but smart may wait forever on an idle Dagster connection, so stop_pid escalates.
    return stop_pid(settings, "postgres", timeout=30, group=False)


# --- Kafka -----------------------------------------------------------------------------------

_LOG4J2 = """\
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = {max_bytes}
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = {backups}
appender.file.strategy.fileIndex = min
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
"""


def _kafka_properties(settings: Settings, data_dir: Path, node: int = 0) -> str:
    # Every node is broker and controller ("combined"): Kafka's docs call it the simple choice
    # for small clusters; three voters keep the metadata quorum through the loss of one node.
    endpoints = kafka_endpoints(settings)
    endpoint = endpoints[node]
    controller_port = endpoint.port + 1
    voters = ",".join(f"{i + 1}@{e.host}:{e.port + 1}" for i, e in enumerate(endpoints))
    replicas = min(3, len(endpoints))  # Kafka's own topics: as replicated as the cluster allows
    common = [
        "process.roles=broker,controller",
        f"node.id={node + 1}",
        f"controller.quorum.voters={voters}",
        "controller.listener.names=CONTROLLER",
        f"log.dirs={data_dir}",
        f"num.partitions={settings.kafka_partitions}",
        f"offsets.topic.replication.factor={replicas}",
        f"share.coordinator.state.topic.replication.factor={replicas}",
        f"transaction.state.log.replication.factor={replicas}",
        f"transaction.state.log.min.isr={max(1, replicas - 1)}",
        f"default.replication.factor={replicas}",
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=false",
    ]
    if settings.kafka_security == "none":
        return "\n".join(
            [
                *common,
                f"listeners=PLAINTEXT://{endpoint.host}:{endpoint.port},"
                f"CONTROLLER://{endpoint.host}:{controller_port}",
                f"advertised.listeners=PLAINTEXT://{endpoint.host}:{endpoint.port}",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                "",
            ]
        )
    from flead import kafka

    mechanism = settings.kafka_sasl_mechanism
    admin_password = kafka.password(settings, "admin")
    # KRaft keeps SCRAM credentials in its metadata, which the controller listener must reach
    # before it can read them: that listener authenticates with SASL/PLAIN and a static user.
    controller_password = secret(settings.state_dir, "kafka_controller_password")
    return "\n".join(
        [
            *common,
            f"listeners=BROKER://{endpoint.host}:{endpoint.port},"
            f"CONTROLLER://{endpoint.host}:{controller_port}",
            f"advertised.listeners=BROKER://{endpoint.host}:{endpoint.port}",
            "listener.security.protocol.map=BROKER:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
            "inter.broker.listener.name=BROKER",
            f"sasl.mechanism.inter.broker.protocol={mechanism}",
            f"listener.name.broker.sasl.enabled.mechanisms={mechanism}",
            f"listener.name.broker.{mechanism.lower()}.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required"
            f' username="admin" password="{admin_password}";',
            "sasl.mechanism.controller.protocol=PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
            "listener.name.controller.plain.sasl.jaas.config="
            "org.apache.kafka.common.security.plain.PlainLoginModule required"
            f' username="controller" password="{controller_password}"'
            f' user_controller="{controller_password}";',
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found=false",
            "super.users=User:admin;User:controller",
            "",
        ]
    )


def _kafka_java(settings: Settings, main_class: str, *args: str, node: int = 0) -> list[str]:
    jars = settings.jars_dir / "kafka"
    if not any(jars.glob("kafka_2.13-*.jar")):
        raise ServiceError(f"no Kafka jars in {jars}; `make run` copies them with Maven")
    config_dir = settings.state_dir / kafka_node_name(settings, node)
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


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds passwords)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def new_kafka_cluster_id() -> str:
    """A random KRaft cluster id as Kafka's own ``Uuid.randomUuid`` makes it: URL-safe base64
    of 16 bytes, never starting with ``-`` (the storage tool would read that as an option;
    one id in 64 did, and formatting failed)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _kafka_cluster_id(settings: Settings) -> str:
    """The KRaft cluster id every node of the state folder's brokers is formatted with (kept in
    a file: a node formatted again later must join the same cluster)."""
    path = settings.state_dir / "kafka-cluster-id"
    if len(kafka_endpoints(settings)) == 1 or not path.exists():
        cluster_id = new_kafka_cluster_id()
        if len(kafka_endpoints(settings)) == 1:
            return cluster_id
        path.write_text(cluster_id + "\n")
    return path.read_text().strip()


def _format_kafka(settings: Settings, properties: Path, marker: Path, node: int = 0) -> None:
    """Format the KRaft storage; with SASL, with the SCRAM credentials of every flead user.

    The passwords go to the JVM through an argument file (mode 0600, deleted at once), not the
    command line, which every local user can read in the process table."""
    from flead import kafka

    cluster_id = _kafka_cluster_id(settings)
    args = ["format", "-t", cluster_id, "-c", str(properties)]
    if settings.kafka_security == "sasl":
        mechanism = settings.kafka_sasl_mechanism
        for user in kafka.USERS:
            quoted = kafka.password(settings, user).replace("\\", "\\\\").replace('"', '\\"')
            args += ["--add-scram", f'{mechanism}=[name={user},password="{quoted}"]']
    argv = _kafka_java(settings, "kafka.tools.StorageTool", *args, node=node)
    argfile = properties.parent / "format.args"

    def argfile_quote(arg: str) -> str:
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'

    _write_private(argfile, "\n".join(argfile_quote(a) for a in argv[1:]) + "\n")
    try:
        done = subprocess.run([argv[0], f"@{argfile}"], capture_output=True, text=True, check=False)
    finally:
        argfile.unlink(missing_ok=True)
    if done.returncode != 0:
        raise ServiceError(f"formatting Kafka's storage failed: {done.stderr.strip()[-2000:]}")
    marker.write_text(f"{settings.kafka_security} {settings.kafka_sasl_mechanism}\n")


def _check_formatted_for(settings: Settings, data_dir: Path, marker: Path) -> None:
    """A data folder formatted without the SCRAM credentials (by a flead before authentication,
    or with another mechanism) cannot authenticate anyone: say how to start over."""
    if settings.kafka_security != "sasl":
        return
    formatted = marker.read_text().split() if marker.exists() else ["none", "-"]
    if formatted == ["sasl", settings.kafka_sasl_mechanism]:
        return
    raise ServiceError(
        f"Kafka's data folder {data_dir} was formatted without {settings.kafka_sasl_mechanism}"
        " credentials for flead's users (by a flead before Kafka authentication, or with"
        " another mechanism), so no client could log in. Either delete that folder (its topics"
        " are re-created and `make run` replays the readings again: rm -rf"
        f" {data_dir}) and run `flead up` again, or keep it unauthenticated with"
        " FLEAD_KAFKA_SECURITY=none."
    )


def _start_kafka_node(settings: Settings, node: int) -> None:
    """Write the configuration of local broker ``node``, format its storage once, start it."""
    name = kafka_node_name(settings, node)
    config_dir = settings.state_dir / name
    data_dir = config_dir / "data"
    marker = config_dir / "formatted-for"
    config_dir.mkdir(parents=True, exist_ok=True)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    properties = config_dir / "server.properties"
    _write_private(properties, _kafka_properties(settings, data_dir, node))
    (config_dir / "log4j2.properties").write_text(
        _LOG4J2.format(
            log=settings.log_dir / f"{name}-server.log",
            max_bytes=settings.log_max_bytes,
            backups=settings.log_backups,
        )
    )
    if not (data_dir / "meta.properties").exists():
        _format_kafka(settings, properties, marker, node)
    _check_formatted_for(settings, data_dir, marker)
    spawn(settings, name, _kafka_java(settings, "kafka.Kafka", str(properties), node=node))


def ensure_kafka(settings: Settings) -> str:
    """Start the KRaft brokers of the bootstrap list with their data under the state folder
    (one in local mode; one per address, e.g. three in cluster mode), except those whose
    address already answers; with SASL, its users exist and the admin logs in."""
    from flead import kafka

    endpoints = kafka_endpoints(settings)
    down = [i for i, endpoint in enumerate(endpoints) if not endpoint.answers()]
    if not down:
        try:
            kafka.check_access(settings)
        except RuntimeError as exc:
            raise ServiceError(str(exc)) from None
        if endpoints[0].is_local():
            kafka.ensure_users(settings)
        return "reused"
    if not all(endpoints[i].is_local() for i in down):
        raise ServiceError(f"Kafka at {settings.kafka_bootstrap} does not answer")
    for node in down:
        _start_kafka_node(settings, node)
    for node in down:
        name = kafka_node_name(settings, node)
        wait_until(endpoints[node].answers, 90, name, settings.log_dir / f"{name}.log")
    try:
        kafka.check_access(settings, timeout=60)
    except RuntimeError as exc:
        logs = settings.log_dir / f"{kafka_node_name(settings, 0)}-server.log"
        raise ServiceError(f"{exc} (see {logs})") from None
    kafka.ensure_users(settings)
    return "started" if len(down) == len(endpoints) else f"started {len(down)} of {len(endpoints)}"


def stop_kafka(settings: Settings) -> bool:
    from concurrent.futures import ThreadPoolExecutor

    names = [kafka_node_name(settings, i) for i in range(len(kafka_endpoints(settings)))]
    # All at once: a broker stopped last, alone, waits in vain for a controller quorum to
    # acknowledge its controlled shutdown.
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        return any(list(pool.map(lambda name: stop_pid(settings, name, timeout=60), names)))


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
    # Cluster mode: the same job file, submitted to the session cluster by a watcher that
    # lives as long as the job does (flead/cluster.py); local mode: a mini-cluster in-process.
    job = (
        [python, "-m", "flead.cluster", "run-job"]
        if settings.deploy == "cluster"
        else [str(settings.flink_python), "-m", "streaming.flink_job"]
    )
    return {
        "flink-job": job,
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
