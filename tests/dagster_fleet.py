"""Test data for the Dagster tests: a small labelled fleet in a test topic (univariate devices
and a few with named channels) and real global versions in a test database, made the way the
streaming tier makes them (the replay producer; the device learner's rounds combined by the
federation round and stored with the FedAvg service's own function)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import psycopg
from confluent_kafka import Producer

from flead import kafka
from flead.config import Settings
from streaming import evaluate, fedavg, learner
from streaming.federation import Federation, FederationConfig, Version
from streaming.learner import Detector, LearnerConfig
from streaming.messages import Reading, encode_reading
from streaming.model.metrics import confusion, majority_baseline
from streaming.replay import replay
from streaming.sources import fleet_readings, synthetic_fleet_arrays

FLEET = {"num_devices": 160, "readings_per_device": 60, "anomaly_rate": 0.04, "seed": 7}
HOLDOUT_FRACTION = 0.25  # more held-out samples from a small fleet than the default 0.1
# The label-free model once calibrated (with `auto` this small fleet's server keeps choosing
# the z-score rule, and every version would decide alike).
DETECTOR = "label_free"
FIRST_HOUR = "2025-11-07-00:00"  # the fleet starts at 2025-11-07T00:00Z, 10 s apart: 10 min
MULTICHANNEL = 16  # devices with three named channels, each made of three fleet devices' series
CHANNELS = ("pressure", "temp", "vibration")
SCALES = ((1e5, 2e3), (20.0, 1.0), (0.0, 0.01))  # per channel: value = offset + scale · series


@dataclass
class Fleet:
    """The test fleet: every reading in event-time order."""

    readings: list[Reading]

    def __len__(self) -> int:
        return len(self.readings)

    @property
    def device_ids(self) -> list[str]:
        return sorted({r.device_id for r in self.readings})

    def channel_readings(self) -> int:
        """Readings × channels: the rows hourly analytics count."""
        return sum(len(r.channels) for r in self.readings)


def fleet_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, holdout_fraction=HOLDOUT_FRACTION, detector=DETECTOR)


def make_fleet() -> Fleet:
    """The synthetic fleet's univariate devices plus :data:`MULTICHANNEL` devices whose
    channels (wildly different scales) are three fleet devices' series; a multichannel
    reading is anomalous when any of its three sources is."""
    arrays = synthetic_fleet_arrays(**FLEET)
    readings = list(fleet_readings(arrays))
    by_device: dict[str, list[Reading]] = {}
    for r in readings:
        by_device.setdefault(r.device_id, []).append(r)
    ids = arrays.device_ids
    for k in range(MULTICHANNEL):
        sources = [by_device[ids[(3 * k + j) % len(ids)]] for j in range(3)]
        for parts in zip(*sources, strict=True):
            values = tuple(
                offset + scale * p.values[0]
                for (offset, scale), p in zip(SCALES, parts, strict=True)
            )
            label = max(p.label for p in parts)
            readings.append(
                Reading(f"multi_{k:03d}", parts[0].timestamp_ms, values, label, CHANNELS)
            )
    readings.sort(key=lambda r: (r.timestamp_ms, r.device_id))
    return Fleet(readings)


def produce(settings: Settings, fleet: Fleet, batch: int = 1) -> int:
    """The fleet into the readings topic; ``batch`` > 1 uses the batched message form."""
    result = replay(
        iter(fleet.readings),
        kafka.producer_config(settings, "replay"),
        settings.topics.readings,
        progress=False,
        batch=batch,
    )
    return result.readings


def produce_noise(settings: Settings, fleet: Fleet) -> int:
    """Messages every reader must skip or de-duplicate: broken JSON, contract violations, and
    a replayed copy of a real reading. Returns how many were sent."""
    producer = Producer(kafka.producer_config(settings, "replay"))
    first = fleet.readings[0]
    payloads = [
        b"not json",
        b'{"device_id": "device_x", "timestamp": "2025-11-07T00:01:00.000Z", "data": 1,'
        b' "label": 2}',
        b'{"device_id": "", "timestamp": "2025-11-07T00:01:00.000Z", "data": 1}',
        b'{"device_id": "device_x", "timestamp": "yesterday", "data": 1}',
        b'{"device_id": "device_x", "timestamp": "2025-11-07T00:01:00.000Z", "data": "1"}',
        b'{"device_id": "device_x", "timestamp": "2025-11-07T00:01:00.000Z",'
        b' "data": {"a": 1, "b": "2"}}',
        b'{"device_id": "device_x", "timestamp": "2025-11-07T00:01:00.000Z", "data": {}}',
        encode_reading(first),  # the same reading again: counted once
    ]
    for payload in payloads:
        producer.produce(
            settings.topics.readings, payload, key=b"noise", timestamp=first.timestamp_ms
        )
    assert producer.flush(30) == 0
    return len(payloads)


def learner_config(settings: Settings) -> LearnerConfig:
    return LearnerConfig.from_settings(settings)


def make_versions(settings: Settings, fleet: Fleet, count: int, per_version: int = 20):
    """``count`` global versions made by the training devices' learners (messages of
    ``replay_batch`` readings in event-time order, rounds every 20 readings so that a small
    fleet makes enough of them) and the federation round of ``per_version`` devices, each
    stored with ``fedavg.store_version`` as the FedAvg service does. Returns the versions'
    :class:`GlobalParams`."""
    config = dataclasses.replace(learner_config(settings), train_every=20, min_round_samples=10)
    series = evaluate.collect(iter(fleet.readings), batch=settings.replay_batch)
    evaluate.featurize(series, config)
    training = [
        d
        for d in series.devices.values()
        if not learner.is_held_out(d.device_id, settings.holdout_fraction, settings.seed)
    ]
    by_id = {d.device_id: d for d in training}
    states = {d.device_id: learner.DeviceState() for d in training}
    federation = Federation(
        dataclasses.replace(
            FederationConfig.from_settings(settings),
            min_devices=per_version,
            round_window_ms=10**12,  # only device counts close rounds: deterministic versions
        )
    )
    detector = Detector(None, config)
    made = []
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        for ts, device_id, k in evaluate._messages(training):
            d = by_id[device_id]
            lo, hi = d.bounds[k]
            state = states[device_id]
            learner.record(state, d.scored[k], d.labels[lo:hi], detector, config)
            while learner.round_due(state, config) and len(made) < count:
                update = learner.train_round(state, device_id, federation.state.current, config, ts)
                federation.add(update)
                if federation.due(ts):
                    rounds = {dev: list(r) for dev, r in federation.merged.items()}
                    version: Version = federation.close(ts)
                    fedavg.store_version(
                        conn, version, rounds, fedavg.state_to_json(federation), "fedavg", ts
                    )
                    detector = Detector(version.model, config)
                    made.append(version.model)
            if len(made) == count:
                break
    assert len(made) == count, f"the fleet made {len(made)} versions, {count} wanted"
    return made


def held_out_devices(settings: Settings, fleet: Fleet) -> list[str]:
    return [
        d
        for d in fleet.device_ids
        if learner.is_held_out(d, settings.holdout_fraction, settings.seed)
    ]


def expected_evaluation(settings: Settings, fleet: Fleet, version) -> dict:
    """The summary of one version computed from the generated readings with the learner's
    functions: no Kafka, no Spark, no database, none of flead_assets' code. Each held-out
    device from a fresh state, messages of ``replay_batch`` readings, every labelled reading."""
    config = learner_config(settings)
    detector = Detector(version, config)
    held = set(held_out_devices(settings, fleet))
    by_device: dict[str, list[Reading]] = {}
    for r in fleet.readings:
        if r.device_id in held:
            by_device.setdefault(r.device_id, []).append(r)
    actual, predicted = [], []
    for readings in by_device.values():
        state = learner.DeviceState()
        for lo in range(0, len(readings), settings.replay_batch):
            message = readings[lo : lo + settings.replay_batch]
            X = learner.readings_matrix(state, message[0].channels, [r.values for r in message])
            flags = detector.decide(learner.score(state, X, config)).flagged
            labelled = [i for i, r in enumerate(message) if r.label is not None]
            actual.extend(message[i].label for i in labelled)
            predicted.extend(int(flags[i]) for i in labelled)
    y, p = np.asarray(actual, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    return {
        **confusion(y, p).as_dict(),
        "baseline_accuracy": majority_baseline(y).accuracy,
        "detector": detector.kind,
    }


def expected_hourly(fleet: Fleet) -> pd.DataFrame:
    """Per device, channel and hour, from the generated readings with pandas."""
    frame = pd.DataFrame(
        [
            (r.device_id, channel, r.timestamp_ms, value, r.label)
            for r in fleet.readings
            for channel, value in zip(r.channels, r.values, strict=True)
        ],
        columns=["device_id", "channel", "ts", "value", "label"],
    )
    frame["hour"] = pd.to_datetime(frame["ts"], unit="ms", utc=True).dt.floor("h")
    return (
        frame.groupby(["device_id", "channel", "hour"])
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
