"""Test data for the Dagster tests: a small labelled fleet in a test topic and real global
versions in a test database, made the way the streaming tier makes them (the replay producer;
local SGD rounds combined and stored by the FedAvg service's own functions)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import psycopg
from confluent_kafka import Producer

from flead import kafka
from flead.config import Settings
from streaming import edge, fedavg, model
from streaming.messages import GlobalUpdate, LocalUpdate, encode_reading
from streaming.replay import replay
from streaming.sources import FleetArrays, fleet_readings, synthetic_fleet_arrays

FLEET = {"num_devices": 160, "readings_per_device": 60, "anomaly_rate": 0.04, "seed": 7}
HOLDOUT_FRACTION = 0.25  # more held-out samples from a small fleet than the default 0.1
FIRST_HOUR = "2025-11-07-00:00"  # the fleet starts at 2025-11-07T00:00Z, 10 s apart: 10 min


def fleet_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, holdout_fraction=HOLDOUT_FRACTION)


def make_fleet() -> FleetArrays:
    return synthetic_fleet_arrays(**FLEET)


def produce(settings: Settings, arrays: FleetArrays, batch: int = 1) -> int:
    """The fleet into the readings topic; ``batch`` > 1 uses the batched message form."""
    result = replay(
        fleet_readings(arrays),
        kafka.producer_config(settings),
        settings.topics.readings,
        progress=False,
        batch=batch,
    )
    return result.readings


def produce_noise(settings: Settings, arrays: FleetArrays) -> int:
    """Messages every reader must skip or de-duplicate: broken JSON, contract violations, and
    a replayed copy of a real reading. Returns how many were sent."""
    producer = Producer(kafka.producer_config(settings))
    first = next(fleet_readings(arrays))
    payloads = [
        b"not json",
        b'{"device_id": "device_x", "timestamp": "2025-11-07T00:01:00.000Z", "data": 1,'
        b' "label": 2}',
        b'{"device_id": "", "timestamp": "2025-11-07T00:01:00.000Z", "data": 1}',
        b'{"device_id": "device_x", "timestamp": "yesterday", "data": 1}',
        b'{"device_id": "device_x", "timestamp": "2025-11-07T00:01:00.000Z", "data": "1"}',
        encode_reading(first),  # the same reading again: counted once
    ]
    for payload in payloads:
        producer.produce(
            settings.topics.readings, payload, key=b"noise", timestamp=first.timestamp_ms
        )
    assert producer.flush(30) == 0
    return len(payloads)


def device_series(arrays: FleetArrays) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """device → (timestamps ms, values, labels), time-ordered (the arrays are in event order)."""
    out = {}
    for index, device in enumerate(arrays.device_ids):
        mask = arrays.device == index
        out[device] = (arrays.timestamp_ms[mask], arrays.value[mask], arrays.label[mask])
    return out


def make_versions(settings: Settings, arrays: FleetArrays, count: int, per_version: int = 20):
    """``count`` global versions, each FedAvg of ``per_version`` training devices' SGD rounds
    on their own features, stored with ``fedavg.store_version`` like the service does."""
    series = device_series(arrays)
    training = [
        d
        for d in arrays.device_ids
        if not edge.is_held_out(d, settings.holdout_fraction, settings.seed)
    ]
    rounds: dict[str, int] = {}
    current: GlobalUpdate | None = None
    config = fedavg.FedAvgConfig(min_devices=per_version)
    made = []
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        for version in range(1, count + 1):
            updates = []
            for i in range(per_version):
                device = training[((version - 1) * per_version + i) % len(training)]
                _, values, labels = series[device]
                X = model.series_features(values)[model.WARMUP :]
                y = labels[model.WARMUP :].astype(np.int64)
                start = (
                    model.LinearModel(np.asarray(current.weights), current.bias)
                    if current
                    else model.LinearModel.zeros(model.feature_count())
                )
                trained, metrics = model.sgd_round(start, X, y, seed=version * 1000 + i)
                rounds[device] = rounds.get(device, 0) + 1
                updates.append(
                    LocalUpdate(
                        device_id=device,
                        model_version=rounds[device],
                        base_global_version=current.version if current else 0,
                        weights=tuple(float(w) for w in trained.weights),
                        bias=float(trained.bias),
                        accuracy=metrics.train_accuracy,
                        loss=metrics.train_loss,
                        samples_processed=metrics.samples,
                        timestamp=datetime.now(UTC),
                    )
                )
            combined, weights = fedavg.combine(updates, current, config)
            current = GlobalUpdate(
                version=version,
                aggregation_round=version,
                weights=tuple(float(w) for w in combined.weights),
                bias=float(combined.bias),
                accuracy=float(np.mean([u.accuracy for u in updates])),
                num_devices=per_version,
                strategy="fedavg",
                timestamp=datetime.now(UTC),
            )
            fedavg.store_version(conn, current, updates, weights)
            made.append(current)
    return made


def expected_evaluation(settings: Settings, arrays: FleetArrays, version: GlobalUpdate) -> dict:
    """The summary of one version computed straight from the generated arrays with numpy:
    no Kafka, no Spark, none of flead_assets' code."""
    linear = model.LinearModel(np.asarray(version.weights), version.bias)
    actual, predicted = [], []
    for device, (_, values, labels) in device_series(arrays).items():
        if not edge.is_held_out(device, settings.holdout_fraction, settings.seed):
            continue
        X = model.series_features(values)[model.WARMUP :]
        actual.append(labels[model.WARMUP :].astype(np.int64))
        predicted.append(model.predict(linear, X))
    y, p = np.concatenate(actual), np.concatenate(predicted)
    counts = model.confusion(y, p)
    return {**counts.as_dict(), "baseline_accuracy": model.majority_baseline(y).accuracy}


def expected_hourly(arrays: FleetArrays) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "device_id": np.asarray(arrays.device_ids)[arrays.device],
            "hour": pd.to_datetime(arrays.timestamp_ms, unit="ms", utc=True).floor("h"),
            "value": arrays.value,
            "label": arrays.label,
        }
    )
    return (
        frame.groupby(["device_id", "hour"])
        .agg(
            readings=("value", "size"),
            mean=("value", "mean"),
            std=("value", "std"),
            min=("value", "min"),
            max=("value", "max"),
            anomaly_rate=("label", "mean"),
        )
        .reset_index()
    )
