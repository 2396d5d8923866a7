"""Dagster on this machine: the webserver and the daemon as local services, and backfills.

``ensure_dagster`` copies ``dagster.yaml`` into ``DAGSTER_HOME`` (``<state>/dagster``), then
starts ``dagster-webserver`` and ``dagster-daemon`` with pid files like every other service
(``services.spawn``), each with the ``FLEAD_*`` variables of the settings it was given, so the
code location and every run it launches see the same settings. ``stop_dagster`` stops exactly
those pids.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from flead import services
from flead.config import REPO_ROOT, Settings, to_env

DAGSTER_SERVICES = ("dagster-webserver", "dagster-daemon")


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def dagster_env(settings: Settings) -> dict[str, str]:
    return {**to_env(settings), "DAGSTER_HOME": str(settings.dagster_home)}


def sqlalchemy_url(url: str) -> str:
    """``url`` with the psycopg2 driver named: SQLAlchemy 2.1 maps a bare ``postgresql://`` to
    psycopg 3, on which dagster-postgres's ``NOTIFY run_events, :id`` is a syntax error."""
    scheme, _, rest = url.partition("://")
    return f"postgresql+psycopg2://{rest}" if scheme in {"postgresql", "postgres"} else url


def render_instance_config(settings: Settings) -> str:
    """The repository's dagster.yaml with the instance storage of ``settings``."""
    import yaml  # a dependency of dagster

    config = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    config["storage"]["postgres"]["postgres_url"] = sqlalchemy_url(settings.dagster_database_url)
    header = "# Rendered by flead.orchestration from the repository's dagster.yaml; do not edit.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def prepare_home(settings: Settings) -> Path:
    """DAGSTER_HOME (``<state>/dagster``) with the rendered dagster.yaml."""
    home = settings.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    path.write_text(render_instance_config(settings))
    path.chmod(0o600)  # it holds the Dagster database's password
    return home


def dagster_commands(settings: Settings) -> dict[str, list[str]]:
    workspace = str(REPO_ROOT / "workspace.yaml")
    return {
        "dagster-webserver": [
            _bin("dagster-webserver"),
            "-w",
            workspace,
            "-h",
            settings.dagster_host,
            "-p",
            str(settings.dagster_port),
        ],
        "dagster-daemon": [_bin("dagster-daemon"), "run", "-w", workspace],
    }


def webserver_healthy(settings: Settings, timeout: float = 2.0) -> bool:
    """The webserver answers its info endpoint (a bound port alone could be anything)."""
    try:
        with urllib.request.urlopen(f"{settings.dagster_url}/server_info", timeout=timeout) as r:
            return r.status == 200 and "dagster_webserver_version" in r.read().decode()
    except (OSError, urllib.error.URLError, ValueError):
        return False


def ensure_dagster(settings: Settings, timeout: float = 120.0) -> dict[str, str]:
    """Start the Dagster webserver and daemon unless they are running; wait for the UI."""
    prepare_home(settings)
    env = dagster_env(settings)
    outcome: dict[str, str] = {}
    for name, argv in dagster_commands(settings).items():
        if services.recorded_pid(settings, name) is not None:
            outcome[name] = "running"
            continue
        if name == "dagster-webserver" and webserver_healthy(settings):
            outcome[name] = "reused"  # someone else's webserver on this address
            continue
        services.spawn(settings, name, argv, env=env)
        outcome[name] = "started"
    if outcome["dagster-webserver"] == "started":
        services.wait_until(
            lambda: webserver_healthy(settings),
            timeout,
            f"the Dagster webserver at {settings.dagster_url}",
            settings.log_dir / "dagster-webserver.log",
        )
    return outcome


def stop_dagster(settings: Settings) -> dict[str, bool]:
    """Stop the daemon first (it launches runs), then the webserver."""
    return {
        name: services.stop_pid(settings, name, timeout=30) for name in reversed(DAGSTER_SERVICES)
    }


def dagster_health(settings: Settings) -> dict[str, dict[str, Any]]:
    """For ``flead status``: each Dagster process's pid and whether it is healthy."""
    webserver_pid = services.recorded_pid(settings, "dagster-webserver")
    daemon_pid = services.recorded_pid(settings, "dagster-daemon")
    return {
        "dagster-webserver": {
            "address": f"{settings.dagster_host}:{settings.dagster_port}",
            "healthy": webserver_healthy(settings),
            "pid": webserver_pid,
            "log": str(settings.log_dir / "dagster-webserver.log"),
        },
        "dagster-daemon": {
            "address": "-",
            "healthy": daemon_pid is not None,
            "pid": daemon_pid,
            "log": str(settings.log_dir / "dagster-daemon.log"),
        },
    }


# --- the streaming services, one at a time (for Dagster's resources) ------------------------


def start_streaming_service(settings: Settings, name: str) -> str:
    """Start one streaming service (``flink-job``, ``fedavg`` or ``anomaly-sink``) with
    ``settings`` unless its recorded pid is alive; "running" or "started"."""
    if name not in services.STREAMING_SERVICES:
        raise ValueError(
            f"unknown streaming service {name!r}; known: {', '.join(services.STREAMING_SERVICES)}"
        )
    if services.recorded_pid(settings, name) is not None:
        return "running"
    services.start_streaming(settings, name)
    return "started"


# --- backfills -------------------------------------------------------------------------------


def _graphql(settings: Settings, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{settings.dagster_url}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = json.loads(response.read())
    if payload.get("errors"):
        raise RuntimeError(f"Dagster GraphQL error: {payload['errors']}")
    return payload["data"]


_LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on PartitionSetNotFoundError { message }
    ... on UnauthorizedError { message }
    ... on RunConflict { message }
    ... on ConflictingExecutionParamsError { message }
    ... on PresetNotFoundError { message }
    ... on InvalidStepError { invalidStepKey }
    ... on InvalidOutputError { invalidOutputName }
    ... on NoModeProvidedError { message }
  }
}
"""


def _require_webserver(settings: Settings) -> None:
    if not webserver_healthy(settings):
        raise services.ServiceError(
            f"the Dagster webserver at {settings.dagster_url} does not answer; `make run` (or"
            " `flead up`) starts it and the daemon"
        )


def launch_backfill(settings: Settings, params: dict[str, Any], wait: bool) -> dict[str, Any]:
    """Launch an asset backfill through the webserver; the daemon executes it."""
    result = _graphql(settings, _LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
    if result["__typename"] != "LaunchBackfillSuccess":
        raise RuntimeError(f"backfill not launched: {result}")
    backfill_id = result["backfillId"]
    outcome: dict[str, Any] = {
        "backfill_id": backfill_id,
        "url": f"{settings.dagster_url}/runs/b/{backfill_id}",
    }
    if wait:
        outcome["status"] = wait_for_backfill(settings, backfill_id)
    return outcome


def backfill_evaluations(
    settings: Settings, versions: list[int] | None = None, wait: bool = False
) -> dict[str, Any]:
    """Evaluate historical global versions (all of ``federated_models`` by default) through
    the running Dagster daemon, as one backfill that the UI lists.

    The versions become dynamic partitions first (the sensor would add them too); the backfill
    selects ``model_evaluations`` and its summary table, and ``accuracy_report`` after them.
    ``BackfillPolicy.single_run`` makes each contiguous range of versions one run: one Spark
    session and one read of the held-out readings for all of them.
    """
    from flead_assets import backfill

    _require_webserver(settings)
    keys = backfill.register_versions(settings, versions)
    if not keys:
        return {"versions": 0, "backfill_id": None}
    outcome = launch_backfill(settings, backfill.evaluation_params(settings, keys), wait)
    return {"versions": len(keys), "first": keys[0], "last": keys[-1], **outcome}


def backfill_analytics(
    settings: Settings, first_hour: str, last_hour: str, wait: bool = False
) -> dict[str, Any]:
    """``hourly_device_analytics`` for the hours ``first_hour``..``last_hour`` (partition keys,
    ``YYYY-MM-DD-HH:00``, UTC) as one backfill: one Spark run reads the range once."""
    from flead_assets import backfill

    _require_webserver(settings)
    params = backfill.analytics_params(first_hour, last_hour)
    return {"hours": f"{first_hour}…{last_hour}", **launch_backfill(settings, params, wait)}


_BACKFILL_STATUS = """
query($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status }
    ... on PythonError { message }
  }
}
"""


def wait_for_backfill(settings: Settings, backfill_id: str, timeout: float = 3600.0) -> str:
    deadline = time.monotonic() + timeout
    status = "REQUESTED"
    while time.monotonic() < deadline:
        data = _graphql(settings, _BACKFILL_STATUS, {"id": backfill_id})
        status = data["partitionBackfillOrError"].get("status", status)
        if status in {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}:
            return status
        time.sleep(2.0)
    return status
