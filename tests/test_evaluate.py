"""streaming.evaluate on a tiny synthetic fleet: every held-out reading scored exactly once,
the z-score and majority rows recomputed here with pandas, folds, skipped readings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from streaming import sources
from streaming.evaluate import METHODS, collect, evaluate, folds_of
from streaming.federation import FederationConfig
from streaming.learner import LearnerConfig
from streaming.messages import Reading
from streaming.model.features import WARMUP
from streaming.model.metrics import Confusion

DEVICES, PER_DEVICE = 12, 200
ODD_DEVICE = "device_0003"
ODD_READINGS = 4


def learner_config() -> LearnerConfig:
    return LearnerConfig(
        train_every=50,
        min_round_samples=10,
        hidden=4,
        learning_rate=0.1,
        epochs=2,
        batch_size=16,
        positive_memory=8,
        detector="auto",
        anomaly_z=2.5,
        critical_z=4.0,
        gate=float("inf"),  # the baseline is the plain expanding mean/std: pandas can check it
        holdout_fraction=0.1,
        seed=42,
    )


def federation_config() -> FederationConfig:
    return FederationConfig(
        min_devices=20,
        round_window_ms=60_000,
        active_window_ms=300_000,
        rule="fedavg",
        max_samples=58,
        server_momentum=0.7,
        calibration_decay=0.9,
        normal_decay=0.9,
        contamination=0.05,
        hidden=4,
    )


def fleet_readings() -> list[Reading]:
    readings = list(
        sources.synthetic_fleet(
            num_devices=DEVICES, readings_per_device=PER_DEVICE, anomaly_rate=0.05, seed=3
        )
    )
    last = readings[-1].timestamp_ms
    # A device whose channels change mid-stream: those readings are left out and counted.
    readings += [
        Reading(ODD_DEVICE, last + 1000 * (k + 1), (1.0, 2.0), 0, ("a", "b"))
        for k in range(ODD_READINGS)
    ]
    return readings


@pytest.fixture(scope="module")
def readings() -> list[Reading]:
    return fleet_readings()


@pytest.fixture(scope="module")
def report(readings):
    return evaluate(
        readings,
        source="synthetic",
        folds=3,
        config=learner_config(),
        fed_config=federation_config(),
        batch=50,
    )


def test_every_method_scores_every_labelled_reading_once(report):
    assert tuple(report.methods) == METHODS
    assert report.devices == DEVICES
    assert report.readings == DEVICES * PER_DEVICE
    assert report.folds == 3 and len(report.versions) == 3
    for name, c in report.methods.items():
        assert c.samples == DEVICES * PER_DEVICE, name
    table = report.table()
    for name in (*METHODS, "prequential"):
        assert name in table
    as_dict = report.as_dict()
    assert set(as_dict["methods"]) == set(METHODS)
    assert as_dict["methods"]["zscore"]["samples"] == DEVICES * PER_DEVICE


def test_skipped_readings_are_counted(report):
    assert sum(report.skipped.values()) == ODD_READINGS


def pandas_zscore_confusion(readings: list[Reading], anomaly_z: float) -> Confusion:
    rows = [
        (r.device_id, r.timestamp_ms, r.values[0], r.label)
        for r in readings
        if r.channels == ("value",)
    ]
    df = pd.DataFrame(rows, columns=["device", "ts", "value", "label"]).sort_values(
        ["device", "ts"], kind="stable"
    )
    g = df.groupby("device")["value"]
    mean_before = g.transform(lambda s: s.expanding().mean().shift(1))
    std_before = g.transform(lambda s: s.expanding().std(ddof=1).shift(1))
    position = df.groupby("device").cumcount()
    z = (df["value"] - mean_before) / std_before
    flagged = (position >= WARMUP) & (z.abs() > anomaly_z)
    actual = df["label"] == 1
    return Confusion(
        tp=int((flagged & actual).sum()),
        fp=int((flagged & ~actual).sum()),
        tn=int((~flagged & ~actual).sum()),
        fn=int((~flagged & actual).sum()),
    )


def test_zscore_row_equals_pandas_expanding_rule(report, readings):
    expected = pandas_zscore_confusion(readings, anomaly_z=2.5)
    assert expected.samples == DEVICES * PER_DEVICE
    assert expected.tp > 0 and expected.fp > 0
    assert report.methods["zscore"] == expected


def test_majority_row_is_the_majority_class(report, readings):
    labels = np.array([r.label for r in readings if r.channels == ("value",)])
    anomalies = int(labels.sum())
    assert 0 < anomalies < labels.size / 2
    assert report.methods["majority"] == Confusion(0, 0, labels.size - anomalies, anomalies)
    assert report.anomaly_share == pytest.approx(anomalies / labels.size)
    assert report.labelled_share == 1.0


def test_the_same_inputs_give_the_same_report(report, readings):
    again = evaluate(
        readings,
        source="synthetic",
        folds=3,
        config=learner_config(),
        fed_config=federation_config(),
        batch=50,
        methods=("majority", "zscore", "federated"),
    )
    for name in ("majority", "zscore", "federated"):
        assert again.methods[name] == report.methods[name]


def test_collect_counts_readings_whose_channels_change():
    readings = [Reading("a", k, (float(k),), 0) for k in range(5)]
    readings += [Reading("a", 10 + k, (1.0, 2.0), 1, ("x", "y")) for k in range(3)]
    readings += [Reading("b", k, (1.0, 2.0), None, ("x", "y")) for k in range(4)]
    fleet = collect(readings, batch=2)
    assert sum(fleet.skipped.values()) == 3
    assert len(fleet.devices["a"]) == 5 and len(fleet.devices["b"]) == 4
    assert fleet.devices["a"].bounds == [(0, 2), (2, 4), (4, 5)]
    np.testing.assert_array_equal(fleet.devices["b"].labels, [-1] * 4)
    assert fleet.devices["b"].values.shape == (4, 2)


def test_evaluate_needs_two_devices():
    readings = [Reading("only", k, (float(k % 3),), 0) for k in range(60)]
    with pytest.raises(ValueError, match="at least 2 devices"):
        evaluate(readings, config=learner_config(), fed_config=federation_config())


def test_evaluate_needs_labels():
    readings = [Reading(f"d{k % 2}", k, (float(k % 3),), None) for k in range(60)]
    with pytest.raises(ValueError, match="no labelled reading"):
        evaluate(readings, config=learner_config(), fed_config=federation_config())


# --------------------------------------------------------------------------------------------
# Folds
# --------------------------------------------------------------------------------------------


def check_partition(folds: list[list[str]], ids: list[str]) -> None:
    flat = [d for fold in folds for d in fold]
    assert sorted(flat) == sorted(ids)
    assert len(flat) == len(set(flat))
    assert all(fold for fold in folds)


@pytest.mark.parametrize("n", [2, 5, 12, 19])
def test_folds_default_to_leave_one_out_below_20_devices(n):
    ids = [f"dev{i}" for i in range(n)]
    folds = folds_of(ids, None, seed=1)
    check_partition(folds, ids)
    assert len(folds) == n and all(len(f) == 1 for f in folds)


@pytest.mark.parametrize("n", [20, 37, 200])
def test_folds_default_to_five_from_20_devices(n):
    ids = [f"dev{i}" for i in range(n)]
    folds = folds_of(ids, None, seed=1)
    check_partition(folds, ids)
    assert len(folds) == 5
    assert max(map(len, folds)) - min(map(len, folds)) <= 1


@pytest.mark.parametrize(("n", "k", "expected"), [(12, 3, 3), (12, 50, 12), (12, 1, 2), (7, 2, 2)])
def test_explicit_folds(n, k, expected):
    ids = [f"dev{i}" for i in range(n)]
    folds = folds_of(ids, k, seed=3)
    check_partition(folds, ids)
    assert len(folds) == expected
    assert folds == folds_of(list(reversed(ids)), k, seed=3)  # input order does not matter


def test_poisoned_rounds_follow_their_attack():
    from streaming.evaluate import poisoned
    from streaming.federation import Federation, FederationConfig
    from streaming.learner import LocalRound
    from streaming.model.detectors import NormalStats
    from streaming.model.metrics import Confusion

    federation = Federation(FederationConfig(hidden=0))
    start = federation.network.initial()  # zeros for logistic regression
    params = np.arange(federation.network.size, dtype=np.float64) + 1.0
    hist = np.zeros(82)
    update = LocalRound(
        "d",
        1,
        0,
        params,
        50,
        "ground_truth",
        0.1,
        0.9,
        NormalStats.empty(),
        hist,
        hist,
        hist,
        0,
        Confusion(0, 0, 0, 0),
        0,
    )
    np.testing.assert_allclose(poisoned(update, federation, "scaled_x20").params, 20 * params)
    np.testing.assert_allclose(poisoned(update, federation, "sign_flipped").params, -params)
    assert poisoned(update, federation, "inflated_samples").samples == 2_000_000_000
    worst = poisoned(update, federation, "all")
    np.testing.assert_allclose(worst.params, start - 20 * params)
    assert worst.samples == 2_000_000_000
    with pytest.raises(ValueError, match="unknown attack"):
        poisoned(update, federation, "krum")


def test_poisoned_statistics_follow_their_attack():
    from streaming.evaluate import poisoned
    from streaming.federation import Federation, FederationConfig
    from streaming.learner import LocalRound
    from streaming.model.detectors import NormalStats
    from streaming.model.metrics import Confusion

    federation = Federation(FederationConfig(hidden=0))
    n = federation.network.size
    server_mean = np.full(50, 1.0)
    federation.state.normal = NormalStats(100.0, server_mean, np.eye(50))
    sent = NormalStats(10.0, np.full(50, 1.5), np.eye(50) * 2.0)
    hist = np.zeros(82)
    hist[3] = 25.0
    update = LocalRound(
        "d",
        1,
        0,
        np.zeros(n),
        50,
        "ground_truth",
        0.1,
        0.9,
        sent,
        hist,
        hist,
        hist,
        0,
        Confusion(0, 0, 0, 0),
        0,
    )
    scaled = poisoned(update, federation, "scaled_x20").normal
    np.testing.assert_allclose(scaled.mean, 1.0 + 20 * 0.5)  # 20× as far from the server's
    np.testing.assert_allclose(scaled.comoment, np.eye(50) * 800.0)
    np.testing.assert_allclose(poisoned(update, federation, "sign_flipped").normal.mean, 0.5)
    inflated = poisoned(update, federation, "inflated_samples")
    assert inflated.normal.count == pytest.approx(10.0 * 2e9 / 50)
    np.testing.assert_allclose(inflated.normal.mean, 1.5)
    assert inflated.hist_neg[3] == pytest.approx(25.0 * 2e9 / 50)
    worst = poisoned(update, federation, "all")
    np.testing.assert_allclose(worst.normal.mean, 1.0 - 20 * 0.5)
    assert worst.normal.count == pytest.approx(10.0 * 2e9 / 50)
    assert poisoned(update, federation, "all").anomalous.count == 0  # no rows: nothing to move


def test_the_central_discriminant_is_fishers_direction_with_its_mcc_best_edge():
    """Oracle: Fisher's direction written out here with numpy (the pooled within-class
    covariance, 5 % shrunk towards its diagonal); the threshold is the bin edge whose rule has
    the best MCC on the rows, found with scikit-learn's matthews_corrcoef."""
    from sklearn.metrics import matthews_corrcoef

    from streaming.evaluate import _pooled_discriminant
    from streaming.model.detectors import LOGIT_EDGES

    rng = np.random.default_rng(8)
    X = np.vstack([rng.normal(0, 1, size=(400, 6)), rng.normal(0.8, 1.5, size=(60, 6))])
    X[:, 1] += 0.5 * X[:, 0]  # correlated features: the direction is not the mean gap
    y = np.r_[np.zeros(400, dtype=np.int64), np.ones(60, dtype=np.int64)]
    model = _pooled_discriminant(X, y)
    w = model.discriminant[:-1]
    normal, anomalous = X[y == 0], X[y == 1]
    scatter = sum((rows - rows.mean(0)).T @ (rows - rows.mean(0)) for rows in (normal, anomalous))
    pooled = scatter / (len(X) - 2)
    shrunk = 0.95 * pooled + 0.05 * np.diag(np.diag(pooled))
    fisher = np.linalg.solve(shrunk, anomalous.mean(0) - normal.mean(0))
    np.testing.assert_allclose(  # the same direction, up to its length
        w / np.linalg.norm(w), fisher / np.linalg.norm(fisher), atol=1e-9
    )
    scores = X @ w + model.discriminant[-1]
    mcc = [matthews_corrcoef(y, scores >= t) for t in LOGIT_EDGES]
    assert max(mcc) - matthews_corrcoef(y, scores >= model.discriminant_threshold) < 1e-12
    assert _pooled_discriminant(X[y == 0], y[y == 0]) is None  # no anomaly: no discriminant


def test_the_unlabelled_run_separates_the_rules_classes_the_labelled_one_the_streams(readings):
    """``label_free`` is what a fleet without labels gets: the discriminant of the z-score
    rule's classes (its anomalous class: the rows the rule flagged); with the labels, the
    stream's classes."""
    from streaming.evaluate import featurize, federate

    config = learner_config()
    fleet = collect(readings, 50)
    featurize(fleet, config)
    devices = list(fleet.devices.values())
    unlabelled = federate(devices, config, federation_config(), strip_labels=True).model
    labelled = federate(devices, config, federation_config()).model
    assert unlabelled.discriminant_labels == "pseudo"
    assert (labelled.detector, labelled.discriminant_labels) == ("discriminant", "ground_truth")
    # Its classes' means, by the rule computed here: the direction points from the rule's
    # normal rows to its flagged ones.
    rows = np.vstack([s.features[s.warm] for d in devices for s in d.scored])
    flagged = np.concatenate(
        [np.abs(s.z[s.warm]).max(axis=1) > config.anomaly_z for d in devices for s in d.scored]
    )
    # The rule flags under 5 × the contamination (5 %): anomalies are rare, the Gaussian model
    # is the unlabelled fleet's detector.
    assert 0.01 < flagged.mean() < 0.2
    assert unlabelled.detector == "label_free"
    w = unlabelled.discriminant[:-1]
    assert (rows[flagged] @ w).mean() > (rows[~flagged] @ w).mean()


def test_flead_evaluate_says_why_a_file_gave_no_fleet(tmp_path, capsys):
    """Every row of a file skipped (here: times in an unknown format) leaves no device; the
    command exits 1 and says which rows were skipped, and why."""
    from flead import cli

    path = tmp_path / "readings.csv"
    lines = [f"07/11/2025 10:00:{k:02d},pump_{k % 3},{k}.5,0" for k in range(30)]
    path.write_text("\n".join(["timestamp,device_id,value,label", *lines]) + "\n")
    assert cli.main(["evaluate", "--source", "csv", "--path", str(path)]) == 1
    err = capsys.readouterr().err
    assert "need at least 2 devices to hold one out, got 0" in err
    assert "bad rows skipped: 30 {'unparsable timestamp': 30}" in err
