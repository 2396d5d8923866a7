"""Sensors through ``build_sensor_context`` on ``instance_for_test``, against the real
PostgreSQL (and Kafka for the topic's runless materialization); the streaming health sensor
against a real FedAvg service process."""

from __future__ import annotations

import dataclasses
import json
import time

import psycopg
import pytest
from dagster import DagsterInstance, build_sensor_context, instance_for_test
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from flead.config import Settings
from flead_assets.assets.evaluations import global_versions
from flead_assets.assets.external import FEDERATED_MODELS
from flead_assets.definitions import build_defs
from flead_assets.resources import FleadResource
from flead_assets.resources.streaming import streaming_resources
from flead_assets.sensors.federated_models import evaluate as evaluate_versions
from flead_assets.sensors.streaming_health import evaluate as evaluate_health
from tests import dagster_fleet

pytestmark = pytest.mark.integration


def insert_versions(settings: Settings, versions: range) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        for v in versions:
            conn.execute(
                "INSERT INTO federated_models (global_version, aggregation_round, num_devices,"
                " accuracy, weights, bias, strategy) VALUES (%s, %s, 20, 0.9, %s, -1.0, 'fedavg')",
                (v, v, [0.1 * v, 0.2, -0.1, 0.05]),
            )


def tick(instance: DagsterInstance, flead: FleadResource, cursor: str | None, per_run: int = 500):
    context = build_sensor_context(instance=instance, cursor=cursor, resources={"flead": flead})
    result = evaluate_versions(context, flead, per_run)
    # What the daemon does with the result: add the partitions before launching runs.
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
    return result


def test_new_versions_become_partitions_and_one_run_per_tick(settings: Settings) -> None:
    flead = FleadResource.for_settings(settings)
    with instance_for_test() as instance:
        empty = tick(instance, flead, None)
        assert empty.run_requests == [] and empty.dynamic_partitions_requests == []
        assert empty.skip_reason is not None

        insert_versions(settings, range(1, 4))
        first = tick(instance, flead, empty.cursor)
        (request,) = first.run_requests
        assert request.run_key == "1-3"
        assert request.tags[ASSET_PARTITION_RANGE_START_TAG] == "1"
        assert request.tags[ASSET_PARTITION_RANGE_END_TAG] == "3"
        assert {k.to_user_string() for k in request.asset_selection} == {
            "model_evaluations",
            "model_evaluation_summaries",
            "accuracy_report",
        }
        assert instance.get_dynamic_partitions(global_versions.name) == ["1", "2", "3"]
        assert json.loads(first.cursor)["version"] == 3

        # Nothing new: no partition, no run, no event of an unchanged table.
        again = tick(instance, flead, first.cursor)
        assert again.run_requests == [] and again.dynamic_partitions_requests == []
        assert [e.asset_key.to_user_string() for e in again.asset_events] == []

        # One new version: exactly that partition, run_key = the version.
        insert_versions(settings, range(4, 5))
        single = tick(instance, flead, again.cursor)
        (request,) = single.run_requests
        assert (request.run_key, request.partition_key) == ("4", "4")
        assert instance.get_dynamic_partitions(global_versions.name) == ["1", "2", "3", "4"]
        assert [e.asset_key for e in single.asset_events] == [FEDERATED_MODELS]
        assert single.asset_events[0].metadata["dagster/row_count"].value == 4


def test_many_new_versions_are_split_into_capped_runs(settings: Settings) -> None:
    flead = FleadResource.for_settings(settings)
    insert_versions(settings, range(1, 26))
    with instance_for_test() as instance:
        result = tick(instance, flead, None, per_run=10)
        assert [r.run_key for r in result.run_requests] == ["1-10", "11-20", "21-25"]
        assert len(instance.get_dynamic_partitions(global_versions.name)) == 25
        assert tick(instance, flead, result.cursor, per_run=10).run_requests == []


def test_first_tick_reports_the_external_assets(settings: Settings) -> None:
    """Runless materializations of the streaming tables and of the raw topic."""
    flead = FleadResource.for_settings(settings)
    fleet = dagster_fleet.make_fleet()
    dagster_fleet.produce(settings, fleet)
    insert_versions(settings, range(1, 3))
    with instance_for_test() as instance:
        result = tick(instance, flead, None)
        events = {e.asset_key.to_user_string(): e for e in result.asset_events}
        assert set(events) == {"federated_models", "local_models", "anomalies", "edge_iiot_stream"}
        assert events["edge_iiot_stream"].metadata["messages"].value == len(fleet)
        assert events["federated_models"].metadata["latest"].value == "2"


def test_the_sensors_are_in_the_code_location(settings: Settings) -> None:
    defs = build_defs(settings)
    names = {s.name for s in defs.sensors}
    assert names == {"federated_models_sensor", "readings_sensor", "streaming_health_sensor"}
    assert {s.name for s in defs.schedules} == {"hourly_analytics_job_schedule"}


def test_health_sensor_reports_a_dead_service(settings: Settings, tmp_path) -> None:
    """A real FedAvg service (test topics, test database, its own state folder): the sensor
    reports it running, then dead once stopped; unchanged states are not reported again."""
    test_settings = dataclasses.replace(settings, state_dir=tmp_path / "state")
    flead = FleadResource.for_settings(test_settings)
    services = streaming_resources(flead)
    resources = [services["flink_job"], services["fedavg"], services["anomaly_sink"]]

    def health_tick(cursor):
        context = build_sensor_context(cursor=cursor)
        return evaluate_health(context, resources)

    first = health_tick(None)
    assert {(e.check_name, e.passed) for e in first.asset_events} == {
        ("flink_job_running", False),
        ("fedavg_service_running", False),
        ("anomaly_sink_running", False),
    }
    assert services["fedavg"].start() == "started"
    try:
        time.sleep(1.0)
        assert services["fedavg"].health().alive
        assert services["fedavg"].start() == "running"
        running = health_tick(first.cursor)
        assert [(e.check_name, e.passed) for e in running.asset_events] == [
            ("fedavg_service_running", True)
        ]
        assert health_tick(running.cursor).asset_events == []
    finally:
        assert services["fedavg"].stop()
    dead = health_tick(running.cursor)
    assert [(e.check_name, e.passed) for e in dead.asset_events] == [
        ("fedavg_service_running", False)
    ]
    assert "not running" in dead.skip_reason.skip_message
