"""Tests of streaming/model.py, the model math shared by the Flink job, FedAvg service and Spark."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # plain `pytest` from anywhere, without an installed package
    sys.path.insert(0, str(REPO))

from streaming import model as M  # noqa: E402

# --------------------------------------------------------------------------------------------
# helpers


def feed(values, alpha=None):
    """Stats after feeding ``values`` one at a time, as the Flink job does."""
    stats = M.RunningStats()
    for x in values:
        stats = M.update_stats(stats, x, alpha)
    return stats


def incremental_features(values, feature_set="scale_free", alpha=None):
    stats, prev, rows = M.RunningStats(), None, []
    for x in values:
        rows.append(M.reading_features(x, prev, stats, feature_set))
        stats = M.update_stats(stats, x, alpha)
        prev = x
    return np.array(rows)


def spiky_series(n=400, seed=0):
    """A drifting, noisy series with a few spikes and a flat stretch."""
    rng = np.random.default_rng(seed)
    x = 20.0 + np.cumsum(rng.normal(0, 0.05, n)) + rng.normal(0, 1.0, n)
    spikes = [i for i in (50, 120, 121, 300) if i < n]
    x[spikes] += np.array([8.0, -9.0, 7.0, 30.0])[: len(spikes)]
    return x


def model(*params):
    return M.unflatten(np.array(params, dtype=np.float64))


# --------------------------------------------------------------------------------------------
# 1. running statistics, z-score, severity


@pytest.mark.parametrize("offset", [0.0, 1e9])
def test_welford_matches_numpy(offset):
    rng = np.random.default_rng(1)
    values = offset + rng.normal(3.0, 1.0, 5000)
    stats = feed(values)
    assert stats.count == values.size
    assert stats.mean == pytest.approx(np.mean(values), rel=1e-13)
    assert M.stats_std(stats) == pytest.approx(np.std(values, ddof=1), rel=1e-7)
    if offset:  # the data would break the naive sum-of-squares formula
        naive = np.sum(values**2) / values.size - np.mean(values) ** 2
        assert abs(naive - np.var(values)) > 0.1 * np.var(values)


def test_stats_of_short_series():
    assert M.RunningStats() == (0, 0.0, 0.0)
    assert M.stats_std(M.RunningStats()) == 0.0
    assert M.stats_std(feed([5.0])) == 0.0
    assert M.stats_std(feed([1.0, 3.0])) == pytest.approx(math.sqrt(2.0))


def test_update_stats_refuses_non_finite():
    with pytest.raises(ValueError, match="finite"):
        M.update_stats(M.RunningStats(), float("nan"))


def test_series_stats_match_incremental_with_large_offset():
    rng = np.random.default_rng(2)
    values = 1e9 + rng.normal(0, 1.0, 3000)
    count, mean, std = M.series_stats(values)
    stats = M.RunningStats()
    for i, x in enumerate(values):
        assert count[i] == stats.count
        assert mean[i] == pytest.approx(stats.mean, rel=1e-14, abs=0)
        assert std[i] == pytest.approx(M.stats_std(stats), rel=1e-6, abs=1e-9)
        stats = M.update_stats(stats, x)


def test_forgetting_equals_welford_early_and_follows_a_level_shift():
    rng = np.random.default_rng(3)
    early = rng.normal(0, 1, 10)
    a, b = feed(early), feed(early, alpha=0.1)  # count <= 1/alpha: identical
    assert b.mean == pytest.approx(a.mean) and b.m2 == pytest.approx(a.m2)

    shifted = np.concatenate([rng.normal(0, 1, 300), rng.normal(10, 1, 300)])
    welford, ew = feed(shifted), feed(shifted, alpha=0.05)
    assert welford.mean == pytest.approx(5.0, abs=0.3)
    assert ew.mean == pytest.approx(10.0, abs=0.5)
    assert M.stats_std(ew) < 2.0 < M.stats_std(welford)
    with pytest.raises(ValueError, match="alpha"):
        M.update_stats(feed(early), 1.0, alpha=1.5)


def test_z_score_uses_stats_before_x():
    history = np.arange(1.0, 21.0)
    stats = feed(history)
    x = 40.0
    expected = (x - history.mean()) / history.std(ddof=1)
    assert M.z_score(stats, x) == pytest.approx(expected)
    including = np.append(history, x)
    assert M.z_score(stats, x) != pytest.approx((x - including.mean()) / including.std(ddof=1))


def test_z_score_warmup_and_constant_history():
    assert M.z_score(feed([1.0, 2.0, 3.0]), 100.0) == 0.0  # count < WARMUP
    assert M.z_score(feed(np.arange(9.0)), 100.0) == 0.0
    assert M.z_score(feed(np.arange(10.0)), 100.0) > 0.0
    assert M.z_score(feed([1.0, 2.0, 3.0]), 100.0, warmup=2) > 0.0

    flat = feed([7.0] * 20)
    assert M.z_score(flat, 7.0) == 0.0
    assert M.z_score(flat, 7.5) == M.Z_CAP  # a stuck sensor that moves is flagged
    assert M.z_score(flat, 6.0) == -M.Z_CAP
    assert M.z_score(feed([0.0] * 20), 0.0) == 0.0
    assert M.z_score(feed([1e9] * 20), 1e9 + 1.0) == M.Z_CAP
    tiny = feed([0.0] * 19 + [1e-300])
    assert math.isfinite(M.z_score(tiny, 1e300))


@pytest.mark.parametrize(
    ("z", "expected"),
    [
        (0.0, None),
        (2.5, None),
        (-2.5, None),
        (2.51, "warning"),
        (-3.0, "warning"),
        (4.0, "warning"),
        (4.01, "critical"),
        (-12.0, "critical"),
    ],
)
def test_severity_thresholds(z, expected):
    assert M.severity(z) == expected


def test_severity_custom_thresholds_and_pseudo_label():
    assert M.severity(2.0, anomaly_z=1.5, critical_z=3.0) == "warning"
    assert M.severity(3.5, anomaly_z=1.5, critical_z=3.0) == "critical"
    assert [M.pseudo_label(z) for z in (0.0, 2.5, 2.6, -3.0)] == [0, 0, 1, 1]
    assert M.pseudo_label(2.0, anomaly_z=1.0) == 1
    assert M.pseudo_labels(np.array([0.0, -2.6, 2.5, 9.0])).tolist() == [0, 1, 0, 1]


def test_series_z_scores_match_z_score():
    values = spiky_series()
    stats, expected = M.RunningStats(), []
    for x in values:
        expected.append(M.z_score(stats, x))
        stats = M.update_stats(stats, x)
    np.testing.assert_allclose(M.series_z_scores(values), expected, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 2. features


def test_feature_sets_and_counts():
    assert M.FEATURE_SETS == ("scale_free", "original")
    assert M.feature_count("scale_free") == 4
    assert M.feature_count("original") == 3
    assert M.feature_count() == M.feature_count("scale_free")
    for name in M.FEATURE_SETS:
        assert len(M.FEATURE_NAMES[name]) == M.feature_count(name)
    with pytest.raises(ValueError, match="scale_free"):
        M.feature_count("raw")
    with pytest.raises(ValueError, match="unknown feature set"):
        M.reading_features(1.0, None, M.RunningStats(), "raw")


def test_scale_free_features_by_hand():
    history = np.arange(1.0, 21.0)  # mean 10.5
    stats = feed(history)
    sigma = history.std(ddof=1)
    x, prev = 10.5 + 3.0 * sigma, 10.5 - 1.0 * sigma
    f = M.reading_features(x, prev, stats)
    assert f.dtype == np.float64 and f.shape == (4,)
    np.testing.assert_allclose(f, [3.0, 0.5, 4.0, 1.0])
    f = M.reading_features(1e9, 20.0, stats)  # clipped
    assert f.tolist() == [M.Z_CAP, M.Z_CAP - M.ANOMALY_Z, M.Z_CAP, pytest.approx(9.5 / sigma)]
    assert M.reading_features(x, None, stats)[2:].tolist() == [0.0, 0.0]
    assert M.reading_features(x, prev, feed(history[:5])).tolist() == [0.0] * 4  # warm-up


def test_original_features():
    history = np.arange(1.0, 21.0)
    stats = feed(history)
    f = M.reading_features(30.0, 20.0, stats, "original")
    np.testing.assert_allclose(
        f, [history.mean(), history.std(ddof=1), (30.0 - 10.5) / history.std(ddof=1)]
    )


@pytest.mark.parametrize(("scale", "shift"), [(1000.0, 1e6), (1e-3, -5.0), (-3.0, 42.0)])
def test_scale_free_features_are_invariant_to_units(scale, shift):
    values = spiky_series()
    base = M.series_features(values)
    moved = M.series_features(scale * values + shift)
    np.testing.assert_allclose(moved, base, rtol=1e-6, atol=1e-8)
    assert np.count_nonzero(base[:, 1]) > 0  # the spikes really do reach excess_z
    original = M.series_features(values, "original")
    original_moved = M.series_features(scale * values + shift, "original")
    assert not np.allclose(original, original_moved)


def test_scale_free_features_are_bounded():
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.normal(0, 1, 100), [1e12, -1e12], rng.normal(0, 1, 50)])
    features = M.series_features(values)
    assert np.all(features >= 0.0) and np.all(features <= M.Z_CAP)


@pytest.mark.parametrize("feature_set", M.FEATURE_SETS)
@pytest.mark.parametrize("alpha", [None, 0.05])
def test_series_features_equal_incremental(feature_set, alpha):
    values = np.concatenate([[3.0] * 15, [3.5], spiky_series(300, seed=5), 1e6 + spiky_series(50)])
    batch = M.series_features(values, feature_set, alpha=alpha)
    assert batch.shape == (values.size, M.feature_count(feature_set))
    np.testing.assert_allclose(
        batch, incremental_features(values, feature_set, alpha), rtol=1e-7, atol=1e-9
    )


def test_series_features_edge_cases():
    assert M.series_features(np.array([])).shape == (0, 4)
    assert M.series_features(np.array([]), "original").shape == (0, 3)
    assert M.series_features(np.array([5.0])).tolist() == [[0.0] * 4]
    with pytest.raises(ValueError, match="1-D"):
        M.series_features(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="finite"):
        M.series_features(np.array([1.0, np.inf]))


# --------------------------------------------------------------------------------------------
# 3. linear model and SGD


def test_sigmoid_is_stable():
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        p = M.sigmoid(np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0]))
    assert p[0] == 0.0 and p[-1] == 1.0 and p[2] == 0.5
    assert np.all(np.diff(p) >= 0)
    np.testing.assert_allclose(M.sigmoid(np.array([3.0])) + M.sigmoid(np.array([-3.0])), 1.0)


def test_linear_model_is_immutable_and_round_trips_json():
    m = M.LinearModel([0.5, -1.25, 3.0], 0.75)
    assert m.weights.dtype == np.float64 and m.n_features == 3
    with pytest.raises(ValueError):
        m.weights[0] = 9.0
    with pytest.raises(AttributeError):
        m.bias = 1.0  # type: ignore[misc]
    encoded = json.dumps(m.to_json_dict())
    assert json.loads(encoded) == {"weights": [0.5, -1.25, 3.0], "bias": 0.75}
    back = M.LinearModel.from_json_dict(json.loads(encoded))
    assert back.weights.tolist() == m.weights.tolist() and back.bias == m.bias
    zero = M.LinearModel.zeros(4)
    assert zero.weights.tolist() == [0.0] * 4 and zero.bias == 0.0


@pytest.mark.parametrize(
    "obj",
    [
        {"bias": 0.0},
        {"weights": [1.0, "2"], "bias": 0.0},
        {"weights": [1.0, True], "bias": 0.0},
        {"weights": [1.0, float("nan")], "bias": 0.0},
        {"weights": [1.0], "bias": None},
        {"weights": 1.0, "bias": 0.0},
        [1.0, 2.0],
    ],
)
def test_from_json_dict_refuses_bad_models(obj):
    with pytest.raises(ValueError):
        M.LinearModel.from_json_dict(obj)


def test_linear_model_refuses_non_finite_or_bad_shape():
    with pytest.raises(ValueError, match="finite"):
        M.LinearModel([1.0, np.inf], 0.0)
    with pytest.raises(ValueError, match="1-D"):
        M.LinearModel(np.zeros((2, 2)), 0.0)


def test_predict_proba_and_predict():
    m = M.LinearModel([2.0, -1.0], 0.5)
    X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 10.0]])
    np.testing.assert_allclose(M.predict_proba(m, X), M.sigmoid(np.array([0.5, 2.5, -9.5])))
    assert M.predict(m, X).tolist() == [1, 1, 0]
    assert M.predict(m, X).dtype == np.int64
    assert M.predict(m, X, threshold=0.95).tolist() == [0, 0, 0]
    assert float(M.predict_proba(m, np.array([1.0, 0.0]))) == pytest.approx(M.sigmoid(2.5))
    assert M.predict(M.LinearModel.zeros(2), X).tolist() == [0, 0, 0]  # p = 0.5 is "normal"
    with pytest.raises(ValueError, match="2 weights"):
        M.predict_proba(m, np.zeros((3, 3)))


def test_balanced_positive_weight():
    assert M.balanced_positive_weight(np.zeros(50)) == 1.0
    assert M.balanced_positive_weight(np.ones(5)) == 1.0
    assert M.balanced_positive_weight(np.array([1] + [0] * 9)) == 9.0
    assert M.balanced_positive_weight(np.array([1] + [0] * 99)) == M.MAX_POSITIVE_WEIGHT
    assert M.balanced_positive_weight(np.array([1] + [0] * 99), cap=20.0) == 20.0


def separable(n=200, seed=6):
    rng = np.random.default_rng(seed)
    X = rng.normal(0, 1, (n, 3))
    y = (X @ np.array([1.5, -2.0, 0.5]) + 0.3 > 0).astype(int)
    return X, y


def test_sgd_round_reduces_loss_on_separable_data():
    X, y = separable()
    start = M.LinearModel.zeros(3)
    m1, r1 = M.sgd_round(start, X, y, epochs=1, seed=0)
    _, r2 = M.sgd_round(m1, X, y, epochs=5, seed=0)
    assert r1.train_loss < math.log(2.0)  # the zero model's loss
    assert r2.train_loss < r1.train_loss
    assert r2.train_accuracy >= 0.95
    assert r2.samples == 200 and r2.positives == int(y.sum())
    assert start.weights.tolist() == [0.0, 0.0, 0.0]  # the global model is not touched


def test_sgd_round_learns_rare_positives_with_balanced_weights():
    rng = np.random.default_rng(7)
    n = 500
    y = np.zeros(n, dtype=int)
    y[rng.choice(n, 10, replace=False)] = 1  # 2 % anomalies
    values = rng.normal(0, 1, n)
    values[y == 1] += rng.choice([-1, 1], 10) * rng.uniform(4, 7, 10)
    X = np.column_stack([np.abs(values), rng.uniform(0, 1, n)])
    model_, metrics = M.sgd_round(M.LinearModel.zeros(2), X, y, epochs=5, seed=1)
    recall = M.confusion(y, M.predict(model_, X)).recall
    assert recall > 0.5
    assert model_.weights[0] > 0
    assert 0.0 <= metrics.train_accuracy <= 1.0


def test_sgd_round_is_deterministic_for_a_seed():
    X, y = separable(seed=8)
    start = M.LinearModel([0.1, 0.2, 0.3], -0.1)
    a, ma = M.sgd_round(start, X, y, seed=42)
    b, mb = M.sgd_round(start, X, y, seed=42)
    c, _ = M.sgd_round(start, X, y, seed=43)
    assert a.weights.tolist() == b.weights.tolist() and a.bias == b.bias and ma == mb
    assert a.weights.tolist() != c.weights.tolist()


def test_sgd_round_options_and_errors():
    X, y = separable(50)
    start = M.LinearModel([0.1, 0.2, 0.3], 0.4)
    same, metrics = M.sgd_round(start, X, y, epochs=0)
    assert same.weights.tolist() == start.weights.tolist() and same.bias == start.bias
    assert metrics.samples == 50
    M.sgd_round(start, X, y, positive_weight=3.0, learning_rate=0.001, l2=0.0, seed=1)
    with pytest.raises(ValueError, match="at least one sample"):
        M.sgd_round(start, np.zeros((0, 3)), np.zeros(0))
    with pytest.raises(ValueError, match="0 or 1"):
        M.sgd_round(start, X, np.full(50, 2))
    with pytest.raises(ValueError, match="shape"):
        M.sgd_round(start, X, y[:10])
    with pytest.raises(ValueError, match="3 weights"):
        M.sgd_round(start, X[:, :2], y)
    with pytest.raises(ValueError, match="positive_weight"):
        M.sgd_round(start, X, y, positive_weight=0.0)


def test_sgd_round_trains_on_real_features():
    """The whole per-device path: series → features → pseudo-labels → a round of SGD."""
    values = spiky_series(600, seed=9)
    X = M.series_features(values)
    y = M.pseudo_labels(M.series_z_scores(values))
    assert y.sum() > 0
    trained, metrics = M.sgd_round(M.LinearModel.zeros(4), X, y, seed=0)
    assert metrics.train_loss < math.log(2.0)
    assert M.confusion(y, M.predict(trained, X)).recall > 0.5


# --------------------------------------------------------------------------------------------
# 4. metrics


def test_confusion_on_a_known_example():
    y_true = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0])
    y_pred = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    c = M.confusion(y_true, y_pred)
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 1, 5, 2)
    assert c.samples == 10
    assert c.accuracy == pytest.approx(0.7)
    assert c.precision == pytest.approx(2 / 3)
    assert c.recall == pytest.approx(0.5)
    assert c.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    d = c.as_dict()
    assert d == {
        "tp": 2,
        "fp": 1,
        "tn": 5,
        "fn": 2,
        "samples": 10,
        "accuracy": pytest.approx(0.7),
        "precision": pytest.approx(2 / 3),
        "recall": pytest.approx(0.5),
        "f1": pytest.approx(4 / 7),
    }
    json.dumps(d)
    assert c + c == M.Confusion(4, 2, 10, 4)


def test_confusion_zero_division_is_zero_not_nan():
    none_predicted = M.confusion(np.array([0, 0, 1]), np.array([0, 0, 0]))
    assert none_predicted.precision == 0.0 and none_predicted.f1 == 0.0
    assert none_predicted.recall == 0.0
    all_normal = M.confusion(np.zeros(4, dtype=int), np.zeros(4, dtype=int))
    assert (all_normal.precision, all_normal.recall, all_normal.f1) == (0.0, 0.0, 0.0)
    assert all_normal.accuracy == 1.0
    empty = M.confusion(np.array([], dtype=int), np.array([], dtype=int))
    assert empty.as_dict() == {
        "tp": 0,
        "fp": 0,
        "tn": 0,
        "fn": 0,
        "samples": 0,
        "accuracy": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
    }


def test_confusion_refuses_bad_input():
    with pytest.raises(ValueError, match="length"):
        M.confusion(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="0 and 1"):
        M.confusion(np.array([0, 2]), np.array([0, 1]))


def test_majority_baseline():
    rare = M.majority_baseline(np.array([0] * 98 + [1] * 2))
    assert (rare.tp, rare.fp, rare.tn, rare.fn) == (0, 0, 98, 2)
    assert rare.accuracy == pytest.approx(0.98) and rare.f1 == 0.0
    mostly_bad = M.majority_baseline(np.array([1, 1, 0]))
    assert (mostly_bad.tp, mostly_bad.fp) == (2, 1)
    tie = M.majority_baseline(np.array([1, 0]))
    assert (tie.tn, tie.fn) == (1, 1)


# --------------------------------------------------------------------------------------------
# 5. aggregation


def honest_and_outlier():
    honest = [model(1.0, 2.0, 0.5), model(1.2, 1.8, 0.4), model(0.9, 2.1, 0.6),
              model(1.1, 2.0, 0.5), model(1.0, 1.9, 0.55)]  # fmt: skip
    outlier = model(1e6, -1e6, 1e6)
    return [*honest, outlier], [100.0] * 6


def test_flatten_unflatten_round_trip():
    m = M.LinearModel([1.0, 2.0], 3.0)
    assert M.flatten(m).tolist() == [1.0, 2.0, 3.0]
    back = M.unflatten(M.flatten(m))
    assert back.weights.tolist() == [1.0, 2.0] and back.bias == 3.0
    with pytest.raises(ValueError):
        M.unflatten(np.array([]))


def test_fedavg_is_the_weighted_mean():
    updates = [model(1.0, 0.0, 2.0), model(3.0, 4.0, -2.0)]
    avg = M.fedavg(updates, [1.0, 3.0])
    assert M.flatten(avg).tolist() == pytest.approx([2.5, 3.0, -1.0])
    assert M.flatten(M.fedavg(updates, [50, 50])).tolist() == pytest.approx([2.0, 2.0, 0.0])


def test_robust_rules_resist_one_huge_update():
    updates, weights = honest_and_outlier()
    honest = np.array([M.flatten(u) for u in updates[:-1]])
    lo, hi = honest.min(axis=0), honest.max(axis=0)
    for rule in (M.trimmed_mean, M.coordinate_median):
        result = M.flatten(rule(updates, weights))
        assert np.all(result >= lo) and np.all(result <= hi), rule.__name__
    assert np.abs(M.flatten(M.fedavg(updates, weights))).max() > 1e5


def test_trimmed_mean_details():
    updates, weights = honest_and_outlier()
    # trim_fraction 0 is FedAvg; with 6 updates, 0.2 trims one from each end per coordinate.
    np.testing.assert_allclose(
        M.flatten(M.trimmed_mean(updates, weights, trim_fraction=0.0)),
        M.flatten(M.fedavg(updates, weights)),
    )
    values = [model(float(v), 0.0) for v in (1, 2, 3, 4, 100)]
    assert M.trimmed_mean(values, [1, 1, 1, 1, 1]).weights[0] == pytest.approx(3.0)
    weighted = M.trimmed_mean(values, [1, 1, 3, 1, 1]).weights[0]
    assert weighted == pytest.approx((2 + 9 + 4) / 5)
    unweighted = M.trimmed_mean(values, [1, 1, 3, 1, 1], weighted=False).weights[0]
    assert unweighted == pytest.approx(3.0)
    with pytest.raises(ValueError, match="trim_fraction"):
        M.trimmed_mean(values, [1] * 5, trim_fraction=0.5)


def test_coordinate_median_details():
    odd = [model(float(v), -float(v)) for v in (5, 1, 3)]
    even = [model(float(v), float(v)) for v in (4, 1, 3, 10)]
    assert M.flatten(M.coordinate_median(odd, [1, 1, 1])).tolist() == [3.0, -3.0]
    assert M.flatten(M.coordinate_median(even, [2, 2, 2, 2])).tolist() == [3.5, 3.5]
    # weighted: one update carrying most of the samples is the median
    assert M.coordinate_median(odd, [1, 10, 1]).weights[0] == 1.0
    assert M.coordinate_median(odd, [1, 10, 1], weighted=False).weights[0] == 3.0
    # weight 0 takes no part
    assert M.coordinate_median([*odd, model(1e9, 0.0)], [1, 1, 1, 0]).weights[0] == 3.0


def test_clipped_fedavg_bounds_a_scaled_update():
    reference = model(1.0, 1.0, 0.0)
    rng = np.random.default_rng(10)
    honest = [M.unflatten(M.flatten(reference) + rng.normal(0, 0.1, 3)) for _ in range(6)]
    attacker = M.unflatten(M.flatten(reference) + 1000.0 * (M.flatten(honest[0]) - 1.0))
    updates, weights = [*honest, attacker], [50.0] * 7
    norms = [np.linalg.norm(M.flatten(u) - M.flatten(reference)) for u in updates]
    bound = float(np.median(norms))
    clipped = M.clipped_fedavg(updates, weights, reference)
    plain = M.fedavg(updates, weights)
    assert np.linalg.norm(M.flatten(clipped) - M.flatten(reference)) <= bound + 1e-12
    assert np.linalg.norm(M.flatten(plain) - M.flatten(reference)) > 10 * bound
    tight = M.clipped_fedavg(updates, weights, reference, max_norm=0.01)
    assert np.linalg.norm(M.flatten(tight) - M.flatten(reference)) <= 0.01 + 1e-12
    still = M.clipped_fedavg(updates, weights, reference, max_norm=0.0)
    assert M.flatten(still).tolist() == M.flatten(reference).tolist()
    # with a bound none reaches it is exactly FedAvg
    loose = M.clipped_fedavg(updates, weights, reference, max_norm=1e9)
    np.testing.assert_allclose(M.flatten(loose), M.flatten(plain))
    with pytest.raises(ValueError, match="reference"):
        M.clipped_fedavg(updates, weights, M.LinearModel.zeros(5))


def test_staleness_factor():
    assert M.staleness_factor(7, 7) == 1.0
    factors = [M.staleness_factor(10, base) for base in range(10, -1, -1)]
    assert all(a > b for a, b in itertools.pairwise(factors))
    assert M.staleness_factor(10, 7) == pytest.approx(4**-0.5)
    assert M.staleness_factor(10, 7, alpha=1.0) == pytest.approx(0.25)
    assert M.staleness_factor(10, 7, alpha=0.0) == 1.0
    assert M.staleness_factor(3, 5) == 1.0  # from the future: treated as fresh
    with pytest.raises(ValueError):
        M.staleness_factor(3, 1, alpha=-1.0)


def test_aggregate_dispatch():
    updates, weights = honest_and_outlier()
    reference = M.fedavg(updates[:-1], weights[:-1])
    assert set(M.STRATEGIES) == {"fedavg", "trimmed_mean", "median", "clipped_fedavg"}
    for name, rule in M.STRATEGIES.items():
        got = M.aggregate(name, updates, weights, reference=reference)
        want = (
            rule(updates, weights, reference)
            if name == "clipped_fedavg"
            else rule(updates, weights)
        )
        assert M.flatten(got).tolist() == M.flatten(want).tolist(), name
    opt = M.aggregate("trimmed_mean", updates, weights, trim_fraction=0.0)
    assert M.flatten(opt).tolist() == pytest.approx(M.flatten(M.fedavg(updates, weights)).tolist())


def test_aggregate_errors():
    updates, weights = honest_and_outlier()
    with pytest.raises(ValueError, match="unknown aggregation strategy 'mean'") as excinfo:
        M.aggregate("mean", updates, weights)
    for name in M.STRATEGIES:
        assert name in str(excinfo.value)
    with pytest.raises(ValueError, match="reference"):
        M.aggregate("clipped_fedavg", updates, weights)
    for name in M.STRATEGIES:
        with pytest.raises(ValueError, match="empty"):
            M.aggregate(name, [], [], reference=updates[0])
        with pytest.raises(ValueError, match="different numbers of weights"):
            M.aggregate(
                name, [model(1.0, 2.0), model(1.0, 2.0, 3.0)], [1, 1], reference=model(1.0, 2.0)
            )
    with pytest.raises(ValueError, match="2 updates but 1 weights"):
        M.fedavg(updates[:2], [1.0])
    with pytest.raises(ValueError, match="weights must be"):
        M.fedavg(updates[:2], [1.0, -1.0])
    with pytest.raises(ValueError, match="weights must be"):
        M.fedavg(updates[:2], [0.0, 0.0])


def test_imports_only_numpy_and_the_standard_library():
    """The PyFlink environment has numpy and nothing else of ours: loading the module must not
    pull in any installed package other than numpy."""
    code = """
import os, sys
before = set(sys.modules)  # whatever site startup (.pth files) loaded is not ours
import numpy, streaming.model
numpy_dir = os.path.dirname(os.path.realpath(numpy.__file__))
for name in set(sys.modules) - before:
    mod = sys.modules[name]
    path = os.path.realpath(getattr(mod, "__file__", None) or "")
    installed = {"site-packages", "dist-packages"} & set(path.split(os.sep))
    if installed and not path.startswith(numpy_dir):
        print(name, path)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout == ""


def test_continued_series_equals_the_whole_series() -> None:
    rng = np.random.default_rng(12)
    values = 1e6 + rng.normal(0, 3, 300)
    values[150] += 40
    whole = M.series_features(values)
    whole_z = M.series_z_scores(values)
    stats = M.RunningStats()
    for split in (1, 37, 150, 299):
        stats = M.RunningStats()
        for x in values[:split]:
            stats = M.update_stats(stats, x)
        rest = M.series_features(values[split:], initial=stats, previous=values[split - 1])
        np.testing.assert_allclose(rest, whole[split:], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(
            M.series_z_scores(values[split:], initial=stats), whole_z[split:], rtol=1e-9, atol=1e-9
        )
        merged = M.merge_series(stats, values[split:])
        full = M.RunningStats()
        for x in values:
            full = M.update_stats(full, x)
        assert merged.count == full.count
        assert merged.mean == pytest.approx(full.mean, rel=1e-12)
        assert merged.m2 == pytest.approx(full.m2, rel=1e-9)
