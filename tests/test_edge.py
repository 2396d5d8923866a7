"""The on-device learner's logic, free of Flink."""

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from streaming import edge, model
from streaming.messages import GlobalUpdate, InvalidMessage, Reading, epoch_ms, single_reading

T0 = datetime(2025, 11, 7, tzinfo=UTC)
CONFIG = edge.EdgeConfig(train_every=50, min_round_samples=10)


def readings(values, labels=None, device="device_0001"):
    labels = labels if labels is not None else [0] * len(values)
    return [
        single_reading(device, epoch_ms(T0 + timedelta(seconds=10 * i)), v, lab)
        for i, (v, lab) in enumerate(zip(values, labels, strict=True))
    ]


def global_model(version: int, weights=(0.5, 0.1, 0.2, 0.3), bias=-1.0) -> GlobalUpdate:
    return GlobalUpdate(version, version, tuple(weights), bias, 0.9, 20, "fedavg", T0)


def test_spike_is_reported_with_severity_from_history_before_it() -> None:
    rng = np.random.default_rng(0)
    values = [*(100 + rng.normal(0, 1, 60)), 130.0]
    state = edge.DeviceState()
    found = [edge.observe(state, r, CONFIG, trains=True) for r in readings(values)]
    assert found[-1] is not None
    assert found[-1].severity == "critical" and found[-1].z_score > 10
    assert state.stats.count == 61


def test_round_starts_from_newest_global_model_and_clears_buffer() -> None:
    rng = np.random.default_rng(1)
    state = edge.DeviceState()
    for r in readings(list(rng.normal(5, 1, 60))):
        edge.observe(state, r, CONFIG, trains=True)
    assert len(state.labels) == 60 - model.WARMUP  # warm-up rows teach nothing
    update = edge.train_round(state, "device_0001", global_model(3), CONFIG, T0)
    assert update is not None
    assert update.base_global_version == 3
    assert update.model_version == 1 and update.samples_processed == 50
    assert len(update.weights) == model.feature_count("scale_free")
    assert state.labels == [] and state.features == []


def test_round_without_global_model_continues_the_local_model() -> None:
    rng = np.random.default_rng(2)
    state = edge.DeviceState()
    for r in readings(list(rng.normal(5, 1, 110))):
        edge.observe(state, r, CONFIG, trains=True)
        if edge.round_due(state, CONFIG):
            first = edge.train_round(state, "d", None, CONFIG, T0)
    start, version = edge.starting_model(state, None, CONFIG)
    assert version == 0
    assert tuple(start.weights) == first.weights


def test_rounds_are_deterministic_for_device_and_round() -> None:
    def run() -> tuple:
        state = edge.DeviceState()
        for r in readings(list(np.random.default_rng(3).normal(5, 1, 70))):
            edge.observe(state, r, CONFIG, trains=True)
        return edge.train_round(state, "d", global_model(1), CONFIG, T0).weights

    assert run() == run()


def test_held_out_devices_are_scored_but_never_buffer() -> None:
    state = edge.DeviceState()
    values = [1.0] * 30 + [50.0]
    anomalies = [edge.observe(state, r, CONFIG, trains=False) for r in readings(values)]
    assert anomalies[-1] is not None
    assert state.labels == []
    assert edge.train_round(state, "d", None, CONFIG, T0) is None


def test_pseudo_labels_when_the_stream_has_no_labels() -> None:
    state = edge.DeviceState()
    values = [*np.random.default_rng(4).normal(0, 1, 60), 40.0]
    for r in readings(values, labels=[None] * len(values)):
        edge.observe(state, r, CONFIG, trains=True)
    assert state.labels[-1] == 1 and all(state.pseudo)
    update = edge.train_round(state, "d", None, CONFIG, T0)
    assert update.label_source == "pseudo"


def test_timer_round_needs_minimum_samples() -> None:
    state = edge.DeviceState()
    for r in readings([1.0, 2.0] * 9):
        edge.observe(state, r, CONFIG, trains=True)
    assert len(state.labels) == 18 - model.WARMUP < CONFIG.min_round_samples
    assert edge.train_round(state, "d", None, CONFIG, T0) is None


def test_held_out_split_is_deterministic_and_near_the_fraction() -> None:
    devices = [f"device_{i:05d}" for i in range(20_000)]
    held = [d for d in devices if edge.is_held_out(d, 0.1, seed=42)]
    assert 0.09 < len(held) / len(devices) < 0.11
    assert held == [d for d in devices if edge.is_held_out(d, 0.1, seed=42)]
    assert held != [d for d in devices if edge.is_held_out(d, 0.1, seed=7)]
    assert not any(edge.is_held_out(d, 0.0) for d in devices[:100])


def test_devices_only_move_forward_in_global_versions() -> None:
    v2, v3 = global_model(2), global_model(3)
    assert edge.newer(None, v2) is v2
    assert edge.newer(v2, v3) is v3
    assert edge.newer(v3, v2) is v3
    assert edge.newer(v3, global_model(3, bias=5.0)) is v3


def test_global_model_of_another_feature_set_is_not_adopted() -> None:
    state = edge.DeviceState()
    start, version = edge.starting_model(state, global_model(4, weights=(1.0, 2.0, 3.0)), CONFIG)
    assert version == 0 and np.all(start.weights == 0)


def test_batch_observation_equals_one_by_one() -> None:
    rng = np.random.default_rng(9)
    values = [*(50 + rng.normal(0, 2, 140)), 90.0, *(50 + rng.normal(0, 2, 60))]
    labels = [int(v > 80) for v in values]
    stream = readings(values, labels)
    one, batched = edge.DeviceState(), edge.DeviceState()
    singles = [edge.observe(one, r, CONFIG, trains=True) for r in stream]
    found = []
    for start in range(0, len(stream), 23):  # batches straddle warm-up and round boundaries
        found += edge.observe_batch(batched, stream[start : start + 23], CONFIG, trains=True)
    expected = [a for a in singles if a]
    assert [(a.timestamp, a.severity) for a in found] == [
        (a.timestamp, a.severity) for a in expected
    ]
    assert [a.z_score for a in found] == pytest.approx([a.z_score for a in expected])
    np.testing.assert_allclose(one.features, batched.features, rtol=1e-9, atol=1e-12)
    assert one.labels == batched.labels and one.pseudo == batched.pseudo
    assert one.stats.count == batched.stats.count
    assert one.stats.mean == pytest.approx(batched.stats.mean)
    assert one.last_value == batched.last_value


def test_round_takes_the_oldest_rows_and_keeps_the_rest() -> None:
    state = edge.DeviceState()
    edge.observe_batch(
        state, readings(list(np.random.default_rng(8).normal(0, 1, 130))), CONFIG, trains=True
    )
    assert len(state.labels) == 120 and edge.round_due(state, CONFIG)
    rows = list(state.features)
    update = edge.train_round(state, "d", None, CONFIG, T0)
    assert update.samples_processed == 50
    assert state.features == rows[50:]


def test_readings_with_several_channels_are_refused() -> None:
    single = readings([1.0, 2.0])
    edge.check_single_channel(single)  # one channel: accepted
    named = Reading("d", epoch_ms(T0), (21.5,), None, ("temperature",))
    edge.check_single_channel([named])  # one named channel is still one channel
    pair = Reading("d", epoch_ms(T0), (40.0, 21.5), None, ("humidity", "temperature"))
    with pytest.raises(InvalidMessage, match=r"readings\[2\].*2 channels.*single channel"):
        edge.check_single_channel([*single, pair])
    with pytest.raises(ValueError):  # observe never silently picks one of the channels
        edge.observe(edge.DeviceState(), pair, CONFIG, trains=True)
