"""FLEAD's settings: the one place every knob lives.

Each field has a default that runs the whole system on this machine and an environment
variable ``FLEAD_<FIELD>`` (upper case) that overrides it, so an existing Kafka cluster,
TimescaleDB or Flink/Spark cluster can be used instead of the local ones. Only the standard
library is imported here: the PyFlink job's separate environment imports this module too.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Topics:
    readings: str = "edge-iiot-stream"
    anomalies: str = "anomalies"
    local_updates: str = "local-model-updates"
    global_updates: str = "global-model-updates"
    dead_letter: str = "flead-dead-letter"

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass(frozen=True)
class Settings:
    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_partitions: int = 4
    kafka_replication: int = 1
    kafka_min_insync_replicas: int = 1  # min.insync.replicas of topics flead creates
    kafka_retention_ms: int = -1  # keep all: replayed readings carry event times in the past
    kafka_retention_bytes: int = -1  # per partition, set when a topic is created; -1 = no limit
    kafka_heap: str = "1g"
    topics: Topics = field(default_factory=Topics)
    consumer_group_prefix: str = "flead"  # groups are <prefix>-edge, <prefix>-fedavg, ...
    # sasl: a SCRAM user per service and ACLs (flead/kafka.py); none: plaintext, for a broker of
    # your own without authentication
    kafka_security: str = "sasl"
    # local: the Flink job in a mini-cluster, Spark local[*], one broker. cluster: a standalone
    # Flink session cluster, Spark standalone and three brokers (CLUSTER_DEFAULTS; flead/cluster.py)
    deploy: str = "local"
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"  # or SCRAM-SHA-256
    # PostgreSQL (the application database; Dagster's instance has its own). No password in
    # the defaults: load_settings fills a URL that has none with the application role's
    # (FLEAD_DB_PASSWORD, else generated into <state_dir>/secrets/db_password).
    database_url: str = "postgresql://flead@127.0.0.1:5433/flead"
    dagster_database_url: str = "postgresql://flead@127.0.0.1:5433/flead_dagster"
    # The superuser that only creates the cluster, the roles and the databases (flead up, the
    # tests' scratch databases); never given to a service. Empty: flead_admin on database_url's
    # server, password FLEAD_DB_ADMIN_PASSWORD else <state_dir>/secrets/db_admin_password.
    database_admin_url: str = ""
    grafana_statement_timeout: str = "30s"  # per statement of Grafana's read-only role
    # Local services: where their data, logs and pids live
    state_dir: Path = REPO_ROOT / ".flead"
    jars_dir: Path = REPO_ROOT / ".flead" / "jars"  # copied by Maven from jvm/pom.xml
    # Replay of the default data set
    source: str = "synthetic"
    synthetic_devices: int = 2407
    synthetic_readings_per_device: int = 200
    synthetic_anomaly_rate: float = 0.02
    seed: int = 42
    replay_rate: float = 0.0  # readings/s; 0 = as fast as possible
    replay_speedup: float = 0.0  # event-time compression factor; 0 = off
    replay_batch: int = 50  # readings of one device per message (1 = the single-reading form)
    replay_linger_ms: float = 2000.0  # longest a held reading waits for its message (0 = no limit)
    # Edge learning: the PyFlink job
    flink_python: Path = REPO_ROOT / ".venv-flink" / "bin" / "python"  # the job's environment
    flink_parallelism: int = 2  # measured: ~1.4x parallelism 1 on 2 cores (README)
    flink_execution_mode: str = "thread"  # PyFlink's "thread" (fast) or "process"
    checkpoint_interval_ms: int = 10_000
    # Bounded restarts (Flink's failure-rate strategy): at most this many failures within the
    # window, this long apart, then the job fails for good instead of restarting in a loop.
    flink_restart_attempts: int = 5
    flink_restart_window_s: float = 600.0
    flink_restart_delay_s: float = 10.0
    # Cluster mode (flead/cluster.py): host:port of an existing JobManager's REST API to submit
    # to; empty: start a standalone session cluster from the apache-flink package's own scripts.
    flink_jobmanager: str = ""
    flink_rest_port: int = 18081  # the session cluster flead starts: REST API and web UI ...
    flink_rpc_port: int = 16123  # ... and the JobManager's RPC port
    flink_taskmanagers: int = 2
    flink_taskmanager_slots: int = 2  # 2 x 2 slots: a parallelism-2 job survives losing one
    flink_jobmanager_memory: str = "1024m"
    flink_taskmanager_memory: str = "1536m"
    flink_heartbeat_timeout_ms: int = 10_000  # a killed TaskManager is declared lost this soon
    # Keyed state of a device not heard of for this long (processing time) expires: a device
    # that went away costs nothing after it; one that comes back starts a fresh learner.
    device_state_ttl_s: float = 7 * 24 * 3600.0
    train_every: int = 50  # readings per local round ...
    train_interval_s: float = 60.0  # ... or seconds, whichever comes first
    min_round_samples: int = 10  # a timer-triggered round needs at least this many readings
    holdout_fraction: float = 0.1  # share of devices that are scored but never train
    anomaly_z: float = 2.5
    critical_z: float = 4.0
    # The detection learner (streaming/learner.py; `flead evaluate` runs it in-process).
    # Chosen by measurement with `flead evaluate` on the synthetic fleet, SKAB and WSN (README).
    detector: str = "auto"  # auto | supervised | discriminant | label_free | zscore
    hidden_units: int = 16  # the supervised network's tanh units; 0 = logistic regression
    learning_rate: float = 0.2  # local SGD step
    local_epochs: int = 5  # local passes over a round's rows (README: why 5 at 0.2)
    local_batch_size: int = 16
    # Rounds run SGD on the network only where devices score with it (detector=supervised);
    # true: always, so the versions carry a trained network to compare (README, Detection).
    train_network: bool = False
    positive_memory: int = 32  # anomalous rows a device remembers and replays in its rounds
    baseline_gate: float = 4.0  # readings with max |z| above this stay out of the baseline
    contamination: float = 0.02  # share of readings the label-free model's threshold flags
    # A device with labelled readings keeps its own discriminant and scores with it instead of
    # the global version while its recent record is better by personal_z standard errors
    # (McNemar's test over about the last personal_memory labelled readings; README).
    personalise: bool = True
    personal_memory: int = 100
    personal_z: float = 3.0
    # Federated averaging: the FedAvg service
    fedavg_min_devices: int = 20  # distinct devices buffered before a new global version
    fedavg_round_window_s: float = 60.0  # a round closes this long after its first update ...
    fedavg_active_window_s: float = 300.0  # ... or once every device active this recently sent one
    fedavg_fleet_memory_s: float = 86_400.0  # a version from fewer devices than usual moves less
    fedavg_server_momentum: float = 0.7  # FedAvgM: damps the version-to-version swing
    fedavg_calibration_decay: float = 0.99  # how fast old score histograms fade per version
    # fedavg | trimmed_mean | median | clipped_fedavg | geometric_median (model/aggregation.py)
    fedavg_strategy: str = "fedavg"
    fedavg_trim_fraction: float = 0.2  # trimmed_mean: share of updates cut at each end
    fedavg_max_norm: float = 10.0  # every rule: a longer update delta is scaled down; 0 = off
    fedavg_staleness_alpha: float = 0.5  # weight (1 + staleness)^-alpha; 0 = no staleness weighting
    fedavg_bucket_size: int = 3  # every rule sees means of this many shuffled updates (README)
    # Orchestration: Dagster (instance storage in dagster_database_url, home under state_dir)
    dagster_host: str = "127.0.0.1"
    dagster_port: int = 3070  # the webserver (UI); 3000 is left to Grafana
    evaluation_sensor_interval_s: int = 30  # how often the sensor looks for new global versions
    evaluation_max_versions_per_run: int = 500  # versions one sensor-launched Spark run evaluates
    evaluation_threshold: float = 0.5  # P(anomaly) above which a held-out reading is flagged
    # Per-reading rows of model_evaluations are kept for this many newest evaluated versions
    # (summaries for all); 0 = keep every version's rows.
    evaluation_keep_versions: int = 20
    streaming_health_interval_s: int = 60  # how often the health sensor checks the services
    # Supervision (`flead supervise`, started by `flead up`): restarts with exponential backoff
    supervise_interval_s: float = 2.0  # how often pids are checked
    supervise_backoff_s: float = 1.0  # delay before the first restart; doubles per crash ...
    supervise_backoff_max_s: float = 300.0  # ... up to this
    supervise_stable_s: float = 120.0  # up this long after a restart: the backoff starts over
    lag_check_interval_s: float = 15.0  # how often consumer lag is measured
    lag_window_s: float = 300.0  # lag "keeps growing" when it rose over this whole window
    lag_stall_s: float = 300.0  # lag > 0 and no committed progress this long: unhealthy
    log_max_bytes: int = 50_000_000  # a service's log is rotated past this size ...
    log_backups: int = 3  # ... keeping this many old files (<name>.log.1 is the newest)
    # Chaos tests only: services honour the crash points a test arms (flead/faults.py)
    fault_injection: bool = False
    # Spark (through dagster-pyspark): any master; the Kafka source's jars are local files
    spark_master: str = "local[*]"
    # Cluster mode: a spark:// master on this host that does not answer is started (Master and
    # one Worker with these resources); a remote one is used as it is.
    spark_master_webui_port: int = 18080
    spark_worker_cores: int = 1
    spark_worker_memory: str = "2g"
    spark_executor_memory: str = "1g"
    spark_driver_memory: str = "2g"
    spark_shuffle_partitions: int = 4  # small data, 2 cores: the default 200 is all overhead
    # Hourly analytics: partitions start at the data's first hour ("%Y-%m-%d-%H:%M", UTC)
    analytics_start: str = "2025-11-07-00:00"  # the synthetic fleet's first reading
    analytics_schedule_minute: int = 10  # the schedule runs the previous hour at this minute
    # An hour is read from Kafka by message timestamp widened by this much on both sides, then
    # kept by event time: a batched message carries its newest reading's time, so this must
    # exceed the time one batch spans (replay_batch × the sampling interval).
    analytics_kafka_slack_s: int = 3600

    def consumer_group(self, name: str) -> str:
        return f"{self.consumer_group_prefix}-{name}"

    def synthetic_options(self, devices: int = 0, per_device: int = 0) -> dict[str, Any]:
        """The options of ``streaming.sources.synthetic_fleet`` for the fleet ``make run``
        replays (``devices`` / ``per_device`` other than 0 change its size)."""
        return {
            "num_devices": devices or self.synthetic_devices,
            "readings_per_device": per_device or self.synthetic_readings_per_device,
            "anomaly_rate": self.synthetic_anomaly_rate,
            "seed": self.seed,
        }

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def dagster_home(self) -> Path:
        return self.state_dir / "dagster"

    @property
    def dagster_url(self) -> str:
        return f"http://{self.dagster_host}:{self.dagster_port}"


def _coerce(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, Path):
        return Path(raw).expanduser().absolute()  # not resolve(): venv pythons are symlinks
    return raw


def _override(obj: Any, prefix: str, env: dict[str, str]) -> Any:
    changes: dict[str, Any] = {}
    for f in fields(obj):
        current = getattr(obj, f.name)
        name = f"{prefix}{f.name.upper()}"
        if dataclasses.is_dataclass(current):
            changes[f.name] = _override(current, f"{name}_", env)
        elif name in env:
            try:
                changes[f.name] = _coerce(env[name], current)
            except ValueError as exc:
                raise ValueError(
                    f"{name}={env[name]!r} is not a valid {type(current).__name__}"
                ) from exc
    return dataclasses.replace(obj, **changes)


DEPLOY_MODES = ("local", "cluster")
CLUSTER_DEFAULTS: dict[str, Any] = {
    # Three KRaft nodes (broker + controller each), their own ports: the single broker of
    # local mode (9092) can run beside them. Each node's controller listens on its port + 1.
    "kafka_bootstrap": "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096",
    "kafka_replication": 3,
    "kafka_min_insync_replicas": 2,  # with acks=all a write survives the loss of one broker
    "spark_master": "spark://127.0.0.1:17077",
}
"""What ``FLEAD_DEPLOY=cluster`` (``flead up --cluster``) changes; a ``FLEAD_*`` variable
still wins over each."""


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Defaults overridden by ``FLEAD_*`` variables, e.g. ``FLEAD_KAFKA_BOOTSTRAP`` or
    ``FLEAD_TOPICS_READINGS``; with ``FLEAD_DEPLOY=cluster`` the defaults are
    :data:`CLUSTER_DEFAULTS`'."""
    env = dict(os.environ if env is None else env)
    deploy = env.get("FLEAD_DEPLOY", Settings.deploy)
    if deploy not in DEPLOY_MODES:
        raise ValueError(f"FLEAD_DEPLOY={deploy!r}: expected one of {DEPLOY_MODES}")
    defaults = Settings(**CLUSTER_DEFAULTS) if deploy == "cluster" else Settings()
    return with_database_passwords(_override(defaults, "FLEAD_", env), env)


def with_database_passwords(settings: Settings, env: dict[str, str] | None = None) -> Settings:
    """``settings`` whose application and Dagster database URLs carry a password: one written
    in the URL is kept, a URL without one gets the application role's secret ``db_password``
    (``FLEAD_DB_PASSWORD``, else generated once into the state folder)."""
    from flead import secrets  # standard library only, like this module

    changes: dict[str, str] = {}
    for name in ("database_url", "dagster_database_url"):
        url = getattr(settings, name)
        if urlsplit(url).username and secrets.url_password(url) is None:
            password = secrets.secret(settings.state_dir, "db_password", env)
            changes[name] = secrets.url_with_password(url, password)
    return dataclasses.replace(settings, **changes) if changes else settings


def namespaced(settings: Settings, prefix: str) -> Settings:
    """``settings`` with every topic and consumer group prefixed: a private copy of the
    pipeline on the same broker (tests and benchmarks run beside a live system this way)."""
    topics = Topics(
        **{f.name: f"{prefix}-{getattr(settings.topics, f.name)}" for f in fields(Topics)}
    )
    return dataclasses.replace(settings, topics=topics, consumer_group_prefix=prefix)


def to_env(settings: Settings, prefix: str = "FLEAD_") -> dict[str, str]:
    """The ``FLEAD_*`` variables that make another process load exactly ``settings``."""
    env: dict[str, str] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        name = f"{prefix}{f.name.upper()}"
        if dataclasses.is_dataclass(value):
            env.update(to_env(value, f"{name}_"))
        else:
            env[name] = str(value)
    return env


def describe(settings: Settings) -> dict[str, Any]:
    """Settings as plain JSON-able values, for ``flead status`` and docs."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
        return str(value) if isinstance(value, Path) else value

    return plain(settings)
