"""Fixtures for the integration tests: the real PostgreSQL and Kafka broker.

They are started through the same code as ``flead up`` when they are not running and reused
when they are. Each test run works in its own database and on its own topics, so a developer's
running system is never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from flead import db, services
from flead.config import Settings, load_settings, namespaced


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def postgres(base_settings: Settings) -> Settings:
    services.ensure_postgres(base_settings)
    return base_settings


@pytest.fixture(scope="session")
def kafka_broker(base_settings: Settings) -> Settings:
    from flead import kafka

    services.ensure_kafka(base_settings)
    # Tests run pipelines in temporary state folders: they log in with this broker's users.
    kafka.export_credentials(base_settings)
    return base_settings


@contextlib.contextmanager
def fresh_database(settings: Settings) -> Iterator[str]:
    """A new, empty database on the real server, dropped afterwards. The administrator creates
    and drops it (the application role may not create databases); the application role owns
    it, as it owns the real one, and the returned URL logs in as the application role."""
    name = f"flead_test_{uuid.uuid4().hex[:10]}"
    url = db.create_database(settings, name)
    try:
        yield url
    finally:
        db.drop_database(settings, name)


@pytest.fixture
def empty_database(postgres: Settings) -> Iterator[str]:
    with fresh_database(postgres) as url:
        yield url


@pytest.fixture
def database(empty_database: str) -> str:
    db.apply_schema(empty_database)
    return empty_database


def isolated(base: Settings, database_url: str, **overrides: object) -> Settings:
    """``base`` with its own topics (created), consumer groups and database."""
    from flead import kafka

    test_settings = dataclasses.replace(
        namespaced(base, f"test-{uuid.uuid4().hex[:8]}"), database_url=database_url, **overrides
    )
    kafka.ensure_topics(test_settings)
    return test_settings


@pytest.fixture
def settings(kafka_broker: Settings, database: str) -> Settings:
    """Settings for one test: its own topics and its own migrated database."""
    return isolated(kafka_broker, database)


# --- the end-to-end pipeline, run once per session -----------------------------------------

PIPELINE_FLEET = {"num_devices": 300, "readings_per_device": 150, "seed": 11}
PIPELINE_HOURS = ["2025-11-07-00:00"]  # 150 readings 10 s apart: the first 25 minutes
MALFORMED = {
    "readings": [
        b'{"device_id": "device_0001", "timestamp": "2025-11-07T00:00:00Z", "data": "x"}',
        b"not json at all",
    ],
    "global_updates": [b'{"version": 0, "weights": []}'],
    "local_updates": [b'{"device_id": "device_0001", "model_version": 1, "weights": "none"}'],
    "anomalies": [b'{"device_id": "device_0001", "severity": "loud"}'],
}
# Valid for the contract, but sent after device_0002's single-channel readings: a device keeps
# the channels of its first reading, so the learner dead-letters it with the reason.
CHANNEL_CHANGE = (
    b'{"device_id": "device_0002", "timestamp": "2025-11-07T23:00:00Z",'
    b' "data": {"humidity": 40.5, "temperature": 21.0}}'
)


def table_counts(settings: Settings) -> tuple:
    from tests.streaming_harness import scalar, topic_count

    return (
        topic_count(settings, settings.topics.local_updates),
        topic_count(settings, settings.topics.anomalies),
        scalar(settings, "SELECT count(*) FROM federated_models"),
        scalar(settings, "SELECT count(*) FROM local_models"),
        scalar(settings, "SELECT count(*) FROM anomalies"),
    )


def wait_until_consumed(settings: Settings, timeout: float = 300) -> None:
    from tests.streaming_harness import group_lag, wait_for

    wait_for(
        lambda: group_lag(settings, settings.consumer_group("edge"), settings.topics.readings) == 0,
        timeout,
        "the Flink job to consume every reading",
        every=2.0,
    )


@pytest.fixture(scope="session")
def pipeline(kafka_broker: Settings, tmp_path_factory) -> Iterator[Settings]:
    """A synthetic fleet through the whole streaming tier (the real Flink job, FedAvg service
    and anomaly sink), with malformed messages on every input topic first; run once."""
    from flead import kafka
    from streaming.replay import replay
    from streaming.sources import synthetic_fleet
    from tests.streaming_harness import produce_keyed, produce_raw, settled, start, stop

    with fresh_database(kafka_broker) as url:
        db.apply_schema(url)
        settings = isolated(
            kafka_broker,
            url,
            state_dir=tmp_path_factory.mktemp("pipeline"),
            train_interval_s=5.0,
            checkpoint_interval_ms=2000,
            # Plain FedAvg without server momentum: every version is checkable from the rows
            # (tests/test_streaming.py: assert_versions_are_weighted_means).
            fedavg_strategy="fedavg",
            fedavg_server_momentum=0.0,
        )
        for topic, values in MALFORMED.items():
            produce_raw(settings, getattr(settings.topics, topic), values)
        replay(
            synthetic_fleet(**PIPELINE_FLEET),
            kafka.producer_config(settings, "replay"),
            settings.topics.readings,
            progress=False,
            batch=settings.replay_batch,
        )
        produce_keyed(settings, settings.topics.readings, b"device_0002", CHANNEL_CHANGE)
        for name in services.STREAMING_SERVICES:
            start(settings, name)
        try:
            wait_until_consumed(settings)
            settled(lambda: table_counts(settings), quiet_s=12, timeout=240, what="the pipeline")
            yield settings
        finally:
            for name in services.STREAMING_SERVICES:
                stop(settings, name)


@pytest.fixture(scope="session")
def filled_database_url(pipeline: Settings) -> str:
    """The pipeline's database after the Dagster assets ran on it with the real Spark: hourly
    analytics, every global version evaluated on held-out devices, the accuracy report."""
    from dagster import DagsterInstance, materialize
    from dagster._core.storage.tags import (
        ASSET_PARTITION_RANGE_END_TAG,
        ASSET_PARTITION_RANGE_START_TAG,
    )

    from flead_assets.assets.analytics import build_hourly_device_analytics
    from flead_assets.assets.evaluations import global_versions, model_evaluations
    from flead_assets.assets.reports import accuracy_report
    from flead_assets.resources import FleadResource
    from flead_assets.resources.spark import pyspark_resource

    resources = {
        "flead": FleadResource.for_settings(pipeline),
        "pyspark": pyspark_resource(pipeline),
    }
    hourly = build_hourly_device_analytics(pipeline)
    for hour in PIPELINE_HOURS:
        assert materialize([hourly], partition_key=hour, resources=resources).success
    with psycopg.connect(pipeline.database_url) as conn:
        newest = conn.execute("SELECT max(global_version) FROM federated_models").fetchone()[0]
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(global_versions.name, [str(v) for v in range(1, newest + 1)])
    tags = {ASSET_PARTITION_RANGE_START_TAG: "1", ASSET_PARTITION_RANGE_END_TAG: str(newest)}
    assert materialize(
        [model_evaluations, accuracy_report], instance=instance, resources=resources, tags=tags
    ).success
    return pipeline.database_url
