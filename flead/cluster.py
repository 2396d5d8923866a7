"""Cluster mode (``FLEAD_DEPLOY=cluster``, ``flead up --cluster``): the same job and services on
real engines instead of in-process ones.

- **Flink**: a standalone session cluster started from the apache-flink package's own
  distribution (``pyflink/bin``, ``pyflink/lib``): one JobManager and ``flink_taskmanagers``
  TaskManagers, each a process of its own (``start-foreground``, so the pid flead records is
  the JVM), configured by a generated ``<state>/flink/conf/config.yaml``; checkpoints go to the
  shared folder ``<state>/flink/checkpoints``. ``FLEAD_FLINK_JOBMANAGER=host:port`` (the REST
  address) uses an existing cluster instead. The job is the same file as in local mode,
  submitted with ``flink run --python streaming/flink_job.py``; the ``flink-job`` service is then
  a small watcher (``python -m flead.cluster run-job``) that submits it (or adopts the job it
  submitted before), exits when the job ends (so ``flead supervise`` resubmits it, resuming from
  the newest retained checkpoint) and cancels it on SIGTERM (``flead down``).
- **Spark**: a standalone Master and one Worker started with ``spark-class`` from pyspark when
  ``spark_master`` is a ``spark://`` address on this host that does not answer.
- **Kafka**: the brokers of ``kafka_bootstrap`` (:func:`flead.services.ensure_kafka`, one per
  address), nothing here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from flead import services
from flead.config import REPO_ROOT, Settings, load_settings, to_env

log = logging.getLogger(__name__)

JOB_NAME = "flead-edge-learning"  # streaming/flink_job.py's env.execute name
JOBMANAGER = "flink-jobmanager"
SPARK_MASTER, SPARK_WORKER = "spark-master", "spark-worker"
TERMINAL = {"FAILED", "CANCELED", "FINISHED", "SUSPENDED"}


def taskmanager_names(settings: Settings) -> list[str]:
    return [f"flink-taskmanager-{i + 1}" for i in range(settings.flink_taskmanagers)]


def processes(settings: Settings) -> list[str]:
    """Pid names of the cluster processes flead starts in cluster mode, in start order."""
    if settings.deploy != "cluster":
        return []
    names = [] if settings.flink_jobmanager else [JOBMANAGER, *taskmanager_names(settings)]
    if _spark_to_start(settings):
        names += [SPARK_MASTER, SPARK_WORKER]
    return names


# --- Flink -----------------------------------------------------------------------------------


def pyflink_home(settings: Settings) -> Path:
    """The Flink distribution inside the apache-flink package of the job's environment."""
    site = services.flink_env(settings)["PYTHONPATH"].split(os.pathsep)[0]
    home = Path(site) / "pyflink"
    if not (home / "bin" / "flink").exists():
        raise services.ServiceError(f"no Flink distribution in {home}; `make install` makes it")
    return home


def rest_address(settings: Settings) -> services.Endpoint:
    """The REST API of the JobManager jobs are submitted to."""
    if settings.flink_jobmanager:
        host, _, port = settings.flink_jobmanager.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"FLEAD_FLINK_JOBMANAGER={settings.flink_jobmanager!r}: expected host:port"
            )
        return services.Endpoint(host, int(port))
    return services.Endpoint("127.0.0.1", settings.flink_rest_port)


def conf_dir(settings: Settings) -> Path:
    return settings.state_dir / "flink" / "conf"


def flink_config(settings: Settings, java_opts: str) -> dict[str, str]:
    """The session cluster's configuration (flattened keys of Flink's config.yaml)."""
    ms = int(settings.flink_restart_delay_s * 1000)
    return {
        "jobmanager.rpc.address": "127.0.0.1",
        "jobmanager.rpc.port": str(settings.flink_rpc_port),
        "jobmanager.bind-host": "127.0.0.1",
        "jobmanager.memory.process.size": settings.flink_jobmanager_memory,
        "taskmanager.bind-host": "127.0.0.1",
        "taskmanager.host": "127.0.0.1",
        "taskmanager.numberOfTaskSlots": str(settings.flink_taskmanager_slots),
        "taskmanager.memory.process.size": settings.flink_taskmanager_memory,
        "rest.address": "127.0.0.1",
        "rest.bind-address": "127.0.0.1",
        "rest.port": str(settings.flink_rest_port),
        "parallelism.default": str(settings.flink_parallelism),
        # One subtask per TaskManager where possible: losing one TaskManager is then a real
        # failover of the job, and its tasks move to the free slots of the others.
        "taskmanager.load-balance.mode": "slots",
        # A killed TaskManager stops answering heartbeats: declared lost after this long.
        "heartbeat.interval": str(max(1000, settings.flink_heartbeat_timeout_ms // 5)),
        "heartbeat.timeout": str(settings.flink_heartbeat_timeout_ms),
        # The job sets both itself (streaming/flink_job.py); the cluster's own defaults match,
        # so a job submitted without them is bounded and checkpointed in the shared folder too.
        "execution.checkpointing.dir": services.flink_checkpoint_dir(settings).as_uri(),
        "restart-strategy.type": "failure-rate",
        "restart-strategy.failure-rate.max-failures-per-interval": str(
            settings.flink_restart_attempts
        ),
        "restart-strategy.failure-rate.failure-rate-interval": (
            f"{int(settings.flink_restart_window_s * 1000)} ms"
        ),
        "restart-strategy.failure-rate.delay": f"{ms} ms",
        # PyFlink's thread mode runs Python through pemja, whose native libraries a JVM loads
        # into one class loader only (a second one fails: NoSuchFieldException
        # loadedLibraryNames on JDK 17). Loaded child-first from each job's jar, they would
        # let a TaskManager run Python for its first job only, so a resubmitted job (after a
        # cancel, or the supervisor's resubmission) failed on every TaskManager that had run
        # one. From the cluster's own lib (lib_dir), parent-first, they load once per JVM.
        "classloader.parent-first-patterns.additional": "pemja.",
        "io.tmp.dirs": str(settings.state_dir / "flink" / "tmp"),
        "env.java.opts.all": java_opts,
    }


def write_flink_conf(settings: Settings) -> Path:
    """``<state>/flink/conf``: the package's log configurations and a generated config.yaml."""
    import yaml  # PyYAML: Dagster's dependency, in .venv

    home = pyflink_home(settings)
    target = conf_dir(settings)
    target.mkdir(parents=True, exist_ok=True)
    for source in (home / "conf").iterdir():
        if source.name != "config.yaml":
            shutil.copy(source, target / source.name)
    packaged = yaml.safe_load((home / "conf" / "config.yaml").read_text()) or {}
    # The module opens Flink 2 needs on JDK 17, as the package's own configuration lists them.
    java_opts = str(packaged.get("env", {}).get("java", {}).get("opts", {}).get("all", ""))
    config = flink_config(settings, java_opts)
    (target / "config.yaml").write_text(
        "# Generated by flead (flead/cluster.py) from the settings; rewritten at every start.\n"
        + "".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items())
    )
    (settings.state_dir / "flink" / "tmp").mkdir(parents=True, exist_ok=True)
    return target


def lib_dir(settings: Settings) -> Path:
    """``<state>/flink/lib``: links to the distribution's ``lib`` jars plus ``flink-python``
    from its ``opt`` (so pemja comes from the cluster's class path, see :func:`flink_config`),
    made here rather than in the installed package; the cluster processes' ``FLINK_LIB_DIR``."""
    home = pyflink_home(settings)
    target = settings.state_dir / "flink" / "lib"
    target.mkdir(parents=True, exist_ok=True)
    python_jars = sorted((home / "opt").glob("flink-python-*.jar"))
    if not python_jars:
        raise services.ServiceError(f"no flink-python jar in {home / 'opt'}")
    for jar in [*sorted((home / "lib").glob("*.jar")), python_jars[-1]]:
        link = target / jar.name
        # Only missing links: running TaskManagers read their jars from here.
        if not link.is_symlink():
            link.symlink_to(jar)
    return target


def flink_process_env(settings: Settings) -> dict[str, str]:
    """Environment of the cluster's scripts and of the Flink client: the generated
    configuration, logs and pid files under the state folder, and (for the TaskManagers'
    embedded Python in thread mode) PyFlink's site-packages and the project importable."""
    home = pyflink_home(settings)
    (settings.run_dir / "flink").mkdir(parents=True, exist_ok=True)
    (settings.log_dir / "flink").mkdir(parents=True, exist_ok=True)
    return {
        **services.flink_env(settings),
        "FLINK_HOME": str(home),
        "FLINK_CONF_DIR": str(conf_dir(settings)),
        "FLINK_PID_DIR": str(settings.run_dir / "flink"),
        "PYFLINK_PYTHON": str(settings.flink_python),
        # PyFlink's Python inside a TaskManager starts a gateway JVM to build state TTL
        # configurations; it finds java through JAVA_HOME, which Flink's scripts export empty.
        "JAVA_HOME": os.environ.get("JAVA_HOME") or _java_home(),
    }


def _java_home() -> str:
    java = shutil.which("java")
    if java is None:
        raise services.ServiceError("no java on PATH: the Flink cluster needs JDK 17")
    return str(Path(java).resolve().parent.parent)


def rest(settings: Settings, path: str, method: str = "GET", timeout: float = 5.0) -> Any:
    endpoint = rest_address(settings)
    request = urllib.request.Request(f"http://{endpoint.host}:{endpoint.port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def _registered_taskmanagers(settings: Settings) -> int:
    try:
        return len(rest(settings, "/taskmanagers")["taskmanagers"])
    except (OSError, ValueError, KeyError):
        return 0


def ensure_flink_cluster(settings: Settings) -> dict[str, str]:
    """Start the JobManager and the TaskManagers that are not running (or check that an
    existing cluster named by ``flink_jobmanager`` answers)."""
    endpoint = rest_address(settings)
    if settings.flink_jobmanager:
        if not endpoint.answers(timeout=3):
            raise services.ServiceError(
                f"the Flink JobManager at {settings.flink_jobmanager} does not answer"
            )
        return {"flink-cluster": f"existing {settings.flink_jobmanager}"}
    write_flink_conf(settings)
    env = {**flink_process_env(settings), "FLINK_LIB_DIR": str(lib_dir(settings))}
    bin_dir = pyflink_home(settings) / "bin"
    outcome: dict[str, str] = {}
    if services.recorded_pid(settings, JOBMANAGER) is None:
        if endpoint.answers():
            raise services.ServiceError(
                f"port {endpoint.port} answers but is not flead's JobManager: set"
                " FLEAD_FLINK_JOBMANAGER to use that cluster, or FLEAD_FLINK_REST_PORT"
            )
        argv = [str(bin_dir / "jobmanager.sh"), "start-foreground"]
        services.spawn(settings, JOBMANAGER, argv, env=env)
        outcome[JOBMANAGER] = "started"
    else:
        outcome[JOBMANAGER] = "running"
    services.wait_until(
        endpoint.answers, 120, "the Flink JobManager", settings.log_dir / f"{JOBMANAGER}.log"
    )
    for name in taskmanager_names(settings):
        if services.recorded_pid(settings, name) is None:
            argv = [str(bin_dir / "taskmanager.sh"), "start-foreground"]
            services.spawn(settings, name, argv, env=env)
            outcome[name] = "started"
        else:
            outcome[name] = "running"
    services.wait_until(
        lambda: _registered_taskmanagers(settings) >= settings.flink_taskmanagers,
        120,
        f"{settings.flink_taskmanagers} Flink TaskManagers",
        settings.log_dir / "flink-taskmanager-1.log",
    )
    return outcome


def stop_flink_cluster(settings: Settings) -> dict[str, bool]:
    names = [*reversed(taskmanager_names(settings)), JOBMANAGER]
    return {name: services.stop_pid(settings, name, timeout=60) for name in names}


def job_id_file(settings: Settings) -> Path:
    return settings.run_dir / "flink-job.id"


def job_state(settings: Settings, job_id: str) -> str | None:
    """The job's state (RUNNING, RESTARTING, FAILED, ...), None if the cluster does not know it."""
    try:
        return rest(settings, f"/jobs/{job_id}")["state"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def submit_job(settings: Settings) -> str:
    """``flink run --detached --python streaming/flink_job.py`` against the cluster, with
    exactly ``settings`` as ``FLEAD_*`` variables; the job resumes from the newest retained
    checkpoint of the shared folder (as in local mode). Returns the job id."""
    endpoint = rest_address(settings)
    python = str(settings.flink_python)
    argv = [
        str(pyflink_home(settings) / "bin" / "flink"),
        "run",
        "--detached",
        "--target",
        "remote",
        f"-Drest.address={endpoint.host}",
        f"-Drest.port={endpoint.port}",
        "--python",
        str(REPO_ROOT / "streaming" / "flink_job.py"),
        "--pyClientExecutable",
        python,
        "--pyExecutable",
        python,
    ]
    env = {**os.environ, **to_env(settings), **flink_process_env(settings)}
    if settings.flink_jobmanager:
        env.pop("FLINK_CONF_DIR")  # an existing cluster: its configuration, not ours
    done = subprocess.run(
        argv, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    found = re.search(r"JobID ([0-9a-f]{32})", done.stdout + done.stderr)
    if done.returncode != 0 or found is None:
        tail = (done.stdout + done.stderr).strip()[-3000:]
        raise services.ServiceError(f"submitting the Flink job failed: {tail}")
    return found.group(1)


def cancel_job(settings: Settings, job_id: str, timeout: float = 60.0) -> None:
    """Cancel the job (its retained checkpoints stay: the next submission resumes there)."""
    if job_state(settings, job_id) in TERMINAL | {None}:
        return
    rest(settings, f"/jobs/{job_id}?mode=cancel", method="PATCH")
    services.wait_until(
        lambda: job_state(settings, job_id) in TERMINAL | {None}, timeout, "the job's cancellation"
    )


def run_job(settings: Settings, poll_s: float = 2.0) -> int:
    """The ``flink-job`` service of cluster mode: submit the job (or adopt the one this state
    folder submitted, if the cluster still runs it), then watch it. Exits 1 when the job ends
    by itself (failed beyond its restart strategy: the supervisor resubmits it), 0 after
    cancelling it on SIGTERM."""
    stopping = False

    def on_term(_signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    known = job_id_file(settings)
    job_id = known.read_text().strip() if known.exists() else ""
    if not job_id or job_state(settings, job_id) in TERMINAL | {None}:
        job_id = submit_job(settings)
        known.write_text(job_id + "\n")
        log.info("submitted %s as job %s", JOB_NAME, job_id)
    else:
        log.info("adopted running job %s", job_id)
    while not stopping:
        try:
            state = job_state(settings, job_id)
        except OSError as exc:  # the JobManager restarting: keep watching
            log.warning("cannot reach the JobManager: %s", exc)
            state = "UNKNOWN"
        if state in TERMINAL | {None}:
            log.error("job %s ended: %s", job_id, state)
            known.unlink(missing_ok=True)
            return 1
        time.sleep(poll_s)
    log.info("cancelling job %s", job_id)
    cancel_job(settings, job_id)
    known.unlink(missing_ok=True)
    return 0


def flink_status(settings: Settings) -> dict[str, Any]:
    """JobManager, TaskManagers, the job's state and its last completed checkpoint, from
    Flink's REST API (errors reported in place)."""
    endpoint = rest_address(settings)
    report: dict[str, Any] = {
        "jobmanager": {
            "address": f"{endpoint.host}:{endpoint.port}",
            "healthy": endpoint.answers(),
            "pid": services.recorded_pid(settings, JOBMANAGER),
        }
    }
    if not report["jobmanager"]["healthy"]:
        return report
    try:
        report["taskmanagers"] = [
            {
                "id": tm["id"],
                "address": tm.get("path", ""),
                "slots": tm["slotsNumber"],
                "free_slots": tm["freeSlots"],
            }
            for tm in rest(settings, "/taskmanagers")["taskmanagers"]
        ]
        job_id = job_id_file(settings).read_text().strip() if job_id_file(settings).exists() else ""
        job: dict[str, Any] = {"id": job_id or None}
        if job_id:
            detail = rest(settings, f"/jobs/{job_id}")
            job |= {"name": detail["name"], "state": detail["state"]}
            checkpoints = rest(settings, f"/jobs/{job_id}/checkpoints")
            latest = (checkpoints.get("latest") or {}).get("completed")
            counts = checkpoints.get("counts", {})
            job["checkpoints_completed"] = counts.get("completed", 0)
            job["restarts"] = detail.get("jobRestarts")  # not reported by every version
            if latest:
                job["last_checkpoint"] = {
                    "id": latest["id"],
                    "completed_at_ms": latest.get("latest_ack_timestamp"),
                    "path": latest.get("external_path"),
                }
        report["job"] = job
    except (OSError, ValueError, KeyError) as exc:
        report["error"] = str(exc)
    return report


# --- Spark standalone ------------------------------------------------------------------------


def _spark_master_endpoint(settings: Settings) -> services.Endpoint | None:
    if not settings.spark_master.startswith("spark://"):
        return None
    host, _, port = settings.spark_master.removeprefix("spark://").rpartition(":")
    return services.Endpoint(host, int(port))


def _spark_to_start(settings: Settings) -> bool:
    endpoint = _spark_master_endpoint(settings)
    return endpoint is not None and endpoint.is_local()


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def ensure_spark(settings: Settings) -> dict[str, str]:
    """Start a standalone Master and one Worker for a ``spark://`` master on this host that does
    not answer; a remote master is used as it is."""
    endpoint = _spark_master_endpoint(settings)
    if endpoint is None:
        return {}
    if not endpoint.is_local():
        return {"spark": f"existing {settings.spark_master}"}
    home = spark_home()
    work = settings.state_dir / "spark-standalone"
    work.mkdir(parents=True, exist_ok=True)
    env = {
        "SPARK_HOME": str(home),
        "SPARK_LOG_DIR": str(settings.log_dir),
        "SPARK_WORKER_DIR": str(work / "work"),
        # The executors' Python: this environment, as in local[*] (flead_assets/resources).
        "PYSPARK_PYTHON": str(REPO_ROOT / ".venv" / "bin" / "python"),
    }
    spark_class = str(home / "bin" / "spark-class")
    outcome: dict[str, str] = {}
    if services.recorded_pid(settings, SPARK_MASTER) is None and not endpoint.answers():
        argv = [
            spark_class,
            "org.apache.spark.deploy.master.Master",
            "--host",
            endpoint.host,
            "--port",
            str(endpoint.port),
            "--webui-port",
            str(settings.spark_master_webui_port),
        ]
        services.spawn(settings, SPARK_MASTER, argv, env=env)
        outcome[SPARK_MASTER] = "started"
    else:
        outcome[SPARK_MASTER] = "running"
    services.wait_until(
        endpoint.answers, 120, "the Spark master", settings.log_dir / f"{SPARK_MASTER}.log"
    )
    if services.recorded_pid(settings, SPARK_WORKER) is None:
        argv = [
            spark_class,
            "org.apache.spark.deploy.worker.Worker",
            "--host",
            endpoint.host,
            "--cores",
            str(settings.spark_worker_cores),
            "--memory",
            settings.spark_worker_memory,
            "--work-dir",
            str(work / "work"),
            "--webui-port",
            "0",
            settings.spark_master,
        ]
        services.spawn(settings, SPARK_WORKER, argv, env=env)
        outcome[SPARK_WORKER] = "started"
    else:
        outcome[SPARK_WORKER] = "running"
    services.wait_until(
        lambda: len(spark_status(settings).get("workers", [])) >= 1,
        120,
        "a Spark worker",
        settings.log_dir / f"{SPARK_WORKER}.log",
    )
    return outcome


def stop_spark(settings: Settings) -> dict[str, bool]:
    return {name: services.stop_pid(settings, name) for name in (SPARK_WORKER, SPARK_MASTER)}


def spark_status(settings: Settings) -> dict[str, Any]:
    """The standalone master's own JSON view (its web UI's ``/json``): alive workers, cores."""
    endpoint = _spark_master_endpoint(settings)
    if endpoint is None:
        return {}
    report: dict[str, Any] = {
        "master": settings.spark_master,
        "healthy": endpoint.answers(),
        "pid": services.recorded_pid(settings, SPARK_MASTER),
    }
    try:
        url = f"http://{endpoint.host}:{settings.spark_master_webui_port}/json/"
        with urllib.request.urlopen(url, timeout=5) as response:
            view = json.loads(response.read())
        report["workers"] = [
            {"id": w["id"], "state": w["state"], "cores": w["cores"], "memory_mb": w["memory"]}
            for w in view.get("workers", [])
            if w.get("state") == "ALIVE"
        ]
        report["worker_pid"] = services.recorded_pid(settings, SPARK_WORKER)
    except (OSError, ValueError, KeyError) as exc:
        report["error"] = str(exc)
    return report


# --- the whole cluster -----------------------------------------------------------------------


def ensure_cluster(settings: Settings) -> dict[str, str]:
    """Flink and Spark of cluster mode (Kafka's brokers: :func:`flead.services.ensure_kafka`)."""
    return {**ensure_flink_cluster(settings), **ensure_spark(settings)}


def stop_cluster(settings: Settings) -> dict[str, bool]:
    stopped: dict[str, bool] = {}
    if not settings.flink_jobmanager:
        stopped |= stop_flink_cluster(settings)
    stopped |= stop_spark(settings)
    return stopped


def record_deploy(settings: Settings, clear: bool = False) -> None:
    """Remember (``flead up --cluster``) or forget (``flead down``) that the state folder's
    services run in cluster mode, for the commands that follow (flead/cli.py)."""
    path = settings.run_dir / "deploy"
    if clear:
        path.unlink(missing_ok=True)
        return
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{settings.deploy}\n")


def restart_process(settings: Settings, name: str) -> None:
    """Start one cluster process again (the supervisor's restart of a dead one)."""
    if name in (SPARK_MASTER, SPARK_WORKER):
        ensure_spark(settings)
    else:
        ensure_flink_cluster(settings)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if argv != ["run-job"]:
        print("usage: python -m flead.cluster run-job", file=sys.stderr)
        return 2
    return run_job(load_settings())


if __name__ == "__main__":
    sys.exit(main())
