"""streaming.model.detectors against independent oracles: finite differences, scikit-learn's
LogisticRegression and f1_score, numpy covariance and inverse, hand-computed thresholds."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import matthews_corrcoef

from streaming.model import detectors as D
from streaming.model.detectors import (
    INPUT_SCALE,
    LOGIT_EDGES,
    NORMAL_EDGES,
    Network,
    NormalStats,
    best_mcc_threshold,
    histogram,
    normal_precision,
    normal_scores,
    quantile_threshold,
    train,
)
from streaming.model.features import CAP, FEATURE_NAMES, N_FEATURES, VOL_CAP

# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


def test_input_scale_is_the_documented_one():
    expected = [VOL_CAP / 2 if n.startswith("vol") else CAP / 3 for n in FEATURE_NAMES]
    np.testing.assert_array_equal(INPUT_SCALE, expected)


def forward(params: np.ndarray, X: np.ndarray, f: int, h: int) -> np.ndarray:
    """The documented layout: ``[W1 (F×H), b1 (H), w2 (H), b2]`` or ``[w (F), b]``."""
    Xs = X / INPUT_SCALE[:f]
    if h == 0:
        return Xs @ params[:f] + params[f]
    w1 = params[: f * h].reshape(f, h)
    b1 = params[f * h : f * h + h]
    w2 = params[f * h + h : f * h + 2 * h]
    return np.tanh(Xs @ w1 + b1) @ w2 + params[-1]


def weighted_log_loss(params, X, y, w, f, h) -> float:
    s = forward(params, X, f, h)
    return float(np.mean(w * (np.logaddexp(0.0, s) - y * s)))


def small_problem(seed: int, n: int = 25, f: int = N_FEATURES):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-5, 10, size=(n, f))
    y = (rng.random(n) < 0.3).astype(np.float64)
    w = rng.uniform(0.5, 3.0, size=n)
    return X, y, w


@pytest.mark.parametrize("hidden", [0, 4])
@pytest.mark.parametrize("f", [N_FEATURES, 3])
def test_size_and_logits_follow_the_documented_layout(hidden, f):
    net = Network(f, hidden)
    assert net.size == (f + 1 if hidden == 0 else f * hidden + 2 * hidden + 1)
    rng = np.random.default_rng(1)
    params = rng.normal(size=net.size)
    X = rng.uniform(0, 10, size=(7, f))
    np.testing.assert_allclose(net.logits(params, X), forward(params, X, f, hidden), rtol=1e-12)
    with pytest.raises(ValueError):
        net.logits(params[:-1], X)


def test_initial_is_deterministic_and_logistic_regression_starts_at_zero():
    net = Network(N_FEATURES, 4)
    np.testing.assert_array_equal(net.initial(3), net.initial(3))
    assert net.initial(3).shape == (net.size,)
    assert not np.array_equal(net.initial(3), net.initial(4))
    np.testing.assert_array_equal(Network(N_FEATURES, 0).initial(), np.zeros(N_FEATURES + 1))
    with pytest.raises(ValueError):
        Network(0, 4)
    with pytest.raises(ValueError):
        Network(3, -1)


@pytest.mark.parametrize("hidden", [0, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_equals_central_finite_differences(hidden, seed):
    f = N_FEATURES
    net = Network(f, hidden)
    X, y, w = small_problem(seed)
    params = np.random.default_rng(seed + 10).normal(0, 0.5, size=net.size)
    grad = net.gradient(params, X, y, w)
    eps = 1e-6
    numeric = np.empty(net.size)
    for i in range(net.size):
        e = np.zeros(net.size)
        e[i] = eps
        numeric[i] = (
            weighted_log_loss(params + e, X, y, w, f, hidden)
            - weighted_log_loss(params - e, X, y, w, f, hidden)
        ) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def separable(seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 5, size=(n, N_FEATURES))
    w = rng.normal(size=N_FEATURES)
    s = (X / INPUT_SCALE) @ w
    y = (s > np.median(s) + 0.3).astype(np.float64)
    return X, y


def test_logistic_regression_agrees_with_sklearn():
    X, y = separable(0)
    X_test = np.random.default_rng(99).uniform(0, 5, size=(400, N_FEATURES))
    net = Network(N_FEATURES, 0)
    result = train(net, net.initial(), X, y, learning_rate=0.5, epochs=100, l2=0.0, seed=1)
    ours = net.logits(result.params, X) > 0
    sk = LogisticRegression(C=1e4, max_iter=10_000).fit(X / INPUT_SCALE, y)
    theirs = sk.predict(X / INPUT_SCALE) == 1
    assert np.mean(ours == theirs) >= 0.95
    assert result.accuracy >= 0.95
    assert result.accuracy == pytest.approx(np.mean(ours == (y == 1)))
    assert np.mean(ours == (y == 1)) >= np.mean(theirs == (y == 1)) - 0.05
    # ... and on rows it never saw.
    ours_t = net.logits(result.params, X_test) > 0
    theirs_t = sk.predict(X_test / INPUT_SCALE) == 1
    assert np.mean(ours_t == theirs_t) >= 0.95


def test_train_is_deterministic_for_a_seed():
    X, y = separable(2, n=120)
    net = Network(N_FEATURES, 4)
    a = train(net, net.initial(), X, y, epochs=3, seed=7)
    b = train(net, net.initial(), X, y, epochs=3, seed=7)
    c = train(net, net.initial(), X, y, epochs=3, seed=8)
    np.testing.assert_array_equal(a.params, b.params)
    assert a.loss == b.loss and a.accuracy == b.accuracy
    assert not np.array_equal(a.params, c.params)


def test_train_reports_the_class_weighted_loss():
    """Positives weighted n_neg / n_pos (cap MAX_POSITIVE_WEIGHT), weights rescaled to mean 1."""
    X, y = separable(3, n=90)
    y[:] = 0
    y[:6] = 1  # 6 positives, 84 negatives: weight 14
    net = Network(N_FEATURES, 0)
    result = train(net, net.initial(), X, y, epochs=2, seed=0)
    w = np.where(y == 1, 84 / 6, 1.0)
    w = w / w.mean()
    s = forward(result.params, X, N_FEATURES, 0)
    expected = np.mean(w * (np.logaddexp(0, s) - y * s))
    assert result.loss == pytest.approx(expected, rel=1e-12)
    y[:] = 0
    y[0] = 1  # 1 positive in 90: the weight is capped at 50
    result = train(net, net.initial(), X, y, epochs=1, seed=0)
    w = np.where(y == 1, D.MAX_POSITIVE_WEIGHT, 1.0)
    w = w / w.mean()
    s = forward(result.params, X, N_FEATURES, 0)
    assert result.loss == pytest.approx(np.mean(w * (np.logaddexp(0, s) - y * s)), rel=1e-12)


def textbook_sgd(params, X, y, f, h, *, lr, epochs, batch_size, l2, seed):
    """Minibatch SGD written out from the definitions: one permutation of the rows per epoch
    from ``default_rng(seed)``, the class-weighted log-loss (positives weighted n_neg / n_pos,
    capped, weights rescaled to mean 1), each batch's mean gradient, then
    ``p ← p·(1 − lr·l2) − lr·∇``."""
    p = np.array(params, dtype=np.float64)
    Xs = X / INPUT_SCALE[:f]
    pos = y.sum()
    weight = min((y.size - pos) / pos, D.MAX_POSITIVE_WEIGHT) if 0 < pos < y.size else 1.0
    w = np.where(y == 1, weight, 1.0)
    w = w / w.mean()
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(y.size)
        for start in range(0, y.size, batch_size):
            rows = order[start : start + batch_size]
            x, t, c = Xs[rows], y[rows], w[rows]
            grad = np.zeros_like(p)
            for xi, ti, ci in zip(x, t, c, strict=True):
                if h == 0:
                    s = xi @ p[:f] + p[f]
                    e = ci * (1.0 / (1.0 + np.exp(-s)) - ti)
                    grad += np.concatenate((e * xi, [e]))
                    continue
                w1 = p[: f * h].reshape(f, h)
                b1, w2 = p[f * h : f * h + h], p[f * h + h : f * h + 2 * h]
                a = np.tanh(xi @ w1 + b1)
                e = ci * (1.0 / (1.0 + np.exp(-(a @ w2 + p[-1]))) - ti)
                back = e * w2 * (1.0 - a**2)
                grad += np.concatenate((np.outer(xi, back).ravel(), back, e * a, [e]))
            p = p * (1.0 - lr * l2) - lr * grad / rows.size
    return p


@pytest.mark.parametrize("hidden", [0, 5])
@pytest.mark.parametrize(("lr", "l2"), [(0.3, 0.01), (0.5, 1.0)])
def test_train_is_minibatch_sgd_step_by_step(hidden, lr, l2):
    """The hot loop's rewrites (biases as weights of constant units, σ through tanh) leave
    every step the textbook one: the same parameters to rounding after 3 epochs of uneven
    batches (23 rows in batches of 8), also under a weight decay that halves every weight at
    each step."""
    X, y, _ = small_problem(11, n=23)
    net = Network(N_FEATURES, hidden)
    start = net.initial(2) + np.random.default_rng(3).normal(0, 0.1, net.size)
    kwargs = {"lr": lr, "epochs": 3, "batch_size": 8, "l2": l2, "seed": 5}
    result = train(net, start, X, y, learning_rate=lr, epochs=3, batch_size=8, l2=l2, seed=5)
    expected = textbook_sgd(start, X, y, N_FEATURES, hidden, **kwargs)
    np.testing.assert_allclose(result.params, expected, rtol=1e-10, atol=1e-12)
    assert not np.allclose(result.params, start)


def test_zero_epochs_leave_the_parameters_and_bad_arguments_raise():
    X, y = separable(4, n=20)
    net = Network(N_FEATURES, 2)
    start = net.initial(5)
    np.testing.assert_array_equal(train(net, start, X, y, epochs=0).params, start)
    for kwargs in ({"learning_rate": 0.0}, {"epochs": -1}, {"batch_size": 0}, {"l2": -1.0}):
        with pytest.raises(ValueError):
            train(net, start, X, y, **kwargs)
    with pytest.raises(ValueError):
        train(net, start, X[:0], y[:0])
    with pytest.raises(ValueError):
        train(net, start, X[:, :3], y)
    with pytest.raises(ValueError):
        train(net, start, X, y[:-1])


# --------------------------------------------------------------------------------------------
# The normal model
# --------------------------------------------------------------------------------------------


def test_normal_stats_add_up_exactly():
    rng = np.random.default_rng(6)
    A = rng.normal(3.0, 2.0, size=(37, 5))
    B = rng.normal(-1.0, 0.5, size=(11, 5)) @ rng.normal(size=(5, 5))
    both = np.vstack((A, B))
    total = NormalStats.of(A) + NormalStats.of(B)
    assert total.count == 48
    np.testing.assert_allclose(total.mean, both.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        total.comoment, np.cov(both, rowvar=False, ddof=0) * 48, rtol=1e-10, atol=1e-10
    )
    single = NormalStats.of(A)
    np.testing.assert_allclose(single.comoment, np.cov(A, rowvar=False, ddof=0) * 37, rtol=1e-10)
    empty = NormalStats.empty(5)
    for s in (empty + single, single + empty, NormalStats.of(np.zeros((0, 5))) + single):
        assert s.count == 37
        np.testing.assert_allclose(s.mean, single.mean)
        np.testing.assert_allclose(s.comoment, single.comoment)
    assert (empty + empty).count == 0


def test_normal_stats_scaled_keeps_the_distribution():
    rng = np.random.default_rng(7)
    A = rng.normal(size=(20, 3))
    s = NormalStats.of(A).scaled(0.5)
    assert s.count == 10
    np.testing.assert_allclose(s.mean, A.mean(0))
    np.testing.assert_allclose(s.comoment, np.cov(A, rowvar=False, ddof=0) * 10)
    # Doubling by scaling equals adding the same rows twice.
    twice = NormalStats.of(A) + NormalStats.of(A)
    np.testing.assert_allclose(NormalStats.of(A).scaled(2.0).comoment, twice.comoment)


def shrunk_covariance(X: np.ndarray) -> np.ndarray:
    """The documented estimate: sample covariance shrunk towards its diagonal by SHRINK, the
    diagonal floored at 1e-4."""
    cov = np.cov(X, rowvar=False, ddof=1)
    diag = np.maximum(np.diag(cov), 1e-4)
    shrunk = (1 - D.SHRINK) * cov + D.SHRINK * np.diag(diag)
    shrunk[np.diag_indices_from(shrunk)] = diag
    return shrunk


def test_normal_scores_are_mahalanobis_lengths_over_f():
    rng = np.random.default_rng(8)
    f = 6
    mix = rng.normal(size=(f, f))
    X = rng.normal(size=(500, f)) @ mix + 2.0
    X[:, 4] = 1.5  # a feature that never moves: floored, not singular
    stats = NormalStats.of(X)
    precision = normal_precision(stats)
    expected_p = np.linalg.inv(shrunk_covariance(X))
    np.testing.assert_allclose(precision, expected_p, rtol=1e-8, atol=1e-8)
    Q = rng.normal(size=(40, f)) @ mix + 2.0
    d = Q - X.mean(0)
    expected = np.minimum(np.sqrt(np.einsum("ni,ij,nj->n", d, expected_p, d) / f), NORMAL_EDGES[-1])
    np.testing.assert_allclose(normal_scores(stats.mean, precision, Q), expected, rtol=1e-8)
    assert normal_scores(stats.mean, precision, Q + 1e6).max() == NORMAL_EDGES[-1]


def test_normal_scores_with_a_diagonal_covariance_are_rms_z():
    """A diagonal covariance is left alone by the shrinkage: the score is the RMS of the
    per-feature z (no shrinkage to account for)."""
    var = np.array([4.0, 0.25, 9.0])
    stats = NormalStats(101.0, np.array([1.0, 2.0, 3.0]), np.diag(var) * 100.0)
    precision = normal_precision(stats)
    np.testing.assert_allclose(precision, np.diag(1 / var), rtol=1e-12)
    Q = np.array([[3.0, 2.5, 0.0], [1.0, 2.0, 3.0]])
    z = (Q - stats.mean) / np.sqrt(var)
    np.testing.assert_allclose(
        normal_scores(stats.mean, precision, Q), np.sqrt((z**2).mean(1)), rtol=1e-12
    )


def test_normal_precision_below_two_rows_is_identity():
    np.testing.assert_array_equal(normal_precision(NormalStats.empty(4)), np.eye(4))
    one = NormalStats.of(np.ones((1, 4)))
    np.testing.assert_array_equal(normal_precision(one), np.eye(4))


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def histogram_by_hand(scores, edges) -> np.ndarray:
    """Bin 0: below edges[0]; bin k: edges[k-1] <= s < edges[k]; last: s >= edges[-1]."""
    counts = np.zeros(len(edges) + 1, dtype=np.int64)
    for s in scores:
        k = 0
        while k < len(edges) and s >= edges[k]:
            k += 1
        counts[k] += 1
    return counts


@pytest.mark.parametrize("edges", [LOGIT_EDGES, NORMAL_EDGES, np.array([0.0, 1.0, 2.5])])
def test_histogram_bins(edges):
    rng = np.random.default_rng(9)
    scores = np.concatenate(
        (rng.uniform(edges[0] - 3, edges[-1] + 3, 300), edges, [-np.inf, np.inf, edges[0] - 1e-9])
    )
    got = histogram(scores, edges)
    np.testing.assert_array_equal(got, histogram_by_hand(scores, edges))
    assert got.dtype == np.int64
    assert got.sum() == scores.size
    assert histogram(np.array([]), edges).tolist() == [0] * (len(edges) + 1)


def bin_representatives(edges: np.ndarray) -> np.ndarray:
    """A score inside each bin of ``edges``."""
    mids = (edges[:-1] + edges[1:]) / 2
    return np.concatenate(([edges[0] - 1.0], mids, [edges[-1] + 1.0]))


def brute_force_mcc_threshold(pos: np.ndarray, neg: np.ndarray, edges: np.ndarray) -> float:
    reps = bin_representatives(edges)
    scores = np.concatenate((np.repeat(reps, pos), np.repeat(reps, neg)))
    truth = np.concatenate((np.ones(pos.sum()), np.zeros(neg.sum())))
    best_t, best = None, -2.0
    for t in edges:  # ascending: ">=" keeps the higher edge on ties
        mcc = matthews_corrcoef(truth, scores >= t)
        if mcc >= best - 1e-12:
            best_t, best = t, mcc
    return float(best_t)


def test_best_mcc_threshold_hand_made():
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    # bins: <0, [0,1), [1,2), [2,3), >=3
    pos = np.array([0, 0, 1, 3, 4])
    neg = np.array([50, 30, 10, 2, 0])
    # t=2: tp 7, fp 2, fn 1, tn 90 → MCC (630-2)/sqrt(9·8·92·91) = 0.840;
    # t=3: tp 4, fp 0, fn 4, tn 92 → 368/sqrt(4·8·92·96) = 0.693; t=1: tp 8, fp 12 → 0.614
    assert best_mcc_threshold(pos, neg, edges) == 2.0
    assert best_mcc_threshold(pos, neg, edges) == brute_force_mcc_threshold(pos, neg, edges)
    # Anomaly-heavy and weakly ranked: the lowest edge would be F1-best (F1 0.65 against 0.33
    # at t=3) with MCC 0.02; the MCC-best edge (0.14) flags only the top bin.
    pos = np.array([10, 10, 10, 10, 11])
    neg = np.array([10, 10, 10, 10, 5])
    assert best_mcc_threshold(pos, neg, edges) == 3.0
    assert best_mcc_threshold(np.zeros(5), neg, edges) is None
    assert best_mcc_threshold(pos, np.zeros(5), edges) is None


@pytest.mark.parametrize("seed", range(8))
def test_best_mcc_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    edges = LOGIT_EDGES
    bins = edges.size + 1
    centre = rng.integers(20, 60)
    pos = np.bincount(
        np.clip(rng.normal(centre + 15, 8, rng.integers(1, 60)).astype(int), 0, bins - 1),
        minlength=bins,
    )
    neg = np.bincount(
        np.clip(rng.normal(centre, 10, rng.integers(1, 800)).astype(int), 0, bins - 1),
        minlength=bins,
    )
    assert best_mcc_threshold(pos, neg, edges) == brute_force_mcc_threshold(pos, neg, edges)


def test_quantile_threshold_hand_computed():
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    counts = np.array([0, 50, 30, 15, 5])  # 100 scores
    # share flagged by ">= edge": 1.0, 0.5, 0.2, 0.05
    assert quantile_threshold(counts, edges, 0.5) == 1.0
    assert quantile_threshold(counts, edges, 0.49) == 2.0
    assert quantile_threshold(counts, edges, 0.2) == 2.0
    assert quantile_threshold(counts, edges, 0.05) == 3.0
    assert quantile_threshold(counts, edges, 1.0) == 0.0
    assert quantile_threshold(np.zeros(5), edges, 0.1) is None
    # Counts may be faded (non-integer) sums.
    assert quantile_threshold(counts * 0.9, edges, 0.2) == 2.0


# --------------------------------------------------------------------------------------------
# The discriminant
# --------------------------------------------------------------------------------------------


def test_discriminant_of_uncorrelated_classes_is_hand_computed():
    # Two classes on symmetric grids: the pooled covariance is exactly diagonal, so the shrink
    # towards the diagonal does nothing and Fisher's direction is gap / variance per feature.
    grid = np.array([[x, y] for x in (-1.0, 1.0) for y in (-2.0, 2.0)])
    normal = NormalStats.of(grid)  # mean (0, 0)
    anomalous = NormalStats.of(grid + np.array([3.0, 4.0]))  # mean (3, 4)
    # Pooled covariance: comoments (4, 16) per class summed, over 4 + 4 - 2 rows: (8/6, 32/6).
    var = np.array([8.0 / 6.0, 32.0 / 6.0])
    w = np.array([3.0, 4.0]) / var
    distance = np.sqrt(np.array([3.0, 4.0]) @ w)
    found = D.discriminant(normal, anomalous)
    np.testing.assert_allclose(found[:-1], w / distance)
    np.testing.assert_allclose(found[-1], -0.5 * (np.array([3.0, 4.0]) @ (w / distance)))
    # The score is 0 midway, ±D/2 at the class means.
    scores = D.discriminant_scores(found, np.array([[0.0, 0.0], [1.5, 2.0], [3.0, 4.0]]))
    np.testing.assert_allclose(scores, [-distance / 2, 0.0, distance / 2], atol=1e-12)
    # Equal class sizes: the Bayes boundary is the midpoint; 3× more normal rows: ln 3 / D.
    assert D.discriminant_boundary(normal, anomalous) == pytest.approx(0.0)
    triple = NormalStats.of(np.vstack((grid, grid, grid)))
    assert D.discriminant_boundary(triple, anomalous) == pytest.approx(
        np.log(3.0) / D._fisher(triple, anomalous)[1]
    )


class _ShrunkCovariance:
    """scikit-learn's covariance-estimator protocol with the documented shrink (SHRINK towards
    the diagonal), so LinearDiscriminantAnalysis fits the model the module means to compute."""

    def fit(self, X):
        cov = np.cov(X, rowvar=False, bias=True)
        self.covariance_ = (1 - D.SHRINK) * cov + D.SHRINK * np.diag(np.diag(cov))
        return self


def test_discriminant_agrees_with_sklearn_lda():
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    rng = np.random.default_rng(3)
    mix = rng.normal(size=(5, 5))
    X0 = rng.normal(size=(3000, 5)) @ mix
    X1 = rng.normal(size=(1000, 5)) @ mix + rng.normal(0, 2, 5)
    found = D.discriminant(NormalStats.of(X0), NormalStats.of(X1))
    boundary = D.discriminant_boundary(NormalStats.of(X0), NormalStats.of(X1))
    X = np.vstack((X0, X1))
    y = np.r_[np.zeros(len(X0)), np.ones(len(X1))]
    lda = LinearDiscriminantAnalysis(solver="lsqr", covariance_estimator=_ShrunkCovariance())
    lda.fit(X, y)
    # Same direction (sklearn's covariance divides by n, this one by n - 2: scale only) ...
    cosine = found[:-1] @ lda.coef_[0] / np.linalg.norm(found[:-1]) / np.linalg.norm(lda.coef_[0])
    assert cosine == pytest.approx(1.0, abs=1e-9)
    # ... and the same decisions at the Bayes boundary (sklearn: posterior log-odds > 0).
    probe = rng.normal(size=(500, 5)) @ mix + rng.normal(0, 1, 5)
    ours = D.discriminant_scores(found, probe) >= boundary
    theirs = lda.decision_function(probe) >= 0
    assert np.mean(ours == theirs) > 0.995


def test_discriminant_needs_two_rows_per_class_and_distinct_means():
    rows = np.random.default_rng(0).normal(size=(10, 3))
    assert D.discriminant(NormalStats.of(rows), NormalStats.of(rows[:1])) is None
    assert D.discriminant(NormalStats.empty(3), NormalStats.of(rows)) is None
    assert D.discriminant(NormalStats.of(rows), NormalStats.of(rows)) is None  # same means
    assert D.discriminant_boundary(NormalStats.of(rows), NormalStats.of(rows[:1])) is None
