"""``flead supervise``: keeps the services ``flead up`` started alive.

One small process (started by ``flead up``, pid file ``supervisor``) watches the pid files of
the services: a service whose pid file names a dead process crashed (``flead down`` and
``services.stop_pid`` remove the pid file *before* signalling, so a deliberate stop is never
undone). It is restarted after a backoff that doubles with every crash in a row (from
``supervise_backoff_s`` up to ``supervise_backoff_max_s``; a service that stays up for
``supervise_stable_s`` starts over at the first step), under the same lock ``flead up`` holds
while it starts services, so the two never start one service twice.

Every ``lag_check_interval_s`` it measures the consumer lag of the streaming services' groups:
a service is *stalled* when its lag is above 0 and its committed offsets did not move for
``lag_stall_s``, and its lag *keeps growing* when every sample of the second half of the last
``lag_window_s`` is above every sample of the first half.

What it sees goes to ``<state>/run/supervision.json`` (restart counts survive the supervisor:
``flead status`` and Dagster's health checks read them) and, when PostgreSQL answers, to the
tables ``service_health`` and ``service_restarts`` that Grafana's alert rules read. It also
rotates the services' log files by size (copy, then truncate in place: the services keep
their file open in append mode).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flead import services
from flead.config import Settings

log = logging.getLogger(__name__)

SUPERVISOR = "supervisor"
WATCHED = (
    "postgres",
    "kafka",
    *services.STREAMING_SERVICES,
    "dagster-webserver",
    "dagster-daemon",
)
"""In restart order: storage before the services that need it."""

# Logs a library rotates itself (Kafka's log4j2 RollingFile): never copy-truncated here.
SELF_ROTATED_LOGS = {"kafka-server.log"}


def watched(settings: Settings) -> tuple[str, ...]:
    """:data:`WATCHED`, plus in cluster mode each Kafka broker and each Flink and Spark process
    flead started (flead/cluster.py)."""
    if settings.deploy != "cluster":
        return WATCHED
    from flead import cluster

    brokers = [
        services.kafka_node_name(settings, i)
        for i in range(len(services.kafka_endpoints(settings)))
    ]
    rest = [name for name in WATCHED if name not in {"postgres", "kafka"}]
    return ("postgres", *brokers, *cluster.processes(settings), *rest)


def lag_sources(settings: Settings) -> dict[str, tuple[str, str]]:
    """Streaming service → (consumer group, topic) whose lag measures its progress."""
    t = settings.topics
    return {
        "flink-job": (settings.consumer_group("edge"), t.readings),
        "fedavg": (settings.consumer_group("fedavg"), t.local_updates),
        "anomaly-sink": (settings.consumer_group("anomaly-sink"), t.anomalies),
    }


def state_file(settings: Settings) -> Path:
    return settings.run_dir / "supervision.json"


def read_state(settings: Settings) -> dict[str, Any]:
    """The supervisor's last report (``{}`` before its first)."""
    try:
        return json.loads(state_file(settings).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def service_report(settings: Settings) -> dict[str, dict[str, Any]]:
    """Per watched service: restarts, last restart, lag, whether the lag keeps growing and
    whether the service is stalled; and whether the supervisor itself runs."""
    state = read_state(settings)
    report = {name: dict(info) for name, info in state.get("services", {}).items()}
    pid = services.recorded_pid(settings, SUPERVISOR)
    report[SUPERVISOR] = {"pid": pid, "alive": pid is not None}
    return report


def backoff(failures: int, base: float, ceiling: float) -> float:
    """Seconds before restarting a service that crashed ``failures`` times in a row before."""
    return min(base * 2**failures, ceiling)


def lag_growing(samples: list[tuple[float, int]], window_s: float, now: float) -> bool:
    """Whether lag kept growing over the last ``window_s``: the samples (time, lag) span most
    of the window and every lag of its second half is above every lag of its first half
    (so the saw-tooth of periodic offset commits does not count, a steady climb does)."""
    recent = [(t, lag) for t, lag in samples if t >= now - window_s]
    if len(recent) < 4 or recent[-1][0] - recent[0][0] < 0.8 * window_s:
        return False
    middle = recent[0][0] + (recent[-1][0] - recent[0][0]) / 2
    first = [lag for t, lag in recent if t < middle]
    second = [lag for t, lag in recent if t >= middle]
    return bool(first and second) and min(second) > max(first)


def rotate_log(path: Path, max_bytes: int, backups: int) -> bool:
    """Copy-truncate ``path`` once it exceeds ``max_bytes``, keeping ``backups`` old copies
    (``.1`` newest). The writer keeps its descriptor (opened for append), so it goes on
    writing at the start of the emptied file; lines written between copy and truncate are
    lost, which is the price of not restarting the service."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    if backups > 0:
        for index in range(backups - 1, 0, -1):
            older = path.with_name(f"{path.name}.{index}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with path.open("r+b") as handle:
        handle.truncate(0)
    return True


def rotate_logs(settings: Settings) -> list[str]:
    """Rotate every service log (``<state>/logs/*.log``) beyond ``log_max_bytes``."""
    rotated = []
    for path in sorted(settings.log_dir.glob("*.log")):
        if path.name not in SELF_ROTATED_LOGS and rotate_log(
            path, settings.log_max_bytes, settings.log_backups
        ):
            rotated.append(path.name)
    return rotated


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class _Watch:
    """What the supervisor remembers of one service between ticks."""

    failures: int = 0  # crashes in a row (reset once it stays up supervise_stable_s)
    due: float | None = None  # when the pending restart may happen
    started_at: float | None = None
    lag_samples: deque = field(default_factory=deque)  # (time, lag)
    committed: int | None = None
    progressed_at: float | None = None


def restart_service(settings: Settings, name: str) -> None:
    """Start ``name`` again the way ``flead up`` starts it."""
    if name == "postgres":
        services.ensure_postgres(settings)
    elif name == "kafka" or name.startswith("kafka-"):
        services.ensure_kafka(settings)  # starts exactly the brokers that do not answer
    elif name.startswith(("flink-jobmanager", "flink-taskmanager", "spark-")):
        from flead import cluster

        cluster.restart_process(settings, name)
    elif name in services.STREAMING_SERVICES:
        services.start_streaming(settings, name)
    elif name in ("dagster-webserver", "dagster-daemon"):
        from flead import orchestration

        orchestration.ensure_dagster(settings)
    else:
        raise ValueError(f"flead does not supervise {name!r}")


class Supervisor:
    def __init__(self, settings: Settings, clock=time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.watched = watched(settings)
        self.watches = {name: _Watch() for name in self.watched}
        # Counts survive the supervisor: they are the state folder's, not this process's.
        self.records: dict[str, dict[str, Any]] = read_state(settings).get("services", {})
        self.next_lag_check = 0.0
        self.next_rotation = 0.0
        self.new_restarts: list[tuple[str, str, str]] = []  # (service, at, reason) for the DB
        self.running = True

    def record(self, name: str) -> dict[str, Any]:
        return self.records.setdefault(name, {"restarts": 0})

    # --- one pass ----------------------------------------------------------------------------

    def tick(self) -> None:
        now = self.clock()
        for name in self.watched:
            self.check(name, now)
        if now >= self.next_lag_check:
            self.next_lag_check = now + self.settings.lag_check_interval_s
            self.measure_lag(now)
        if now >= self.next_rotation:
            self.next_rotation = now + 30
            for name in rotate_logs(self.settings):
                log.info("rotated %s", name)
        self.save()
        self.publish()

    def check(self, name: str, now: float) -> None:
        watch, record = self.watches[name], self.record(name)
        pid = _pid_in_file(self.settings, name)
        if pid is None:  # never started by flead, or stopped on purpose
            watch.due = None
            record.update(pid=None, alive=False, watched=False)
            return
        if services.pid_alive(pid):
            record.update(pid=pid, alive=True, watched=True)
            if watch.started_at is None:
                watch.started_at = now
            elif now - watch.started_at >= self.settings.supervise_stable_s:
                watch.failures = 0
            return
        record.update(pid=pid, alive=False, watched=True)
        if watch.due is None:
            delay = backoff(
                watch.failures,
                self.settings.supervise_backoff_s,
                self.settings.supervise_backoff_max_s,
            )
            watch.due = now + delay
            log.warning("%s (pid %d) is dead; restarting in %.0f s", name, pid, delay)
        if now < watch.due:
            return
        with services.service_lock(self.settings):
            if _pid_in_file(self.settings, name) != pid:
                watch.due = None  # restarted or stopped by someone else meanwhile
                return
            services.kill_group(pid)  # what the dead leader left (a PyFlink job's JVM)
            try:
                restart_service(self.settings, name)
            except Exception as exc:  # counted and retried with a longer backoff
                reason = f"died; restart failed: {exc}"
                record["last_error"] = str(exc)[:500]
                log.error("restarting %s failed: %s", name, exc)
            else:
                reason = "died"
                record.pop("last_error", None)
                if _pid_in_file(self.settings, name) == pid:
                    # Nothing was spawned: its address answers, someone else's server now.
                    services.pid_file(self.settings, name).unlink(missing_ok=True)
        at = _now_iso()
        watch.failures += 1
        watch.due = None
        watch.started_at = self.clock()
        record["restarts"] = int(record.get("restarts", 0)) + 1
        record["last_restart"] = at
        history = record.setdefault("recent_restarts", [])
        history.append(at)
        del history[:-10]
        self.new_restarts.append((name, at, reason))
        log.warning("%s restarted (restart %d)", name, record["restarts"])

    def measure_lag(self, now: float) -> None:
        from flead import kafka

        for name, (group, topic) in lag_sources(self.settings).items():
            watch, record = self.watches[name], self.record(name)
            if not record.get("watched"):
                continue
            try:
                offsets = kafka.group_offsets(self.settings, group, topic, timeout=5)
            except Exception as exc:  # Kafka down: reported, not fatal
                record.update(lag=None, lag_error=str(exc)[:200])
                continue
            record.pop("lag_error", None)
            if offsets is None:
                record.update(lag=None, lag_growing=False, stalled=False)
                continue
            committed, end = offsets
            lag = end - committed
            if watch.committed is None or committed > watch.committed or lag == 0:
                watch.progressed_at = now
            watch.committed = committed
            watch.lag_samples.append((now, lag))
            while watch.lag_samples and watch.lag_samples[0][0] < now - self.settings.lag_window_s:
                watch.lag_samples.popleft()
            stalled = lag > 0 and now - (watch.progressed_at or now) >= self.settings.lag_stall_s
            record.update(
                lag=lag,
                lag_growing=lag_growing(list(watch.lag_samples), self.settings.lag_window_s, now),
                stalled=stalled,
                lag_checked=_now_iso(),
            )

    # --- reports -----------------------------------------------------------------------------

    def save(self) -> None:
        path = state_file(self.settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"updated_at": _now_iso(), "services": self.records}, indent=1))
        os.replace(tmp, path)  # readers never see half a file

    def publish(self) -> None:
        """The same into PostgreSQL for Grafana (when it answers and is migrated)."""
        import psycopg

        from flead import db

        try:
            with db.connect(self.settings.database_url, connect_timeout=3) as conn:
                for service, at, reason in self.new_restarts:
                    conn.execute(
                        "INSERT INTO service_restarts (service, restarted_at, reason)"
                        " VALUES (%s, %s, %s)",
                        (service, at, reason),
                    )
                for service, r in self.records.items():
                    if not r.get("watched") and not r.get("restarts"):
                        continue
                    conn.execute(
                        "INSERT INTO service_health (service, pid, alive, restarts,"
                        " last_restart_at, lag, lag_growing, stalled, checked_at)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now())"
                        " ON CONFLICT (service) DO UPDATE SET pid = EXCLUDED.pid,"
                        " alive = EXCLUDED.alive, restarts = EXCLUDED.restarts,"
                        " last_restart_at = EXCLUDED.last_restart_at, lag = EXCLUDED.lag,"
                        " lag_growing = EXCLUDED.lag_growing, stalled = EXCLUDED.stalled,"
                        " checked_at = EXCLUDED.checked_at",
                        (
                            service,
                            r.get("pid"),
                            bool(r.get("alive")),
                            int(r.get("restarts", 0)),
                            r.get("last_restart"),
                            r.get("lag"),
                            bool(r.get("lag_growing")),
                            bool(r.get("stalled")),
                        ),
                    )
            self.new_restarts.clear()
        except psycopg.Error as exc:  # PostgreSQL down or not migrated: the file has it all
            log.debug("cannot publish service health: %s", exc)

    def run(self) -> None:
        def stop(_signum, _frame) -> None:
            self.running = False

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("supervising %s (state %s)", ", ".join(WATCHED), self.settings.state_dir)
        while self.running:
            try:
                self.tick()
            except Exception:  # the supervisor must outlive what it watches
                log.exception("supervision pass failed")
            deadline = self.clock() + self.settings.supervise_interval_s
            while self.running and self.clock() < deadline:
                time.sleep(0.2)


def _pid_in_file(settings: Settings, name: str) -> int | None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return int(services.pid_file(settings, name).read_text().strip())
    return None


def ensure_supervisor(settings: Settings) -> str:
    """Start ``flead supervise`` for ``settings`` unless it runs; "running" or "started"."""
    from flead.config import REPO_ROOT, to_env

    if services.recorded_pid(settings, SUPERVISOR) is not None:
        return "running"
    python = str(REPO_ROOT / ".venv" / "bin" / "python")
    services.spawn(
        settings, SUPERVISOR, [python, "-m", "flead.cli", "supervise"], env=to_env(settings)
    )
    return "started"


def stop_supervisor(settings: Settings) -> bool:
    return services.stop_pid(settings, SUPERVISOR, timeout=30, group=False)
