"""FLEAD's model math: the one module that the Flink job, the FedAvg service and the Spark
evaluation all import (DESIGN §4), so that "the model" means the same thing everywhere.

Only numpy and the standard library are imported: the PyFlink job runs in its own environment
(numpy < 2.2 there), so nothing here may rely on numpy-2-only APIs or on any other package.

Contents, in the order data flows through them:

1. Running statistics per device (Welford; optional exponential forgetting), z-score, severity.
2. Features per reading, scale-free so one global model can share weights across devices whose
   raw values differ by orders of magnitude; the original system's ``[mean, std, z]`` is kept
   as the ``"original"`` feature set to compare against.
3. The linear (logistic-regression) model and one round of local SGD from the global model.
4. Binary-classification metrics (confusion matrix, majority-class baseline).
5. Aggregation rules for the FedAvg service (FedAvg, trimmed mean, coordinate median, norm
   clipping, staleness weighting), all pure functions of the devices' parameter vectors.

Everything is a small pure function of immutable values: state lives in the callers (Flink's
keyed state, the service's buffer), which keeps checkpointing and replay deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

# --------------------------------------------------------------------------------------------
# 1. Running statistics, z-score, severity
# --------------------------------------------------------------------------------------------

ANOMALY_Z = 2.5
"""|z| above this is an anomaly (DESIGN §4); also the pseudo-label rule."""
CRITICAL_Z = 4.0
"""|z| above this is a ``critical`` anomaly rather than a ``warning``."""
WARMUP = 10
"""Readings a device must have seen before its z-score means anything: below it z is 0."""
Z_CAP = 10.0
"""Features are clipped to this many standard deviations so one wild reading cannot blow SGD up;
also the |z| reported for a change after a perfectly constant history (see :func:`z_score`)."""
Z_LIMIT = 1e6
"""|z_score| never exceeds this, so the value written to Kafka/Postgres is always finite."""
_REL_DEGENERATE = 1e-12
"""A standard deviation at most this fraction of |mean| is floating-point noise, not spread."""


class RunningStats(NamedTuple):
    """One device's running statistics: O(1) memory however long the stream.

    ``m2`` is the sum of squared deviations from the mean (Welford), i.e. ``m2 / count`` is the
    population variance. A NamedTuple so Flink can keep it as a plain tuple in keyed state.
    ``RunningStats()`` is the empty state of a new device.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0


def update_stats(stats: RunningStats, x: float, alpha: float | None = None) -> RunningStats:
    """Return ``stats`` with reading ``x`` included.

    Welford's update (``alpha=None``, the default) is exact and numerically stable: it never
    subtracts two large sums, so a sensor reading ``1e9 + noise`` keeps its small variance.

    ``alpha`` (0 < alpha <= 1) turns on exponential forgetting for drifting sensors: the mean and
    variance then weight a reading ``k`` steps old by ``(1 - alpha)**k`` (Finch 2009). Until
    ``count >= 1/alpha`` the step size is ``1/count``, which is exactly Welford, so a new device
    is not biased towards its first reading. ``m2`` is kept as ``variance * count`` so that
    :func:`stats_std` and :func:`z_score` work unchanged for both variants.
    """
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"reading must be finite, got {x!r}")
    n = stats.count + 1
    delta = x - stats.mean
    if alpha is None or n * alpha <= 1.0:
        mean = stats.mean + delta / n
        return RunningStats(n, mean, stats.m2 + delta * (x - mean))
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    variance = (1.0 - alpha) * (stats.m2 / stats.count + alpha * delta * delta)
    return RunningStats(n, stats.mean + alpha * delta, variance * n)


def stats_std(stats: RunningStats) -> float:
    """Sample standard deviation (ddof=1, like ``np.std(values, ddof=1)``); 0.0 below 2 readings."""
    if stats.count < 2:
        return 0.0
    return math.sqrt(max(stats.m2, 0.0) / (stats.count - 1))


def _ratio(num: float, sigma: float, level: float) -> float:
    """``num / sigma``, defined when sigma is (numerically) zero.

    Zero spread means the history was constant: no change scores 0, any change scores ``Z_CAP``
    with the sign of the change (a stuck sensor that moves is exactly what should be flagged).
    "Zero" is relative to the level, so the rule does not depend on the device's units.
    """
    tol = _REL_DEGENERATE * abs(level)
    if sigma > tol:
        return num / sigma
    if abs(num) <= tol:
        return 0.0
    return math.copysign(Z_CAP, num)


def z_score(stats: RunningStats, x: float, warmup: int = WARMUP) -> float:
    """z of reading ``x`` against the device's stats *before* ``x`` is included.

    Scoring against the stats before ``x`` keeps an anomaly from diluting its own score (with n
    readings, including ``x`` caps |z| at about sqrt(n)). Returns 0.0 while
    ``stats.count < warmup``: mean and std of a handful of readings are too noisy to judge by.
    See :func:`_ratio` for a perfectly constant history. Always finite (clipped to ±Z_LIMIT).
    """
    if stats.count < max(warmup, 1):
        return 0.0
    z = _ratio(float(x) - stats.mean, stats_std(stats), stats.mean)
    return max(-Z_LIMIT, min(Z_LIMIT, z))


def severity(z: float, anomaly_z: float = ANOMALY_Z, critical_z: float = CRITICAL_Z) -> str | None:
    """``None`` for a normal reading (|z| <= anomaly_z), ``"warning"`` above ``anomaly_z``,
    ``"critical"`` above ``critical_z``: the ``severity`` field of the ``anomalies`` topic."""
    magnitude = abs(z)
    if magnitude > critical_z:
        return "critical"
    if magnitude > anomaly_z:
        return "warning"
    return None


def pseudo_label(z: float, anomaly_z: float = ANOMALY_Z) -> int:
    """The z-score rule as a label (1 = anomaly) for training when the stream carries no label.

    A model trained on it can at best re-learn this rule; that is why the docs and the
    ``local-model-updates`` say which labels a round used.
    """
    return int(abs(z) > anomaly_z)


def pseudo_labels(z: np.ndarray, anomaly_z: float = ANOMALY_Z) -> np.ndarray:
    """Vectorised :func:`pseudo_label` (int64 array of 0/1)."""
    return (np.abs(np.asarray(z, dtype=np.float64)) > anomaly_z).astype(np.int64)


# --------------------------------------------------------------------------------------------
# 2. Features
# --------------------------------------------------------------------------------------------

FEATURE_SETS = ("scale_free", "original")
"""``scale_free`` (the default, for global models) and ``original`` (the original system's
``[mean, std, z]``, in device units, kept only to measure what scale-freedom buys)."""

FEATURE_NAMES: dict[str, tuple[str, ...]] = {
    "scale_free": ("abs_z", "excess_z", "abs_step", "abs_z_prev"),
    "original": ("mean", "std", "z"),
}
"""Column names of each feature set, in order (for docs, dashboards and model inspection)."""


def feature_count(feature_set: str = "scale_free") -> int:
    """Number of features (= model weights) of ``feature_set``."""
    return len(_feature_names(feature_set))


def _feature_names(feature_set: str) -> tuple[str, ...]:
    try:
        return FEATURE_NAMES[feature_set]
    except KeyError:
        raise ValueError(
            f"unknown feature set {feature_set!r}; valid: {', '.join(FEATURE_SETS)}"
        ) from None


def reading_features(
    x: float,
    x_prev: float | None,
    stats: RunningStats,
    feature_set: str = "scale_free",
    warmup: int = WARMUP,
) -> np.ndarray:
    """Feature row (1-D float64) of reading ``x``; ``stats`` are the device's stats *before* ``x``
    and ``x_prev`` its previous reading (``None`` for the first one).

    ``scale_free`` (with μ, σ the device's running mean and sample std before ``x``,
    z = (x - μ)/σ as in :func:`z_score`; all 0 while ``stats.count < warmup``):

    - ``abs_z      = min(|z|, Z_CAP)``: how far the reading is from the device's normal level, in
      the device's own standard deviations. The z-score rule thresholds exactly this.
    - ``excess_z   = max(abs_z - ANOMALY_Z, 0)``: the part of |z| beyond the anomaly threshold
      (a fixed 2.5 here, part of the feature's definition). With ``abs_z`` a linear score becomes
      piecewise linear with a knee at the threshold, so it can rise steeply for real outliers
      without also scoring ordinary noise high. (Tried against ``min(z², cap)`` and
      ``log1p(z²)`` in a federated simulation on synthetic spikes and SKAB: equal or better F1.)
    - ``abs_step   = min(|x - x_prev| / σ, Z_CAP)``: the jump from the previous reading in units of
      σ. Spikes jump; a slow drift or a seasonal swing moves |z| but not the step.
    - ``abs_z_prev = min(|x_prev - μ| / σ, Z_CAP)``: how unusual the previous reading was. With
      ``abs_step`` it tells a spike (big step, normal previous reading) from the return to
      normal after one (big step, abnormal previous reading).

    Why scale-free: a device whose readings are ``a·x + b`` (any unit or offset, a ≠ 0) has
    running mean ``a·μ + b`` and std ``|a|·σ``, so every feature above - a difference divided by
    σ, then an absolute value - is unchanged. One weight vector therefore means the same on a
    0-1 humidity sensor and on a 1e6 Pa pressure sensor. Every feature lies in [0, Z_CAP], which
    keeps SGD steps bounded. (A short-window volatility or level feature would need a second
    running state per device; on the data tried it added at most a few hundredths of F1.)

    ``original``: ``[μ, σ, z]`` in device units (z as :func:`z_score` returns it, not capped at
    Z_CAP), as the original system had them.
    """
    names = _feature_names(feature_set)
    if feature_set == "original":
        return np.array([stats.mean, stats_std(stats), z_score(stats, x, warmup)], dtype=np.float64)
    if stats.count < max(warmup, 1):
        return np.zeros(len(names), dtype=np.float64)
    x = float(x)
    sigma = stats_std(stats)
    mu = stats.mean
    z = _ratio(x - mu, sigma, mu)
    abs_z = min(abs(z), Z_CAP)
    if x_prev is None:
        abs_step = abs_z_prev = 0.0
    else:
        abs_step = min(abs(_ratio(x - float(x_prev), sigma, mu)), Z_CAP)
        abs_z_prev = min(abs(_ratio(float(x_prev) - mu, sigma, mu)), Z_CAP)
    excess_z = max(abs_z - ANOMALY_Z, 0.0)
    return np.array([abs_z, excess_z, abs_step, abs_z_prev], dtype=np.float64)


def _prefix_stats(
    v: np.ndarray, initial: RunningStats
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(count, mean, m2)`` of ``initial`` merged with ``v[:i]``, for i = 0..n (n + 1 rows).

    Prefix sums of the values shifted by the first one (the shift keeps ``1e9 + noise`` from
    cancelling catastrophically), merged into ``initial`` with Chan et al.'s pairwise formula.
    """
    n = v.size
    i = np.arange(n + 1, dtype=np.int64)
    shift = v[0] if n else 0.0
    d = v - shift
    s1 = np.concatenate(([0.0], np.cumsum(d)))
    s2 = np.concatenate(([0.0], np.cumsum(d * d)))
    safe_i = np.maximum(i, 1)
    mean_b = shift + s1 / safe_i
    m2_b = np.maximum(s2 - s1 * s1 / safe_i, 0.0)
    n0, mean0, m2_0 = initial
    count = n0 + i
    safe_count = np.maximum(count, 1)
    delta = np.where(i > 0, mean_b - mean0, 0.0)
    mean = np.where(count > 0, mean0 + delta * i / safe_count, 0.0)
    m2 = m2_0 + np.where(i > 0, m2_b, 0.0) + delta * delta * n0 * i / safe_count
    return count, mean, m2


def series_stats(
    values: np.ndarray, alpha: float | None = None, initial: RunningStats | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(count, mean, std)`` arrays: for each reading of one device's time-ordered series, its
    running stats *before* that reading, as :func:`update_stats`/:func:`stats_std` give them,
    starting from ``initial`` (the device's stats before the series; empty by default).

    Welford (``alpha=None``) is vectorised (see :func:`_prefix_stats`); the forgetting variant is
    a plain loop over :func:`update_stats` (it is a recursion, not a prefix sum).
    """
    v = _as_series(values)
    initial = initial or RunningStats()
    n = v.size
    if alpha is not None:
        count = initial.count + np.arange(n, dtype=np.int64)
        mean = np.empty(n)
        std = np.empty(n)
        stats = initial
        for i, x in enumerate(v.tolist()):
            mean[i], std[i] = stats.mean, stats_std(stats)
            stats = update_stats(stats, x, alpha)
        return count, mean, std
    count, mean, m2 = (a[:-1] for a in _prefix_stats(v, initial))
    std = np.where(count > 1, np.sqrt(m2 / np.maximum(count - 1, 1)), 0.0)
    return count, mean, std


def merge_series(initial: RunningStats, values: np.ndarray) -> RunningStats:
    """``initial`` with every reading of ``values`` included: the Welford result of
    :func:`update_stats` applied one by one, in one vectorised step."""
    count, mean, m2 = (a[-1] for a in _prefix_stats(_as_series(values), initial))
    return RunningStats(int(count), float(mean), float(m2))


def _series_ratio(num: np.ndarray, sigma: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Vectorised :func:`_ratio` (same rule for a perfectly constant history)."""
    tol = _REL_DEGENERATE * np.abs(level)
    ok = sigma > tol
    degenerate = np.where(np.abs(num) <= tol, 0.0, np.copysign(Z_CAP, num))
    return np.where(ok, num / np.where(ok, sigma, 1.0), degenerate)


def series_z_scores(
    values: np.ndarray,
    warmup: int = WARMUP,
    alpha: float | None = None,
    initial: RunningStats | None = None,
) -> np.ndarray:
    """Vectorised :func:`z_score` of every reading of one device's time-ordered series."""
    v = _as_series(values)
    count, mean, std = series_stats(v, alpha, initial)
    z = np.clip(_series_ratio(v - mean, std, mean), -Z_LIMIT, Z_LIMIT)
    return np.where(count >= max(warmup, 1), z, 0.0)


def series_features(
    values: np.ndarray,
    feature_set: str = "scale_free",
    warmup: int = WARMUP,
    alpha: float | None = None,
    initial: RunningStats | None = None,
    previous: float | None = None,
) -> np.ndarray:
    """Feature matrix (n × k) of one device's time-ordered series: row i is exactly
    ``reading_features(values[i], values[i-1], stats_before_i, feature_set)`` (up to float
    rounding), so batch evaluation in Spark scores the rows the Flink job trained on.

    ``initial`` and ``previous`` continue a device's series: its stats and last reading before
    ``values`` (the Flink job scores a batch of readings this way)."""
    names = _feature_names(feature_set)
    v = _as_series(values)
    count, mean, std = series_stats(v, alpha, initial)
    warm = count >= max(warmup, 1)
    z = np.where(warm, np.clip(_series_ratio(v - mean, std, mean), -Z_LIMIT, Z_LIMIT), 0.0)
    if feature_set == "original":
        return np.column_stack([mean, std, z]).astype(np.float64).reshape(v.size, len(names))
    # A warm reading always has a previous one (warm means count >= 1), except at the start of
    # a continued series whose caller does not know it: then the step features are 0, as in
    # reading_features with x_prev=None.
    first = v[:1] if previous is None else np.array([float(previous)])
    prev = np.concatenate((first, v[:-1]))
    abs_z = np.minimum(np.abs(z), Z_CAP)
    features = np.column_stack(
        [
            abs_z,
            np.maximum(abs_z - ANOMALY_Z, 0.0),
            np.minimum(np.abs(_series_ratio(v - prev, std, mean)), Z_CAP),
            np.minimum(np.abs(_series_ratio(prev - mean, std, mean)), Z_CAP),
        ]
    )
    if previous is None and v.size:
        features[0, 2:] = 0.0
    return np.where(warm[:, None], features, 0.0).reshape(v.size, len(names))


def _as_series(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"a series must be 1-D, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("a series must contain only finite readings")
    return v


# --------------------------------------------------------------------------------------------
# 3. Linear model and local SGD
# --------------------------------------------------------------------------------------------

MAX_POSITIVE_WEIGHT = 50.0
"""Cap of the "balanced" positive class weight: with ~2 % anomalies the ratio is ~49, and one
mislabelled positive in a small round must not dominate it beyond that."""


@dataclass(frozen=True, eq=False)
class LinearModel:
    """A logistic-regression model: ``P(anomaly | x) = sigmoid(weights · x + bias)``.

    Immutable: ``weights`` is copied to a read-only float64 array, and non-finite parameters are
    refused, so a model that reaches Kafka or Postgres is always valid JSON.
    """

    weights: np.ndarray
    bias: float = 0.0

    def __post_init__(self) -> None:
        weights = np.array(self.weights, dtype=np.float64)
        if weights.ndim != 1:
            raise ValueError(f"weights must be 1-D, got shape {weights.shape}")
        bias = float(self.bias)
        if not (np.all(np.isfinite(weights)) and math.isfinite(bias)):
            raise ValueError("model parameters must be finite")
        weights.setflags(write=False)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "bias", bias)

    @classmethod
    def zeros(cls, k: int) -> LinearModel:
        """The all-zero model with ``k`` weights: the initial global model (version 0)."""
        return cls(np.zeros(int(k)), 0.0)

    @property
    def n_features(self) -> int:
        return int(self.weights.size)

    def to_json_dict(self) -> dict[str, Any]:
        """``{"weights": [float, ...], "bias": float}``, the form of DESIGN §2's messages."""
        return {"weights": [float(w) for w in self.weights], "bias": float(self.bias)}

    @classmethod
    def from_json_dict(cls, obj: Mapping[str, Any]) -> LinearModel:
        """Inverse of :meth:`to_json_dict`; ``ValueError`` with the reason for anything else
        (consumers send that reason to the dead-letter topic)."""
        if not isinstance(obj, Mapping):
            raise ValueError("a model must be a JSON object with 'weights' and 'bias'")
        weights, bias = obj.get("weights"), obj.get("bias")
        if not isinstance(weights, list | tuple) or not all(_is_number(w) for w in weights):
            raise ValueError("model 'weights' must be a list of numbers")
        if not _is_number(bias):
            raise ValueError("model 'bias' must be a number")
        return cls(np.array(weights, dtype=np.float64), float(bias))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class RoundMetrics(NamedTuple):
    """How one local round went, measured on the round's *own* training data after the update.

    Training figures (hence the names): they go into ``local-model-updates`` as ``loss`` and
    ``accuracy`` but are never the held-out accuracy that evaluates a model (DESIGN §4).
    """

    train_loss: float
    """Mean (unweighted) binary cross-entropy."""
    train_accuracy: float
    samples: int
    positives: int


def sigmoid(s: np.ndarray | float) -> np.ndarray:
    """Logistic function without overflow: exp is only ever taken of a non-positive number."""
    s = np.asarray(s, dtype=np.float64)
    e = np.exp(-np.abs(s))
    return np.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _log_loss(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample binary cross-entropy from logits: softplus(s) - y·s, stable for any s."""
    return np.maximum(scores, 0.0) + np.log1p(np.exp(-np.abs(scores))) - y * scores


def _check_features(model: LinearModel, X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim not in (1, 2) or X.shape[-1] != model.n_features:
        raise ValueError(
            f"features of shape {X.shape} do not fit a model with {model.n_features} weights"
        )
    return X


def predict_proba(model: LinearModel, X: np.ndarray) -> np.ndarray:
    """P(anomaly) for each row of ``X`` (n × k → shape (n,)); a single row (k,) → a 0-d array."""
    X = _check_features(model, X)
    return sigmoid(X @ model.weights + model.bias)


def predict(model: LinearModel, X: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """1 (anomaly) where P(anomaly) > ``threshold``, else 0 (int64).

    Strictly greater, so the all-zero initial model (P = 0.5 everywhere) predicts "normal".
    """
    return (predict_proba(model, X) > threshold).astype(np.int64)


def balanced_positive_weight(y: np.ndarray, cap: float = MAX_POSITIVE_WEIGHT) -> float:
    """``n_negative / n_positive`` capped at ``cap``; 1.0 if either class is absent."""
    y = np.asarray(y)
    positives = int(np.count_nonzero(y == 1))
    negatives = int(y.size - positives)
    if positives == 0 or negatives == 0:
        return 1.0
    return min(negatives / positives, cap)


def sgd_round(
    model: LinearModel,
    X: np.ndarray,
    y: np.ndarray,
    learning_rate: float = 0.05,
    epochs: int = 5,
    positive_weight: float | None = None,
    l2: float = 1e-4,
    seed: int | None = None,
) -> tuple[LinearModel, RoundMetrics]:
    """One device's local round: per-sample SGD on the class-weighted log-loss plus
    ``l2/2·|weights|²`` (bias not penalised), starting from ``model`` (the current global model).

    Anomalies are rare (~2 %), so an unweighted model learns "always normal". Positives get
    ``positive_weight`` times the weight of negatives (``None`` = balanced, see
    :func:`balanced_positive_weight`); sample weights are then rescaled to mean 1 so that
    ``learning_rate`` means the same whatever the class mix. The visiting order is a fresh
    permutation per epoch from ``seed``: the same seed gives the same model.
    (The original system used learning rate 0.001 with unscaled features; with the bounded
    scale-free features 0.05 learns in the few epochs a 50-reading round allows.)
    """
    X = _check_features(model, X)
    y = np.asarray(y)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"need X of shape (n, k) and y of shape (n,), got {X.shape}, {y.shape}")
    if X.shape[0] == 0:
        raise ValueError("a training round needs at least one sample")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(X)):
        raise ValueError("features must be finite")
    if learning_rate <= 0 or epochs < 0 or l2 < 0:
        raise ValueError("need learning_rate > 0, epochs >= 0, l2 >= 0")
    y = y.astype(np.float64)
    pos_w = balanced_positive_weight(y) if positive_weight is None else float(positive_weight)
    if not (math.isfinite(pos_w) and pos_w > 0):
        raise ValueError(f"positive_weight must be a positive number, got {positive_weight!r}")
    sample_w = np.where(y == 1.0, pos_w, 1.0)
    sample_w /= sample_w.mean()

    # Plain Python floats: for k ≈ 4 and ~50 samples this is several times faster than
    # per-sample numpy calls, and the Flink job runs one round per device every 50 readings.
    rows = X.tolist()
    labels = y.tolist()
    step = (learning_rate * sample_w).tolist()
    w = model.weights.tolist()
    b = model.bias
    k = len(w)
    decay = 1.0 - learning_rate * l2
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for i in rng.permutation(len(rows)).tolist():
            row = rows[i]
            s = b
            for j in range(k):
                s += w[j] * row[j]
            p = 1.0 / (1.0 + math.exp(-s)) if s >= 0 else 1.0 - 1.0 / (1.0 + math.exp(s))
            g = step[i] * (p - labels[i])
            for j in range(k):
                w[j] = w[j] * decay - g * row[j]
            b -= g
    updated = LinearModel(np.array(w, dtype=np.float64), b)

    scores = X @ updated.weights + updated.bias
    metrics = RoundMetrics(
        train_loss=float(np.mean(_log_loss(scores, y))),
        train_accuracy=float(np.mean((scores > 0.0) == (y == 1.0))),
        samples=int(y.size),
        positives=int(np.count_nonzero(y == 1.0)),
    )
    return updated, metrics


# --------------------------------------------------------------------------------------------
# 4. Metrics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Confusion:
    """Binary confusion matrix (positive = anomaly) and the metrics DESIGN §4 reports.

    Undefined ratios (no predicted positives, no actual positives, no samples) are 0.0, never
    NaN, so they can be stored and plotted. Confusions add up (``a + b``), e.g. over partitions.
    """

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def samples(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        return _div(self.tp + self.tn, self.samples)

    @property
    def precision(self) -> float:
        return _div(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _div(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _div(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(
            self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn
        )

    def as_dict(self) -> dict[str, int | float]:
        """Counts and metrics, named as the per-version summary table's columns."""
        return {
            "tp": self.tp,
            "fp": self.fp,
            "tn": self.tn,
            "fn": self.fn,
            "samples": self.samples,
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
        }


def _div(num: float, den: float) -> float:
    return float(num) / den if den else 0.0


def _binary(values: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {a.shape}")
    if not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{what} must contain only 0 and 1")
    return a == 1


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> Confusion:
    """Confusion matrix of 0/1 labels ``y_true`` against 0/1 predictions ``y_pred``."""
    t, p = _binary(y_true, "y_true"), _binary(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    return Confusion(
        tp=int(np.count_nonzero(t & p)),
        fp=int(np.count_nonzero(~t & p)),
        tn=int(np.count_nonzero(~t & ~p)),
        fn=int(np.count_nonzero(t & ~p)),
    )


def majority_baseline(y_true: np.ndarray) -> Confusion:
    """What predicting the majority class for every sample scores (ties: "normal").

    With ~2 % anomalies this is ~98 % accuracy and 0 F1: the number any model's accuracy must be
    read against.
    """
    t = _binary(y_true, "y_true")
    majority = 1 if np.count_nonzero(t) > t.size / 2 else 0
    return confusion(t.astype(np.int64), np.full(t.size, majority, dtype=np.int64))


# --------------------------------------------------------------------------------------------
# 5. Aggregation (FedAvg service)
# --------------------------------------------------------------------------------------------


def flatten(model: LinearModel) -> np.ndarray:
    """The model as one parameter vector ``[*weights, bias]``: what aggregation rules work on."""
    return np.append(model.weights, model.bias)


def unflatten(vector: np.ndarray) -> LinearModel:
    """Inverse of :func:`flatten`."""
    v = np.asarray(vector, dtype=np.float64)
    if v.ndim != 1 or v.size < 1:
        raise ValueError(f"a parameter vector must be 1-D and non-empty, got shape {v.shape}")
    return LinearModel(v[:-1], float(v[-1]))


def _stack(
    updates: Sequence[LinearModel], weights: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(P, w)``: P is the (m × d) matrix of flattened updates, w their weights."""
    if len(updates) == 0:
        raise ValueError("cannot aggregate an empty list of updates")
    if len(weights) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    sizes = {u.n_features for u in updates}
    if len(sizes) != 1:
        raise ValueError(f"updates have different numbers of weights: {sorted(sizes)}")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError("aggregation weights must be finite, >= 0 and not all zero")
    return np.vstack([flatten(u) for u in updates]), w


def fedavg(updates: Sequence[LinearModel], weights: Sequence[float]) -> LinearModel:
    """FedAvg (McMahan et al. 2017): the mean of the parameter vectors weighted by ``weights``
    (the service uses samples processed, times :func:`staleness_factor` when enabled)."""
    P, w = _stack(updates, weights)
    return unflatten(w @ P / w.sum())


def trimmed_mean(
    updates: Sequence[LinearModel],
    weights: Sequence[float],
    trim_fraction: float = 0.2,
    weighted: bool = True,
) -> LinearModel:
    """Coordinate-wise trimmed mean (Yin et al. 2018), robust to a minority of bad updates.

    For each coordinate, the ``floor(trim_fraction · m)`` smallest and as many largest values of
    the ``m`` updates with non-zero weight are dropped. Trimming counts updates, not samples, so
    a device cannot escape it by claiming many samples. The rest are averaged weighted by
    ``weights`` (``weighted=False``: plain mean): the result stays FedAvg among the survivors,
    and still lies within the range of the surviving - ordinary - values. With few updates
    (``trim_fraction · m < 1``) nothing is trimmed and this is FedAvg.
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    P, w = _stack(updates, weights)
    P, w = P[w > 0], w[w > 0]
    if not weighted:
        w = np.ones_like(w)
    m = P.shape[0]
    cut = math.floor(trim_fraction * m)
    order = np.argsort(P, axis=0, kind="stable")[cut : m - cut]
    kept = np.take_along_axis(P, order, axis=0)
    kept_w = w[order]
    return unflatten((kept * kept_w).sum(axis=0) / kept_w.sum(axis=0))


def coordinate_median(
    updates: Sequence[LinearModel], weights: Sequence[float], weighted: bool = True
) -> LinearModel:
    """Coordinate-wise (weighted) median: robust while fewer than half the weight is bad.

    The weighted median of a coordinate is the value where the cumulative weight of the sorted
    values reaches half the total; when it lands exactly on half, the mean of the two values
    around it (so equal weights give ``np.median``). Updates with weight 0 take no part.
    ``weighted=False`` is the plain ``np.median``, which ignores claimed sample counts entirely.
    """
    P, w = _stack(updates, weights)
    P, w = P[w > 0], w[w > 0]
    if not weighted:
        return unflatten(np.median(P, axis=0))
    order = np.argsort(P, axis=0, kind="stable")
    values = np.take_along_axis(P, order, axis=0)
    cumulative = np.cumsum(w[order], axis=0)
    half = w.sum() / 2.0
    tol = 1e-12 * w.sum()
    lower = np.argmax(cumulative >= half - tol, axis=0)
    cols = np.arange(P.shape[1])
    exactly_half = np.abs(cumulative[lower, cols] - half) <= tol
    upper = np.minimum(lower + exactly_half, P.shape[0] - 1)
    return unflatten((values[lower, cols] + values[upper, cols]) / 2.0)


def clipped_fedavg(
    updates: Sequence[LinearModel],
    weights: Sequence[float],
    reference: LinearModel,
    max_norm: float | None = None,
) -> LinearModel:
    """FedAvg of norm-clipped deltas: ``reference + Σ wᵢ·clip(uᵢ - reference) / Σ wᵢ``.

    ``reference`` is the current global model the devices started from. Each delta is scaled
    down to L2 norm ``max_norm`` (default: the median delta norm of this batch, so the bound
    adapts to how far honest rounds move) when longer. A scaled-up or runaway update then moves
    the global model no more than an ordinary one: the result is within ``max_norm`` of
    ``reference``.
    """
    P, w = _stack(updates, weights)
    ref = flatten(reference)
    if ref.size != P.shape[1]:
        raise ValueError(
            f"reference has {reference.n_features} weights, updates have {P.shape[1] - 1}"
        )
    deltas = P - ref
    norms = np.linalg.norm(deltas, axis=1)
    bound = float(np.median(norms)) if max_norm is None else float(max_norm)
    if not (math.isfinite(bound) and bound >= 0):
        raise ValueError(f"max_norm must be a finite number >= 0, got {max_norm!r}")
    scale = np.minimum(1.0, bound / np.where(norms > 0, norms, 1.0))
    return unflatten(ref + (w * scale) @ deltas / w.sum())


def staleness_factor(current_version: int, base_version: int, alpha: float = 0.5) -> float:
    """FedAsync's polynomial staleness weight ``(1 + staleness)^-alpha`` (Xie et al. 2019).

    ``staleness = current_version - base_version``: how many global versions were published
    since the update's starting model. 1.0 for a fresh update, decreasing with staleness; a base
    version from the future counts as fresh (the service should refuse such a message anyway).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    staleness = max(0, int(current_version) - int(base_version))
    return float((1.0 + staleness) ** -alpha)


STRATEGIES: dict[str, Callable[..., LinearModel]] = {
    "fedavg": fedavg,
    "trimmed_mean": trimmed_mean,
    "median": coordinate_median,
    "clipped_fedavg": clipped_fedavg,
}
"""Aggregation rules by the name used in config, messages (``strategy``) and tables."""

_NEEDS_REFERENCE = frozenset({"clipped_fedavg"})


def aggregate(
    strategy: str,
    updates: Sequence[LinearModel],
    weights: Sequence[float],
    reference: LinearModel | None = None,
    **options: Any,
) -> LinearModel:
    """Combine ``updates`` with the rule named ``strategy`` (a key of :data:`STRATEGIES`).

    ``reference`` (the current global model) is required by ``clipped_fedavg`` and ignored by
    the others; ``options`` go to the rule (e.g. ``trim_fraction=0.1``, ``max_norm=1.0``).
    """
    try:
        rule = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(
            f"unknown aggregation strategy {strategy!r}; valid: {', '.join(sorted(STRATEGIES))}"
        ) from None
    if strategy in _NEEDS_REFERENCE:
        if reference is None:
            raise ValueError(f"strategy {strategy!r} needs the current global model as reference")
        return rule(updates, weights, reference, **options)
    return rule(updates, weights, **options)
