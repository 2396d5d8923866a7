"""What is running and what is stored: the data behind ``flead status``."""

from __future__ import annotations

from typing import Any

from flead import db, kafka, secrets, services
from flead.config import Settings, describe
from streaming.model.metrics import Confusion, newest_pooled

MANAGED_SERVICES = ("postgres", "kafka")


def _service_health(settings: Settings) -> dict[str, dict[str, Any]]:
    endpoints = {
        "postgres": services.postgres_endpoint(settings.database_url),
        "kafka": services.kafka_endpoint(settings),
    }
    health: dict[str, dict[str, Any]] = {}
    for name in MANAGED_SERVICES:
        endpoint = endpoints[name]
        health[name] = {
            "address": f"{endpoint.host}:{endpoint.port}",
            "healthy": endpoint.answers(),
            "pid": services.recorded_pid(settings, name),  # None when not started by FLEAD
            "log": str(settings.log_dir / f"{name}.log"),
        }
    if len(services.kafka_endpoints(settings)) > 1:
        # Every broker of a cluster; "kafka" above is the bootstrap's first address.
        for node, endpoint in enumerate(services.kafka_endpoints(settings)):
            name = services.kafka_node_name(settings, node)
            health[name] = {
                "address": f"{endpoint.host}:{endpoint.port}",
                "healthy": endpoint.answers(),
                "pid": services.recorded_pid(settings, name),
                "log": str(settings.log_dir / f"{name}.log"),
            }
    for name in services.STREAMING_SERVICES:
        pid = services.recorded_pid(settings, name)
        health[name] = {
            "address": "-",
            "healthy": pid is not None,
            "pid": pid,
            "log": str(settings.log_dir / f"{name}.log"),
        }
    from flead import orchestration

    health.update(orchestration.dagster_health(settings))
    _add_supervision(settings, health)
    return health


def _add_supervision(settings: Settings, health: dict[str, dict[str, Any]]) -> None:
    """Restarts counted by ``flead supervise`` for every service; for the streaming services
    their consumer lag, whether it keeps growing, and ``healthy`` false when stalled (lag with
    no committed progress): a live pid alone is not health."""
    from flead import supervision

    report = supervision.service_report(settings)
    own = report.pop(supervision.SUPERVISOR)
    health[supervision.SUPERVISOR] = {
        "address": "-",
        "healthy": own["alive"],
        "pid": own["pid"],
        "log": str(settings.log_dir / "supervisor.log"),
    }
    for name, info in health.items():
        seen = report.get(name, {})
        info["restarts"] = int(seen.get("restarts", 0))
        if name in services.STREAMING_SERVICES and own["alive"] and "lag" in seen:
            info |= {k: seen.get(k) for k in ("lag", "lag_growing", "stalled")}
            if seen.get("stalled"):
                info["healthy"] = False


def collect(settings: Settings, wire: bool = False) -> dict[str, Any]:
    """Service health, per-topic message counts and per-table row counts (and with ``wire``,
    :func:`wire_cost`); errors are reported in place so one dead service never hides the
    others."""
    report: dict[str, Any] = {"services": _service_health(settings)}
    if report["services"]["kafka"]["healthy"]:
        try:
            report["topics"] = kafka.topic_message_counts(settings)
        except Exception as exc:  # status must report, not crash
            report["topics"] = {"error": str(exc)}
    else:
        report["topics"] = {"error": "Kafka is not reachable"}
    if report["services"]["postgres"]["healthy"]:
        try:
            report["tables"] = db.table_row_counts(settings.database_url)
        except Exception as exc:
            report["tables"] = {"error": str(exc)}
    else:
        report["tables"] = {"error": "PostgreSQL is not reachable"}
    if "model_evaluation_summaries" in report["tables"]:
        report["evaluations"] = evaluation_coverage(settings)
    if wire:
        try:
            report["wire"] = wire_cost(settings)
        except Exception as exc:
            report["wire"] = {"error": str(exc)}
    if settings.deploy == "cluster":
        from flead import cluster

        report["flink"] = cluster.flink_status(settings)
        report["spark"] = cluster.spark_status(settings)
    report["settings"] = describe(settings)
    return redacted(report, settings)


def redacted(report: Any, settings: Settings) -> Any:
    """``report`` with every password replaced by ``***``: those of the settings' URLs and
    every secret of the environment and the state folder, wherever they appear (an error
    message quoting a URL included). Status output is pasted into issues and chat."""
    values = secrets.known_values(
        settings.state_dir,
        [settings.database_url, settings.dagster_database_url, settings.database_admin_url],
    )

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, str):
            return secrets.redact(value, values)
        return value

    return clean(report)


def evaluation_coverage(settings: Settings) -> dict[str, Any]:
    """How many global versions exist and how many have a held-out evaluation summary."""
    with db.connect(settings.database_url, connect_timeout=3) as conn:
        versions, evaluated, newest = conn.execute(
            "SELECT (SELECT count(*) FROM federated_models),"
            " (SELECT count(*) FROM model_evaluation_summaries s"
            "  JOIN federated_models f ON f.global_version = s.model_version),"
            " (SELECT max(global_version) FROM federated_models)"
        ).fetchone()
        latest = conn.execute(
            "SELECT model_version, accuracy, precision, recall, f1, mcc, baseline_accuracy"
            " FROM model_evaluation_summaries ORDER BY model_version DESC LIMIT 1"
        ).fetchone()
        by_version = {
            version: Confusion(tp, fp, tn, fn)
            for version, tp, fp, tn, fn in conn.execute(
                "SELECT model_version, tp, fp, tn, fn FROM prequential_evaluations"
            )
        }
    coverage: dict[str, Any] = {
        "global_versions": versions,
        "evaluated": evaluated,
        "newest_version": newest,
    }
    if latest:
        keys = ("version", "accuracy", "precision", "recall", "f1", "mcc", "baseline_accuracy")
        coverage["newest_evaluation"] = dict(zip(keys, latest, strict=True))
    # The newest version the devices have reported enough test-then-train readings for.
    enough = [v for v, counts in by_version.items() if counts.samples >= 100]
    if enough:
        counts = by_version[max(enough)]
        coverage["newest_prequential"] = {"version": max(enough), **counts.as_dict()}
    recent = newest_pooled(by_version)
    if recent is not None:
        first, last, pooled = recent
        coverage["recent_prequential"] = {"first_version": first, "last_version": last}
        coverage["recent_prequential"].update(pooled.as_dict())
    if by_version:  # every version's together: the figure `flead evaluate` calls prequential
        coverage["all_prequential"] = sum(by_version.values(), Confusion(0, 0, 0, 0)).as_dict()
    return coverage


def wire_cost(settings: Settings) -> dict[str, Any]:
    """What federation has put on the wire against the raw readings it replaces, counted as
    ``flead evaluate`` counts it: the bytes of every local round, plus every global version's
    bytes once per training device (each device receives each version), against the bytes of
    the readings topic."""
    topics = settings.topics
    sizes = kafka.topic_bytes(
        settings, [topics.readings, topics.local_updates, topics.global_updates]
    )
    with db.connect(settings.database_url, connect_timeout=3) as conn:
        devices = conn.execute("SELECT count(DISTINCT device_id) FROM local_models").fetchone()[0]
    updates, versions = sizes[topics.local_updates] or 0, sizes[topics.global_updates] or 0
    raw = sizes[topics.readings] or 0
    sent = updates + versions * devices
    return {
        "update_bytes": updates,
        "model_bytes": versions,
        "training_devices": devices,
        "raw_bytes": raw,
        "ratio": sent / raw if raw else None,
    }


def render(report: dict[str, Any]) -> str:
    lines = ["Services"]
    for name, info in report["services"].items():
        state = "up" if info["healthy"] else "DOWN"
        pid = f"pid {info['pid']}" if info["pid"] else "not started by flead"
        extra = f"  restarts {info['restarts']}" if info.get("restarts") else ""
        if info.get("lag") is not None:
            extra += f"  lag {info['lag']:,}" + (" growing" if info.get("lag_growing") else "")
            extra += "  STALLED" if info.get("stalled") else ""
        lines.append(f"  {name:<18} {state:<5} {info['address']:<22} {pid}{extra}")
    lines += _render_cluster(report)
    for title, key, unit in (("Topics", "topics", "messages"), ("Tables", "tables", "rows")):
        lines.append(title)
        section = report[key]
        if "error" in section:
            lines.append(f"  unavailable: {section['error']}")
            continue
        for name, count in section.items():
            shown = "missing" if count is None else f"{count:,} {unit}"
            lines.append(f"  {name:<28} {shown}")
    coverage = report.get("evaluations")
    if coverage:
        lines.append("Evaluations (held-out devices)")
        lines.append(
            f"  {coverage['evaluated']:,} of {coverage['global_versions']:,} global "
            "versions evaluated"
        )
        latest = coverage.get("newest_evaluation")
        if latest:
            lines.append(
                f"  newest evaluated v{latest['version']}: accuracy {latest['accuracy']:.3f}"
                f" (majority baseline {latest['baseline_accuracy']:.3f}), precision"
                f" {latest['precision']:.3f}, recall {latest['recall']:.3f}, F1 {latest['f1']:.3f}"
                f", MCC {latest['mcc'] or 0:.3f}"
            )
        preq = coverage.get("newest_prequential")
        if preq:
            lines.append(
                f"  prequential v{preq['version']} ({preq['samples']:,} readings of training"
                f" devices, scored before training): precision {preq['precision'] or 0:.3f},"
                f" recall {preq['recall'] or 0:.3f}, F1 {preq['f1'] or 0:.3f},"
                f" MCC {preq['mcc'] or 0:.3f}"
            )
        recent = coverage.get("recent_prequential")
        if recent and recent["first_version"] != recent["last_version"]:  # else: the line above
            lines.append(
                f"  prequential v{recent['first_version']}-v{recent['last_version']} together"
                f" ({recent['samples']:,} readings): precision {recent['precision']:.3f},"
                f" recall {recent['recall']:.3f}, F1 {recent['f1']:.3f}, MCC {recent['mcc']:.3f}"
            )
        every = coverage.get("all_prequential")
        if every and (not recent or every["samples"] != recent["samples"]):
            lines.append(
                f"  prequential, every version together ({every['samples']:,} readings):"
                f" precision {every['precision']:.3f}, recall {every['recall']:.3f},"
                f" F1 {every['f1']:.3f}, MCC {every['mcc']:.3f}"
            )
    lines += _render_wire(report.get("wire"))
    return "\n".join(lines)


def _render_wire(wire: dict[str, Any] | None) -> list[str]:
    if not wire:
        return []
    if "error" in wire:
        return ["Wire", f"  unavailable: {wire['error']}"]
    ratio = "no raw readings" if wire["ratio"] is None else f"{wire['ratio']:.2f}× the raw bytes"
    return [
        "Wire (what federation sent against the raw readings it replaces)",
        f"  local rounds {wire['update_bytes'] / 1e6:,.1f} MB + global versions"
        f" {wire['model_bytes'] / 1e6:,.1f} MB × {wire['training_devices']:,} training devices"
        f" vs raw readings {wire['raw_bytes'] / 1e6:,.1f} MB: {ratio}",
    ]


def _render_cluster(report: dict[str, Any]) -> list[str]:
    """Cluster mode: the JobManager, each TaskManager, the job and its last checkpoint; the
    Spark master and its workers."""
    flink = report.get("flink")
    if flink is None:
        return []
    jm = flink["jobmanager"]
    lines = ["Flink session cluster"]
    pid = f"pid {jm['pid']}" if jm["pid"] else "not started by flead"
    lines.append(
        f"  {'jobmanager':<18} {'up' if jm['healthy'] else 'DOWN':<5} {jm['address']:<22} {pid}"
    )
    for tm in flink.get("taskmanagers", []):
        lines.append(
            f"  {'taskmanager':<18} up    {tm['id']:<22} slots {tm['slots']}"
            f" ({tm['free_slots']} free)"
        )
    job = flink.get("job") or {}
    if job.get("id"):
        lines.append(f"  job {job.get('name', '?')} {job['id']}: {job.get('state', '?')}")
        last = job.get("last_checkpoint")
        if last:
            lines.append(
                f"  last completed checkpoint {last['id']} ({job['checkpoints_completed']}"
                f" completed): {last['path']}"
            )
        else:
            lines.append("  no completed checkpoint yet")
    elif jm["healthy"]:
        lines.append("  no job submitted by this state folder")
    if "error" in flink:
        lines.append(f"  unavailable: {flink['error']}")
    spark = report.get("spark") or {}
    if spark:
        state = "up" if spark["healthy"] else "DOWN"
        lines.append(f"Spark standalone  {state}  {spark['master']}")
        for worker in spark.get("workers", []):
            lines.append(
                f"  worker {worker['id']}: {worker['state']}, {worker['cores']} cores,"
                f" {worker['memory_mb']} MB"
            )
        if "error" in spark:
            lines.append(f"  unavailable: {spark['error']}")
    return lines
