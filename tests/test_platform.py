"""The platform against the real PostgreSQL and Kafka broker."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import psycopg
import pytest
from confluent_kafka import Consumer

from flead import db, kafka, services
from flead.config import Settings, to_env
from streaming import sources
from streaming.messages import decode_readings
from streaming.replay import replay

pytestmark = pytest.mark.integration

EXPECTED_TABLES = {
    "local_models",
    "federated_models",
    "anomalies",
    "model_evaluations",
    "model_evaluation_summaries",
    "hourly_device_analytics",
    "accuracy_reports",
}


def consume_all(settings: Settings, topic: str, expected: int, timeout: float = 60.0) -> list:
    consumer = Consumer(
        kafka.client_config(
            settings,
            "admin",
            **{
                "group.id": f"test-{topic}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([topic])
    messages = []
    try:
        deadline = time.monotonic() + timeout
        while len(messages) < expected and time.monotonic() < deadline:
            batch = consumer.consume(10_000, timeout=1.0)
            messages.extend(m for m in batch if m.error() is None)
        # Anything beyond `expected` would be a duplicate: give it a moment to show up.
        messages.extend(m for m in consumer.consume(10_000, timeout=2.0) if m.error() is None)
    finally:
        consumer.close()
    return messages


def test_schema_applies_twice_and_keeps_data(empty_database: str) -> None:
    first = db.apply_schema(empty_database)
    assert first == [p.name for p in db.migration_files()]
    with psycopg.connect(empty_database) as conn:
        conn.execute(
            "INSERT INTO federated_models (global_version, aggregation_round, num_devices,"
            " weights, bias, strategy) VALUES (1, 1, 20, ARRAY[0.5, -0.25], 0.1, 'fedavg')"
        )
    assert db.apply_schema(empty_database) == []
    counts = db.table_row_counts(empty_database)
    assert set(counts) >= EXPECTED_TABLES
    assert counts["federated_models"] == 1


def test_natural_keys_make_writes_idempotent(database: str) -> None:
    upsert = (
        "INSERT INTO local_models (device_id, model_version, global_version, samples_processed,"
        " weights) VALUES ('device_0001', 3, 1, 50, ARRAY[1.0]) ON CONFLICT DO NOTHING"
    )
    with psycopg.connect(database) as conn:
        conn.execute(upsert)
        conn.execute(upsert)
        assert conn.execute("SELECT count(*) FROM local_models").fetchone()[0] == 1


def test_replay_puts_exactly_n_messages_in_event_time_order_per_device(settings: Settings) -> None:
    readings = list(sources.synthetic_fleet(num_devices=37, readings_per_device=40, seed=7))
    result = replay(
        readings,
        kafka.producer_config(settings, "replay"),
        settings.topics.readings,
        progress=False,
    )
    assert result.readings == len(readings) == 37 * 40

    messages = consume_all(settings, settings.topics.readings, len(readings))
    assert len(messages) == len(readings)
    per_device: dict[str, list] = defaultdict(list)
    for message in messages:
        [reading] = decode_readings(message.value())
        assert message.key().decode() == reading.device_id
        assert message.timestamp()[1] == reading.timestamp_ms
        per_device[reading.device_id].append(reading)
    assert len(per_device) == 37
    for device_readings in per_device.values():
        times = [r.timestamp for r in device_readings]
        assert times == sorted(times)
    assert sorted(per_device["device_0000"], key=lambda r: r.timestamp) == [
        r for r in readings if r.device_id == "device_0000"
    ]


def test_fixed_rate_replay_delivers_everything(settings: Settings) -> None:
    readings = list(sources.synthetic_fleet(num_devices=5, readings_per_device=20, seed=3))
    result = replay(
        readings,
        kafka.producer_config(settings, "replay"),
        settings.topics.readings,
        rate=2_000,
        progress=False,
    )
    assert result.readings == 100
    assert kafka.topic_message_counts(settings, [settings.topics.readings]) == {
        settings.topics.readings: 100
    }


def run_flead(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flead.cli", *args],
        env={**os.environ, **to_env(settings)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_replays_a_csv_counting_bad_rows(settings: Settings, tmp_path) -> None:
    path = tmp_path / "readings.csv"
    path.write_text(
        "timestamp,device_id,value,label\n"
        "2025-11-07T10:00:00Z,pump_1,1.5,0\n"
        "2025-11-07T10:00:05Z,pump_2,2.5,1\n"
        "not-a-time,pump_1,1.0,0\n"
        "2025-11-07T10:00:10Z,pump_1,oops,0\n"
        "2025-11-07T10:00:15Z,,3.0,0\n"
        "2025-11-07T10:00:20Z,pump_1,1.7,\n"
    )
    done = run_flead(
        settings, "replay", "--source", "csv", "--path", str(path), "--quiet", "--batch", "1"
    )
    assert done.returncode == 0, done.stderr
    assert "Replayed 3 readings" in done.stdout
    assert "bad rows skipped: 3" in done.stdout
    messages = consume_all(settings, settings.topics.readings, 3)
    received = sorted((m.key().decode(), str(json.loads(m.value()).get("label"))) for m in messages)
    assert received == [("pump_1", "0"), ("pump_1", "None"), ("pump_2", "1")]


def test_status_json_reports_services_topics_and_tables(settings: Settings) -> None:
    readings = list(sources.synthetic_fleet(num_devices=3, readings_per_device=10, seed=1))
    replay(
        readings,
        kafka.producer_config(settings, "replay"),
        settings.topics.readings,
        progress=False,
    )
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            "INSERT INTO anomalies (device_id, value, z_score, severity, timestamp)"
            " VALUES ('device_0001', 9.5, 3.1, 'warning', now())"
        )

    done = run_flead(settings, "status", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["services"]["kafka"]["healthy"] and report["services"]["postgres"]["healthy"]
    assert report["topics"][settings.topics.readings] == 30
    assert report["topics"][settings.topics.anomalies] == 0
    assert report["tables"]["anomalies"] == 1
    assert set(report["tables"]) >= EXPECTED_TABLES


def test_status_pools_the_newest_versions_prequential_counts(settings: Settings) -> None:
    # v1-v4 with 2,000 / 1,000 / 3,000 / 1,000 readings (tp, fp, tn, fn). Newest first: v4
    # (none newer), v3 (1,000 newer), v2 (4,000 newer) count; v1 does not (5,000 newer).
    rows = [(1, 9, 9, 1973, 9), (2, 8, 2, 980, 10), (3, 30, 10, 2940, 20), (4, 12, 4, 980, 4)]
    with psycopg.connect(settings.database_url) as conn:
        for row in rows:
            conn.execute("INSERT INTO prequential_evaluations VALUES (%s, %s, %s, %s, %s)", row)
    done = run_flead(settings, "status", "--json")
    assert done.returncode == 0, done.stderr
    recent = json.loads(done.stdout)["evaluations"]["recent_prequential"]
    tp, fp, tn, fn = 8 + 30 + 12, 2 + 10 + 4, 980 + 2940 + 980, 10 + 20 + 4  # v2-v4
    assert (recent["first_version"], recent["last_version"]) == (2, 4)
    assert (recent["tp"], recent["fp"], recent["tn"], recent["fn"]) == (tp, fp, tn, fn)
    assert recent["samples"] == 5_000
    assert recent["f1"] == pytest.approx(2 * 50 / (2 * 50 + 16 + 34))
    mcc = (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    assert recent["mcc"] == pytest.approx(mcc)
    every = json.loads(done.stdout)["evaluations"]["all_prequential"]
    assert (every["tp"], every["fp"], every["tn"], every["fn"]) == (59, 25, 6873, 43)
    text = run_flead(settings, "status").stdout
    assert "prequential v2-v4 together (5,000 readings)" in text
    assert "prequential, every version together (7,000 readings)" in text


def test_status_wire_counts_every_byte_of_rounds_versions_and_readings(settings: Settings) -> None:
    """Oracle: the byte counts of the messages as this test produced them; versions count once
    per training device (distinct devices of ``local_models``)."""
    import random

    from confluent_kafka import Producer

    rng = random.Random(5)
    producer = Producer(kafka.producer_config(settings, "admin"))
    sent: dict[str, int] = defaultdict(int)
    topics = settings.topics
    for topic, count in (
        (topics.readings, 40),
        (topics.local_updates, 12),
        (topics.global_updates, 3),
    ):
        for i in range(count):
            key = f"k{i}".encode() if i % 3 else None
            value = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
            producer.produce(topic, value, key=key)
            sent[topic] += len(value) + len(key or b"")
    assert producer.flush(30) == 0
    with psycopg.connect(settings.database_url) as conn:
        for device in ("d1", "d2", "d1"):  # two training devices
            conn.execute(
                "INSERT INTO local_models (device_id, model_version, global_version, accuracy,"
                " loss, samples_processed, weights) VALUES (%s, %s, 0, 0.9, 0.1, 50, '{}')",
                (device, rng.randrange(1, 10**6)),
            )
    done = run_flead(settings, "status", "--json", "--wire")
    assert done.returncode == 0, done.stderr
    wire = json.loads(done.stdout)["wire"]
    assert wire == {
        "update_bytes": sent[topics.local_updates],
        "model_bytes": sent[topics.global_updates],
        "training_devices": 2,
        "raw_bytes": sent[topics.readings],
        "ratio": (sent[topics.local_updates] + 2 * sent[topics.global_updates])
        / sent[topics.readings],
    }
    assert kafka.topic_bytes(settings, ["no-such-topic"]) == {"no-such-topic": None}


def test_status_reports_a_dead_broker_without_crashing(settings: Settings) -> None:
    import dataclasses

    from flead import status

    dead = dataclasses.replace(settings, kafka_bootstrap="127.0.0.1:1")
    report = status.collect(dead)
    assert report["services"]["kafka"]["healthy"] is False
    assert "error" in report["topics"]
    assert report["services"]["postgres"]["healthy"] is True


def test_batched_replay_keeps_every_reading_in_order(settings: Settings) -> None:
    readings = list(sources.synthetic_fleet(num_devices=12, readings_per_device=45, seed=5))
    replay(
        readings,
        kafka.producer_config(settings, "replay"),
        settings.topics.readings,
        progress=False,
        batch=20,
    )
    expected_messages = 12 * 3  # 20 + 20 + 5 readings per device
    messages = consume_all(settings, settings.topics.readings, expected_messages)
    assert len(messages) == expected_messages
    received = [r for m in messages for r in decode_readings(m.value())]
    assert sorted(received, key=lambda r: (r.device_id, r.timestamp)) == sorted(
        readings, key=lambda r: (r.device_id, r.timestamp)
    )
    for message in messages:
        batch = decode_readings(message.value())
        assert {r.device_id for r in batch} == {message.key().decode()}
        assert message.timestamp()[1] == batch[-1].timestamp_ms


def test_kafka_cluster_ids_never_look_like_an_option() -> None:
    # 1 in 64 random ids starts with "-"; 2,000 draws miss that with probability (63/64)^2000.
    ids = [services.new_kafka_cluster_id() for _ in range(2_000)]
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 and base64.urlsafe_b64decode(i + "==") for i in ids)
