"""streaming.model.metrics against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
)

from streaming.model.metrics import Confusion, confusion, majority_baseline, newest_pooled

# sklearn warns when a vector holds one class only: those are cases this file means to test.
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")


def sklearn_metrics(t: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": accuracy_score(t, p),
        "precision": precision_score(t, p, zero_division=0.0),
        "recall": recall_score(t, p, zero_division=0.0),
        "f1": f1_score(t, p, zero_division=0.0),
        "mcc": matthews_corrcoef(t, p),
    }


def check_against_sklearn(t: np.ndarray, p: np.ndarray) -> Confusion:
    c = confusion(t, p)
    tn, fp, fn, tp = confusion_matrix(t, p, labels=[0, 1]).ravel()
    assert (c.tp, c.fp, c.tn, c.fn) == (tp, fp, tn, fn)
    assert c.samples == t.size
    for name, expected in sklearn_metrics(t, p).items():
        assert getattr(c, name) == pytest.approx(expected, abs=1e-12), name
    return c


@pytest.mark.parametrize("seed", range(20))
def test_random_labels_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    rate_t, rate_p = rng.uniform(0, 1, 2)
    t = (rng.random(n) < rate_t).astype(np.int64)
    p = (rng.random(n) < rate_p).astype(np.int64)
    check_against_sklearn(t, p)


@pytest.mark.parametrize("constant", [0, 1])
@pytest.mark.parametrize("share", [0.0, 0.02, 0.5, 0.98, 1.0])
def test_constant_predictors_have_zero_mcc(constant, share):
    n = 200
    t = (np.arange(n) < round(share * n)).astype(np.int64)
    p = np.full(n, constant, dtype=np.int64)
    c = check_against_sklearn(t, p)
    assert c.mcc == 0.0
    assert all(np.isfinite(v) for v in c.as_dict().values())


def test_perfect_and_inverted_predictors():
    t = np.array([0, 1, 1, 0, 0, 1, 0])
    assert check_against_sklearn(t, t).mcc == pytest.approx(1.0)
    assert check_against_sklearn(t, 1 - t).mcc == pytest.approx(-1.0)


def test_empty_is_all_zero_never_nan():
    c = confusion(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    assert c == Confusion(0, 0, 0, 0)
    d = c.as_dict()
    assert d == {
        "tp": 0,
        "fp": 0,
        "tn": 0,
        "fn": 0,
        "samples": 0,
        "accuracy": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "mcc": 0.0,
    }


def test_confusions_add_up_over_partitions():
    rng = np.random.default_rng(3)
    t = (rng.random(500) < 0.1).astype(np.int64)
    p = (rng.random(500) < 0.15).astype(np.int64)
    total = Confusion(0, 0, 0, 0)
    for lo in range(0, 500, 73):
        total = total + confusion(t[lo : lo + 73], p[lo : lo + 73])
    assert total == confusion(t, p)
    assert total.mcc == pytest.approx(matthews_corrcoef(t, p))


def test_bool_inputs_and_bad_inputs():
    t = np.array([True, False, True])
    p = np.array([True, True, False])
    assert confusion(t, p) == Confusion(1, 1, 0, 1)
    with pytest.raises(ValueError):
        confusion(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ValueError):
        confusion(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError):
        confusion(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError):
        majority_baseline(np.array([0, -1]))


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([0, 0, 0, 1], Confusion(tp=0, fp=0, tn=3, fn=1)),
        ([1, 1, 1, 0], Confusion(tp=3, fp=1, tn=0, fn=0)),
        ([1, 1, 0, 0], Confusion(tp=0, fp=0, tn=2, fn=2)),  # tie: "normal"
        ([1], Confusion(tp=1, fp=0, tn=0, fn=0)),
        ([], Confusion(0, 0, 0, 0)),
    ],
)
def test_majority_baseline(labels, expected):
    y = np.array(labels, dtype=np.int64)
    c = majority_baseline(y)
    assert c == expected
    if y.size:
        majority = int(np.bincount(y, minlength=2).argmax())  # ties: the lower class, 0
        check_against_sklearn(y, np.full(y.size, majority))


def test_majority_baseline_on_rare_anomalies():
    y = np.zeros(1000, dtype=np.int64)
    y[:20] = 1
    c = majority_baseline(y)
    assert c.accuracy == pytest.approx(0.98)
    assert c.f1 == 0.0 and c.mcc == 0.0


def test_newest_pooled_counts_back_until_the_readings_are_reached():
    # v1-v4 with 2,000 / 1,000 / 3,000 / 1,000 readings. Newest first: v4 (0 newer), v3 (1,000
    # newer), v2 (4,000 newer) are counted; v1 is not (5,000 newer readings already).
    rows = {1: (9, 9, 1973, 9), 2: (8, 2, 980, 10), 3: (30, 10, 2940, 20), 4: (12, 4, 980, 4)}
    by_version = {v: Confusion(*counts) for v, counts in rows.items()}
    first, last, pooled = newest_pooled(by_version, 5_000)
    assert (first, last) == (2, 4)
    assert pooled == Confusion(8 + 30 + 12, 2 + 10 + 4, 980 + 2940 + 980, 10 + 20 + 4)
    assert newest_pooled(by_version, 1_000)[:2] == (4, 4)  # the newest alone has enough
    assert newest_pooled(by_version, 10**6)[0] == 1  # fewer than asked: all of them
    assert newest_pooled({}) is None
