"""Dagster as it runs for `make run`: the webserver and daemon started by
``flead.orchestration.ensure_dagster`` (their own state folder, instance database, app database
and topics), the sensor-triggered evaluation of every global version, the backfill command,
and the asset graph in headless Chromium (screenshot kept in test-artifacts/).
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from dagster import DagsterRunStatus, RunsFilter

from flead import db, kafka, orchestration
from flead.config import REPO_ROOT, Settings, namespaced
from flead_assets import backfill
from flead_assets.assets.dashboards import DASHBOARDS, dashboard_key
from tests import dagster_fleet

pytestmark = pytest.mark.integration

ARTIFACTS = REPO_ROOT / "test-artifacts"
GROUPS = ("streaming", "analytics", "evaluation", "dashboards")
ASSETS = [
    "edge_iiot_stream",
    "anomalies",
    "local_models",
    "federated_models",
    "hourly_device_analytics",
    "model_evaluations",
    "model_evaluation_summaries",
    "accuracy_report",
    *(dashboard_key(uid).to_user_string() for uid in DASHBOARDS),
]
VERSIONS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _database(base: Settings, name: str) -> str:
    return urlsplit(base.database_url)._replace(path=f"/{name}").geturl()


@pytest.fixture(scope="module")
def platform(kafka_broker: Settings, postgres: Settings, tmp_path_factory) -> Iterator[tuple]:
    """A whole Dagster deployment of its own, with a fleet and VERSIONS global versions in
    place before the daemon's first sensor tick."""
    suffix = uuid.uuid4().hex[:8]
    app_db, dagster_db = f"flead_test_{suffix}", f"flead_test_dagster_{suffix}"
    for name in (app_db, dagster_db):
        db.create_database(kafka_broker, name)  # as the administrator, owned by the app role
    state = tmp_path_factory.mktemp("dagster-state")
    (state / "jars").symlink_to(kafka_broker.jars_dir)  # Spark's Kafka source
    settings = dataclasses.replace(
        namespaced(kafka_broker, f"test-{suffix}"),  # own topics and consumer groups
        database_url=_database(kafka_broker, app_db),
        dagster_database_url=_database(kafka_broker, dagster_db),
        state_dir=state,
        dagster_port=free_port(),
        evaluation_sensor_interval_s=5,
        holdout_fraction=dagster_fleet.HOLDOUT_FRACTION,
        detector=dagster_fleet.DETECTOR,
    )
    db.apply_schema(settings.database_url)
    kafka.ensure_topics(settings)
    fleet = dagster_fleet.make_fleet()
    dagster_fleet.produce(settings, fleet)
    versions = dagster_fleet.make_versions(settings, fleet, VERSIONS)
    started = orchestration.ensure_dagster(settings)
    try:
        yield settings, fleet, versions, started
    finally:
        stopped = orchestration.stop_dagster(settings)
        assert stopped == {"dagster-daemon": True, "dagster-webserver": True}
        for name in (app_db, dagster_db):
            db.drop_database(kafka_broker, name)
        kafka.admin(settings).delete_topics(settings.topics.all())


def wait_for(predicate, timeout: float, what: str, settings: Settings):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2.0)
    daemon_log = (settings.log_dir / "dagster-daemon.log").read_text()[-4000:]
    pytest.fail(f"{what} not within {timeout:.0f} s; daemon log tail:\n{daemon_log}")


def scalar(settings: Settings, sql: str):
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute(sql).fetchone()[0]


def test_ensure_dagster_starts_once_and_renders_the_instance(platform) -> None:
    settings, _, _, started = platform
    assert started == {"dagster-webserver": "started", "dagster-daemon": "started"}
    assert orchestration.ensure_dagster(settings) == {
        "dagster-webserver": "running",
        "dagster-daemon": "running",
    }
    assert orchestration.webserver_healthy(settings)
    rendered = (settings.dagster_home / "dagster.yaml").read_text()
    assert orchestration.sqlalchemy_url(settings.dagster_database_url) in rendered
    health = orchestration.dagster_health(settings)
    assert all(h["healthy"] and h["pid"] for h in health.values())


def test_every_version_is_evaluated_by_a_sensor_run(platform) -> None:
    """End to end: the daemon's sensor sees the versions, adds their partitions, launches one
    run over them; the run's summaries match the fleet, and the report follows."""
    settings, fleet, versions, _ = platform
    wait_for(
        lambda: scalar(settings, "SELECT count(*) FROM accuracy_reports") == VERSIONS,
        300,
        "accuracy_reports for every version",
        settings,
    )
    assert scalar(settings, "SELECT count(*) FROM model_evaluation_summaries") == VERSIONS
    with backfill.instance(settings) as instance:

        def sensor_runs() -> list:
            runs = instance.get_runs(
                filters=RunsFilter(tags={"dagster/sensor_name": "federated_models_sensor"})
            )
            return [r.status for r in runs] if all(r.is_finished for r in runs) else []

        assert wait_for(sensor_runs, 60, "the sensor's run to finish", settings) == [
            DagsterRunStatus.SUCCESS
        ]
        assert instance.get_dynamic_partitions("global_versions") == ["1", "2", "3", "4"]
    expected = dagster_fleet.expected_evaluation(settings, fleet, versions[-1])
    assert scalar(
        settings, f"SELECT f1 FROM model_evaluation_summaries WHERE model_version = {VERSIONS}"
    ) == pytest.approx(expected["f1"], abs=1e-12)


def test_replayed_hours_get_hourly_analytics(platform) -> None:
    settings, fleet, _, _ = platform
    wait_for(
        lambda: scalar(settings, "SELECT sum(readings) FROM hourly_device_analytics")
        == fleet.channel_readings(),
        300,
        "hourly analytics of the replayed readings",
        settings,
    )


def test_backfill_command_evaluates_all_versions_in_one_run(platform) -> None:
    settings, _, _, _ = platform
    before = scalar(settings, "SELECT max(created_at) FROM model_evaluation_summaries")
    outcome = orchestration.backfill_evaluations(settings, wait=True)
    assert outcome["versions"] == VERSIONS
    assert outcome["status"] == "COMPLETED_SUCCESS", outcome
    assert scalar(settings, "SELECT count(*) FROM model_evaluation_summaries") == VERSIONS
    assert scalar(settings, "SELECT min(created_at) FROM model_evaluation_summaries") > before
    with backfill.instance(settings) as instance:
        runs = instance.get_runs(
            filters=RunsFilter(tags={"dagster/backfill": outcome["backfill_id"]})
        )
    evaluation_runs = [
        r
        for r in runs
        if "model_evaluations" in {k.to_user_string() for k in r.asset_selection or []}
    ]
    assert len(evaluation_runs) == 1  # BackfillPolicy.single_run: one Spark run for all


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_asset_graph_shows_every_asset_in_chromium(platform, tmp_path: Path) -> None:
    settings, _, _, _ = platform
    expanded = ",".join(
        f"{prefix}:{group}"
        for group in GROUPS
        for prefix in ("__repository__@flead_assets", "global@global")
    )
    url = f"{settings.dagster_url}/asset-groups?expanded={expanded}"
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "dagster-asset-graph.png"
    common = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--window-size=2400,1800",
        "--virtual-time-budget=30000",
    ]
    dom = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True
    ).stdout
    subprocess.run(
        [*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True
    )
    missing = [name for name in ASSETS if f">{name}<" not in dom]
    assert not missing, f"not on the asset graph: {missing}"
    assert screenshot.stat().st_size > 50_000
