"""The FedAvg service's aggregation step and buffer (pure parts)."""

from datetime import UTC, datetime

import numpy as np
import pytest

from streaming import model
from streaming.fedavg import Buffer, FedAvgConfig, aggregation_weight, combine
from streaming.messages import GlobalUpdate, LocalUpdate

T0 = datetime(2025, 11, 7, tzinfo=UTC)


def update(device: str, weights, bias: float, samples: int, base: int = 0, version: int = 1):
    return LocalUpdate(device, version, base, tuple(weights), bias, 0.9, 0.3, samples, T0)


def current(version: int) -> GlobalUpdate:
    return GlobalUpdate(version, version, (0.0, 0.0, 0.0, 0.0), 0.0, None, 20, "fedavg", T0)


def test_fedavg_is_the_sample_weighted_mean_of_weights() -> None:
    updates = [
        update("a", [1, 0, 0, 0], 1.0, 10),
        update("b", [0, 1, 0, 0], -1.0, 30),
    ]
    config = FedAvgConfig(min_devices=2, staleness_alpha=0.0)
    combined, weights = combine(updates, None, config)
    assert weights == [10, 30]
    np.testing.assert_allclose(combined.weights, [0.25, 0.75, 0, 0])
    assert combined.bias == pytest.approx(-0.5)


def test_stale_updates_weigh_less() -> None:
    fresh = update("a", [1, 1, 1, 1], 0.0, 50, base=4)
    stale = update("b", [1, 1, 1, 1], 0.0, 50, base=1)
    assert aggregation_weight(fresh, 4, 0.5) == 50
    assert aggregation_weight(stale, 4, 0.5) == pytest.approx(50 / 2)
    assert aggregation_weight(stale, 4, 0.0) == 50


@pytest.mark.parametrize("strategy", ["trimmed_mean", "median", "clipped_fedavg"])
def test_robust_strategies_resist_one_scaled_update(strategy: str) -> None:
    honest = [update(f"d{i}", [1 + 0.01 * i, 1, 1, 1], 0.0, 50) for i in range(9)]
    attacker = update("evil", [-1000, -1000, -1000, -1000], 0.0, 50)
    config = FedAvgConfig(min_devices=10, strategy=strategy, staleness_alpha=0.0)
    robust, _ = combine([*honest, attacker], current(1), config)
    plain, _ = combine([*honest, attacker], current(1), FedAvgConfig(staleness_alpha=0.0))
    assert np.all(np.abs(robust.weights) < 2)
    assert np.all(plain.weights < -90)


def test_buffer_counts_distinct_devices_and_drops_repeats() -> None:
    buffer = Buffer()
    assert buffer.add(update("a", [1, 0, 0, 0], 0, 50, version=1))
    assert buffer.add(update("a", [1, 0, 0, 0], 0, 50, version=2))
    assert not buffer.add(update("a", [1, 0, 0, 0], 0, 50, version=2))
    assert buffer.add(update("b", [1, 0, 0, 0], 0, 50, version=1))
    assert len(buffer.updates) == 3 and buffer.devices() == 2
    buffer.clear()
    assert buffer.devices() == 0


def test_unknown_strategy_is_a_clear_error() -> None:
    from flead.config import load_settings

    with pytest.raises(ValueError, match="FLEAD_FEDAVG_STRATEGY"):
        FedAvgConfig.from_settings(load_settings({"FLEAD_FEDAVG_STRATEGY": "mean"}))
    assert set(model.STRATEGIES) == {"fedavg", "trimmed_mean", "median", "clipped_fedavg"}
