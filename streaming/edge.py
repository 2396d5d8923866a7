"""One device's on-device learner, as pure functions of its state.

The Flink job keeps a :class:`DeviceState` per key in managed keyed state and calls
:func:`observe` for each reading and :func:`train_round` every ``train_every`` readings or
``train_interval_s`` seconds; keeping the logic here, free of Flink, lets it be unit-tested and
reused by benchmarks (local-only and central baselines) with exactly the job's behaviour.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from streaming import model
from streaming.messages import Anomaly, GlobalUpdate, InvalidMessage, LocalUpdate, Reading


@dataclass(frozen=True)
class EdgeConfig:
    """The knobs of the edge learner (filled from :class:`flead.config.Settings`)."""

    train_every: int = 50
    min_round_samples: int = 10
    feature_set: str = "scale_free"
    learning_rate: float = 0.2
    epochs: int = 1
    positive_weight: float = 0.0  # anomalies' weight in the loss; 0 = balanced per round
    anomaly_z: float = model.ANOMALY_Z
    critical_z: float = model.CRITICAL_Z
    holdout_fraction: float = 0.1
    seed: int = 42

    def __post_init__(self) -> None:
        if not 1 <= self.min_round_samples <= self.train_every:
            raise ValueError(
                f"need 1 <= min_round_samples ({self.min_round_samples}) <= train_every "
                f"({self.train_every})"
            )

    @classmethod
    def from_settings(cls, settings) -> EdgeConfig:
        return cls(
            train_every=settings.train_every,
            min_round_samples=settings.min_round_samples,
            feature_set=settings.feature_set,
            learning_rate=settings.learning_rate,
            epochs=settings.local_epochs,
            positive_weight=settings.positive_weight,
            anomaly_z=settings.anomaly_z,
            critical_z=settings.critical_z,
            holdout_fraction=settings.holdout_fraction,
            seed=settings.seed,
        )


def is_held_out(device_id: str, fraction: float, seed: int = 42) -> bool:
    """Whether ``device_id`` is an evaluation device: scored, never trained on.

    A hash, not a list, so the Flink job, the FedAvg service and the Spark evaluation agree on
    the split without sharing state, for any fleet, deterministically for a seed.
    """
    digest = hashlib.blake2b(f"{seed}:{device_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


@dataclass
class DeviceState:
    """Everything one device remembers; bounded: the round buffer holds fewer than
    ``train_every`` rows between messages. Plain Python values only: Flink pickles this on
    every state write, and pickling small numpy arrays costs ~10x more than tuples of floats."""

    stats: model.RunningStats = field(default_factory=model.RunningStats)
    last_value: float | None = None
    features: list[tuple[float, ...]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    pseudo: list[bool] = field(default_factory=list)  # label came from the z-score rule
    rounds: int = 0
    local_model: tuple[tuple[float, ...], float] | None = None  # (weights, bias)


def check_single_channel(readings: list[Reading]) -> None:
    """Refuse readings this learner cannot model: it scores one channel per device, so a
    reading with several channels raises :class:`InvalidMessage` (for the dead-letter topic)
    rather than being scored on an arbitrary channel."""
    for i, reading in enumerate(readings):
        if len(reading.values) != 1:
            where = f"readings[{i}]: " if len(readings) > 1 else ""
            raise InvalidMessage(
                f"{where}reading of {reading.device_id!r} has {len(reading.values)} channels "
                f"{list(reading.channels)}; the edge learner models a single channel"
            )


def observe(
    state: DeviceState, reading: Reading, config: EdgeConfig, trains: bool
) -> Anomaly | None:
    """Score one reading against the device's history, then learn from it.

    The z-score and features use the statistics *before* the reading, so an anomaly cannot
    hide itself by inflating the standard deviation first.
    """
    z = model.z_score(state.stats, reading.value)
    # Warm-up readings have all-zero features (no history yet): they teach nothing.
    if trains and state.stats.count >= model.WARMUP:
        row = model.reading_features(
            reading.value, state.last_value, state.stats, config.feature_set
        )
        _buffer(state, tuple(row.tolist()), reading.label, z, config)
    state.stats = model.update_stats(state.stats, reading.value)
    state.last_value = reading.value
    return _anomaly(reading, z, config)


def observe_batch(
    state: DeviceState, readings: list[Reading], config: EdgeConfig, trains: bool
) -> list[Anomaly]:
    """:func:`observe` for several time-ordered readings of one device at once, vectorised
    (the same results; this is what lets batched messages go past per-record Python costs).
    The buffer may then hold more than ``train_every`` rows: call :func:`train_round` while
    :func:`round_due`."""
    values = np.fromiter((r.value for r in readings), dtype=np.float64, count=len(readings))
    z = model.series_z_scores(values, initial=state.stats)
    if trains:
        rows = model.series_features(
            values, config.feature_set, initial=state.stats, previous=state.last_value
        ).tolist()
        first_warm = max(0, model.WARMUP - state.stats.count)
        for i in range(first_warm, len(readings)):
            _buffer(state, tuple(rows[i]), readings[i].label, float(z[i]), config)
    state.stats = model.merge_series(state.stats, values)
    state.last_value = float(values[-1])
    flagged = np.flatnonzero(np.abs(z) > config.anomaly_z)
    return [_anomaly(readings[i], float(z[i]), config) for i in flagged]


def _buffer(
    state: DeviceState, row: tuple[float, ...], label: int | None, z: float, config: EdgeConfig
) -> None:
    state.features.append(row)
    state.pseudo.append(label is None)
    state.labels.append(model.pseudo_label(z, config.anomaly_z) if label is None else label)


def _anomaly(reading: Reading, z: float, config: EdgeConfig) -> Anomaly | None:
    severity = model.severity(z, config.anomaly_z, config.critical_z)
    if severity is None:
        return None
    return Anomaly(reading.device_id, reading.value, z, severity, reading.timestamp)


def round_due(state: DeviceState, config: EdgeConfig) -> bool:
    return len(state.labels) >= config.train_every


def starting_model(
    state: DeviceState, latest_global: GlobalUpdate | None, config: EdgeConfig
) -> tuple[model.LinearModel, int]:
    """The newest global model the device has received, else its own last local model, else
    zeros; with the global version it came from (0 = none)."""
    if latest_global is not None:
        weights = np.asarray(latest_global.weights, dtype=np.float64)
        if weights.size == model.feature_count(config.feature_set):
            return model.LinearModel(weights, latest_global.bias), latest_global.version
    if state.local_model is not None:
        weights, bias = state.local_model
        return model.LinearModel(np.asarray(weights, dtype=np.float64), bias), 0
    return model.LinearModel.zeros(model.feature_count(config.feature_set)), 0


def train_round(
    state: DeviceState,
    device_id: str,
    latest_global: GlobalUpdate | None,
    config: EdgeConfig,
    now: datetime,
) -> LocalUpdate | None:
    """One local SGD round on the oldest ``train_every`` buffered rows (all of them after a
    timer), which leave the buffer. None when fewer than ``min_round_samples`` are buffered
    (a timer fired on a quiet device)."""
    if len(state.labels) < config.min_round_samples:
        return None
    start, base_version = starting_model(state, latest_global, config)
    n = min(len(state.labels), config.train_every)
    X = np.asarray(state.features[:n], dtype=np.float64)
    y = np.asarray(state.labels[:n], dtype=np.int64)
    pseudo = sum(state.pseudo[:n])
    version = state.rounds + 1
    # Seeded by device and round: a round recomputed after a restore gives the same weights.
    seed = zlib.crc32(f"{config.seed}:{device_id}:{version}".encode())
    trained, metrics = model.sgd_round(
        start,
        X,
        y,
        learning_rate=config.learning_rate,
        epochs=config.epochs,
        positive_weight=config.positive_weight or None,
        seed=seed,
    )
    label_source = "pseudo" if pseudo * 2 > n else "ground_truth"
    state.rounds = version
    weights = tuple(float(w) for w in trained.weights)
    state.local_model = (weights, float(trained.bias))
    del state.features[:n], state.labels[:n], state.pseudo[:n]
    return LocalUpdate(
        device_id=device_id,
        model_version=version,
        base_global_version=base_version,
        weights=weights,
        bias=float(trained.bias),
        accuracy=float(metrics.train_accuracy),
        loss=float(metrics.train_loss),
        samples_processed=int(metrics.samples),
        timestamp=now,
        label_source=label_source,
    )


def newer(current: GlobalUpdate | None, candidate: GlobalUpdate) -> GlobalUpdate:
    """Devices only ever move forward: an old or repeated global version is ignored."""
    return candidate if current is None or candidate.version > current.version else current
