"""The two detector families a global model carries, and their threshold calibration.

- **Supervised**: a small multi-layer perceptron (one hidden tanh layer; ``hidden=0`` is
  logistic regression) on the features of :mod:`streaming.model.features`, trained by each
  device with minibatch SGD on the class-weighted log-loss; its parameters are what FedAvg
  averages. Scores are logits.
- **Discriminant**: Fisher's linear discriminant between the normal and the anomalous feature
  vectors, computed by the server from the two classes' summed sufficient statistics (the same
  ones the label-free model adds up, plus those of the anomalous rows). Summing is exact, so
  the federated discriminant *is* the central one, whatever order or grouping devices report
  in: unlike averaged SGD steps, it cannot drift towards the latest devices (measured on SKAB,
  whose experiments run one after another).
- **Label-free**: a Gaussian model of *normal* feature vectors whose sufficient statistics
  (count, mean, co-moments) devices send and the server simply adds up, exactly. A reading's
  score is its Mahalanobis length ``sqrt(d² / F)`` under that model: what is unlike the
  fleet's normal behaviour scores high, whatever the rule that pseudo-labels would say.

Thresholds are calibrated without raw data leaving devices: a device reports a histogram of
the scores its current global model gave its fresh readings (before training on them), per
label, on fixed bins (:data:`LOGIT_EDGES`, :data:`NORMAL_EDGES`); the server adds the
histograms up and picks the threshold that maximises F1 (supervised) or that flags the
configured share of readings (label-free).

numpy only, no numpy-2-only API: the PyFlink environment has numpy < 2.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streaming.model.features import CAP, FEATURE_NAMES, N_FEATURES, N_POOLED, VOL_CAP

INPUT_SCALE = np.array(
    [VOL_CAP / 2.0 if name.startswith("vol") else CAP / 3.0 for name in FEATURE_NAMES]
)
"""Features are divided by this before the network: z-like ones (0..10) and vol ones (-5..5)
both land within about ±3, where tanh units and a fixed learning rate work."""

LOGIT_EDGES = np.linspace(-10.0, 10.0, 81)
"""Histogram bins of supervised scores (logits), shared by devices and server."""
NORMAL_EDGES = np.linspace(0.0, 10.0, 81)
"""Histogram bins of label-free scores (Mahalanobis lengths)."""
MAX_POSITIVE_WEIGHT = 50.0
"""Cap of the class weight of anomalies in a round (rare positives, bounded SGD steps)."""


# --------------------------------------------------------------------------------------------
# Supervised: the MLP
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Network:
    """The shape of the supervised model: ``n_features`` inputs, ``hidden`` tanh units
    (0 = logistic regression), one logit out. Parameters are one flat vector (what
    aggregation works on): ``[W1 (F×H), b1 (H), w2 (H), b2]``, or ``[w (F), b]`` for H = 0.

    Its inputs are the first ``n_features`` columns of the feature rows it is given: by
    default the pooled block, which means the same on every device whatever its channels."""

    n_features: int = N_POOLED
    hidden: int = 16

    def __post_init__(self) -> None:
        if self.n_features < 1 or self.hidden < 0:
            raise ValueError(f"need n_features >= 1 and hidden >= 0, got {self}")

    @property
    def size(self) -> int:
        f, h = self.n_features, self.hidden
        return f + 1 if h == 0 else f * h + 2 * h + 1

    def initial(self, seed: int = 0) -> np.ndarray:
        """The starting parameters every device shares before the first global version
        (Glorot-scaled, from a fixed seed so that all devices start from the same point)."""
        f, h = self.n_features, self.hidden
        if h == 0:
            return np.zeros(f + 1)
        rng = np.random.default_rng(seed)
        w1 = rng.normal(0.0, math.sqrt(1.0 / f), (f, h))
        w2 = rng.normal(0.0, math.sqrt(1.0 / h), h)
        return np.concatenate((w1.ravel(), np.zeros(h), w2, [0.0]))

    def _split(self, params: np.ndarray) -> tuple[np.ndarray, ...]:
        params = np.asarray(params, dtype=np.float64)
        if params.shape != (self.size,):
            raise ValueError(f"a {self} has {self.size} parameters, got shape {params.shape}")
        f, h = self.n_features, self.hidden
        if h == 0:
            return params[:f], params[f]
        w1 = params[: f * h].reshape(f, h)
        b1 = params[f * h : f * h + h]
        w2 = params[f * h + h : f * h + 2 * h]
        return w1, b1, w2, params[-1]

    def inputs(self, X: np.ndarray) -> np.ndarray:
        """The network's scaled inputs: the first ``n_features`` columns of the rows."""
        f = self.n_features
        return np.asarray(X, dtype=np.float64)[:, :f] / INPUT_SCALE[:f]

    def logits(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Anomaly logits of the feature rows ``X`` (n × ≥F)."""
        X = self.inputs(X)
        parts = self._split(params)
        if self.hidden == 0:
            w, b = parts
            return X.dot(w) + b
        w1, b1, w2, b2 = parts
        return np.tanh(X.dot(w1) + b1).dot(w2) + b2  # .dot: @'s products, less call overhead

    def gradient(
        self, params: np.ndarray, X: np.ndarray, y: np.ndarray, sample_w: np.ndarray
    ) -> np.ndarray:
        """Gradient of the mean weighted log-loss over the rows (flat, like ``params``)."""
        Xs = self.inputs(X)
        parts = self._split(params)
        n = Xs.shape[0]
        if self.hidden == 0:
            w, b = parts
            g = sample_w * (sigmoid(Xs @ w + b) - y) / n
            return np.concatenate((Xs.T @ g, [g.sum()]))
        w1, b1, w2, b2 = parts
        a = np.tanh(Xs @ w1 + b1)
        g = sample_w * (sigmoid(a @ w2 + b2) - y) / n
        da = np.outer(g, w2) * (1.0 - a * a)
        return np.concatenate(((Xs.T @ da).ravel(), da.sum(0), a.T @ g, [g.sum()]))


def sigmoid(s: np.ndarray) -> np.ndarray:
    """Numerically safe logistic function."""
    s = np.clip(np.asarray(s, dtype=np.float64), -500.0, 500.0)
    return 1.0 / (1.0 + np.exp(-s))


@dataclass(frozen=True)
class TrainResult:
    params: np.ndarray
    loss: float  # weighted training log-loss after the round (never reported as quality)
    accuracy: float  # training accuracy after the round (never reported as quality)


def train(
    network: Network,
    params: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    *,
    learning_rate: float = 0.1,
    epochs: int = 3,
    batch_size: int = 16,
    l2: float = 1e-4,
    seed: int = 0,
) -> TrainResult:
    """One device's local round: minibatch SGD from ``params`` (the global model) on the
    class-balanced log-loss plus ``l2/2·|params|²``.

    Anomalies are rare, so positives are weighted ``n_neg / n_pos`` (capped at
    :data:`MAX_POSITIVE_WEIGHT`) and weights rescaled to mean 1, so the learning rate means the
    same whatever the class mix. Deterministic for a seed.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] < network.n_features or y.shape != (X.shape[0],):
        raise ValueError(
            f"need X (n, >= {network.n_features}) and y (n,), got {X.shape}, {y.shape}"
        )
    if X.shape[0] == 0:
        raise ValueError("a training round needs at least one sample")
    if learning_rate <= 0 or epochs < 0 or batch_size < 1 or l2 < 0:
        raise ValueError("need learning_rate > 0, epochs >= 0, batch_size >= 1, l2 >= 0")
    positives = float(y.sum())
    negatives = y.size - positives
    pos_w = min(negatives / positives, MAX_POSITIVE_WEIGHT) if positives and negatives else 1.0
    n = y.size
    sample_w = np.where(y == 1.0, pos_w, 1.0)
    sample_w /= np.add.reduce(sample_w) / n  # mean 1 (sums / n: ndarray.mean without its wrapper)
    p = np.array(params, dtype=np.float64)
    if epochs:
        rng = np.random.default_rng(seed)
        _sgd(network, p, X, y, sample_w, rng, learning_rate, epochs, batch_size, l2)
    s = network.logits(p, X)
    loss = float(np.add.reduce(sample_w * (np.logaddexp(0.0, s) - y * s)) / n)
    return TrainResult(p, loss, np.count_nonzero((s > 0.0) == (y == 1.0)) / n)


def _sgd(
    network: Network,
    p: np.ndarray,
    X: np.ndarray,
    y: np.ndarray,
    sample_w: np.ndarray,
    rng: np.random.Generator,
    learning_rate: float,
    epochs: int,
    batch_size: int,
    l2: float,
) -> None:
    """Minibatch SGD on ``p`` in place: ``p ← p·(1 − lr·l2) − lr·∇`` per batch, with the
    gradient of :meth:`Network.gradient` written out on views of a working copy (the hot loop
    of every local round: each numpy call costs about a microsecond, so the loop is arranged to
    make as few of them as it can).

    Two rewrites take calls out of each step without changing the arithmetic's meaning:

    - Both biases are weights of a constant input. The inputs get a column of ones (b1 is the
      last row of W1 in ``p``'s layout already); the hidden layer gets a unit whose weights
      are 0 but a bias of 1000, so its output is tanh(1000) = 1.0 exactly, and b2 is its
      outgoing weight. Its own gradient is g·b2·(1 − 1²) = 0: it stays a constant.
    - σ(s) − y = ½·tanh(s/2) + ½ − y, so with each row's weight ``c`` (lr / its batch's size
      times its class weight) the loss gradient per logit is ``(c/2)·tanh(s/2) + c·(½ − y)``:
      two arrays made once per epoch, and one tanh in place of exp, add and divide.
    """
    f, h = network.n_features, network.hidden
    n = X.shape[0]
    Xs = np.hstack((network.inputs(X), np.ones((n, 1))))
    sizes = np.minimum(batch_size, n - np.arange(n) // batch_size * batch_size)
    # Per-row factors as columns (n × 1), so the per-logit gradient is a column too and
    # multiplies a row of w2 by broadcasting, with no per-step reshape.
    scaled_w = (sample_w * learning_rate)[:, None]
    y_col = y[:, None]
    sizes = sizes[:, None]
    decay = 1.0 - learning_rate * l2
    if h == 0:
        work = p  # [w (F), b]: already the weights of [inputs, 1]
        w = work[:, None]
    else:
        # [W1 | constant unit] ((F+1) × (H+1)), then [w2, b2] (H+1): one buffer, one decay.
        work = np.zeros((f + 1) * (h + 1) + h + 1)
        w1 = work[: (f + 1) * (h + 1)].reshape(f + 1, h + 1)
        w2 = work[(f + 1) * (h + 1) :].reshape(h + 1, 1)
        w2_row = w2.T  # views of the buffer: each step's update shows in both
        w1[:, :h] = p[: f * h + h].reshape(f + 1, h)
        w1[f, h] = _CONSTANT_UNIT_BIAS
        w2[:, 0] = p[f * h + h :]
    # ndarray.dot rather than @ below: the same products (BLAS) with half the call overhead.
    for _ in range(epochs):
        # One gather per epoch: the batches are then contiguous slices, not fancy indexing.
        order = rng.permutation(n)
        Xe = Xs[order]
        c = scaled_w[order] / sizes  # lr × class weight / the row's batch size
        half_c, offset = 0.5 * c, c * (0.5 - y_col[order])
        for start in range(0, n, batch_size):
            end = start + batch_size
            xb = Xe[start:end]
            if h == 0:
                g = half_c[start:end] * np.tanh(0.5 * xb.dot(w)) + offset[start:end]
                work *= decay
                w -= xb.T.dot(g)
                continue
            a = np.tanh(xb.dot(w1))
            g = half_c[start:end] * np.tanh(0.5 * a.dot(w2)) + offset[start:end]
            da = g * w2_row  # through w2 before this step's decay: the gradient at p
            da *= 1.0 - a * a
            work *= decay
            w1[f, h] = _CONSTANT_UNIT_BIAS  # a constant: the decay is not for it
            w2 -= a.T.dot(g)
            w1 -= xb.T.dot(da)
    if h:
        p[: f * h + h] = w1[:, :h].ravel()
        p[f * h + h :] = w2[:, 0]


_CONSTANT_UNIT_BIAS = 1000.0
"""The bias of :func:`_sgd`'s constant hidden unit: tanh of anything above ~19.1 is 1.0 in
float64 (set again after each step's weight decay)."""


# --------------------------------------------------------------------------------------------
# Label-free: the Gaussian model of normal behaviour
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormalStats:
    """Sufficient statistics of feature vectors: count, mean (F) and co-moment matrix (F×F).

    They add up exactly (Chan et al.), so the server's sum of all devices' statistics is what a
    central computation over all their normal rows would give — without the rows."""

    count: float
    mean: np.ndarray
    comoment: np.ndarray

    @classmethod
    def empty(cls, n_features: int = N_FEATURES) -> NormalStats:
        return cls(0.0, np.zeros(n_features), np.zeros((n_features, n_features)))

    @classmethod
    def of(cls, X: np.ndarray) -> NormalStats:
        X = np.asarray(X, dtype=np.float64)
        if X.shape[0] == 0:
            return cls.empty(X.shape[1])
        mean = np.add.reduce(X, axis=0) / X.shape[0]  # ndarray.mean's arithmetic, no wrapper
        d = X - mean
        co = d.T.dot(d)
        # Exactly symmetric (a matrix product need not be): only its upper triangle travels.
        return cls(float(X.shape[0]), mean, (co + co.T) * 0.5)

    def __add__(self, other: NormalStats) -> NormalStats:
        if other.count == 0:  # most rounds' anomalous rows: none
            return self
        if self.count == 0:
            return other
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / total)
        co = (
            self.comoment
            + other.comoment
            + np.outer(delta, delta) * (self.count * other.count / total)
        )
        return NormalStats(total, mean, co)

    def scaled(self, factor: float) -> NormalStats:
        """The same distribution with ``factor`` times the weight (old versions fade out)."""
        return NormalStats(self.count * factor, self.mean, self.comoment * factor)


SHRINK = 0.05
"""The normal model's covariance is shrunk towards its diagonal by this much before inversion."""


def normal_precision(stats: NormalStats) -> np.ndarray:
    """Inverse of the (shrunk, floor-regularised) covariance of the normal feature vectors."""
    if stats.count < 2:
        return np.eye(stats.mean.size)
    return np.linalg.inv(_shrunk_covariance(stats))


def _shrunk_covariance(stats: NormalStats) -> np.ndarray:
    """The covariance of ``stats`` (count >= 2) shrunk towards its diagonal by :data:`SHRINK`,
    each variance at least 1e-4: a feature that never moves still gets unit-ish scale."""
    cov = stats.comoment / (stats.count - 1.0)
    diag = np.maximum(np.diag(cov), 1e-4)
    cov = (1.0 - SHRINK) * cov + SHRINK * np.diag(diag)
    cov[np.diag_indices(stats.mean.size)] = diag
    return cov


def normal_scores(mean: np.ndarray, precision: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``sqrt(d² / F)``: the Mahalanobis length of each row under the normal model, capped."""
    d = np.asarray(X, dtype=np.float64) - mean
    q = np.einsum("ni,ij,nj->n", d, precision, d) / d.shape[1]
    return np.minimum(np.sqrt(np.maximum(q, 0.0)), NORMAL_EDGES[-1])


# --------------------------------------------------------------------------------------------
# Discriminant: Fisher's linear discriminant from both classes' statistics
# --------------------------------------------------------------------------------------------

MIN_CLASS_ROWS = 2.0
"""Rows each class needs before a discriminant is made (a covariance needs two)."""


def discriminant(normal: NormalStats, anomalous: NormalStats) -> np.ndarray | None:
    """``[w (F), b]`` of the score ``X @ w + b``: Fisher's direction ``Σ⁻¹(μ₁ − μ₀)`` under the
    classes' pooled within-class covariance (shrunk like :func:`normal_precision`), scaled so
    that the score is in within-class standard deviations and 0 midway between the classes'
    means; None until each class has :data:`MIN_CLASS_ROWS` rows.

    The scale makes thresholds comparable from version to version and lets the score share
    :data:`LOGIT_EDGES` for its calibration histograms."""
    fisher = _fisher(normal, anomalous)
    if fisher is None:
        return None
    w, distance = fisher
    w = w / distance
    return np.concatenate((w, [-0.5 * float((normal.mean + anomalous.mean) @ w)]))


def discriminant_boundary(normal: NormalStats, anomalous: NormalStats) -> float | None:
    """The discriminant's Bayes threshold: where two Gaussians with the pooled covariance and
    the classes' shares as priors are equally likely, ``ln(n₀ / n₁) / D`` (``D``: the
    Mahalanobis distance between the class means; the log-likelihood ratio is ``D·score``).
    What devices use until their fresh scores have calibrated a threshold (a fleet whose
    anomalies all came before the first discriminant never reports a fresh positive)."""
    fisher = _fisher(normal, anomalous)
    if fisher is None:
        return None
    return math.log(normal.count / anomalous.count) / fisher[1]


def _fisher(normal: NormalStats, anomalous: NormalStats) -> tuple[np.ndarray, float] | None:
    """``Σ⁻¹(μ₁ − μ₀)`` and the Mahalanobis distance ``D`` between the means; None without
    :data:`MIN_CLASS_ROWS` rows per class or with coinciding means."""
    if normal.count < MIN_CLASS_ROWS or anomalous.count < MIN_CLASS_ROWS:
        return None
    pooled = NormalStats(
        normal.count + anomalous.count - 1.0, normal.mean, normal.comoment + anomalous.comoment
    )  # the covariance divides by count - 1: the pooled (n₀ + n₁ - 2)
    gap = anomalous.mean - normal.mean
    # A solve, not the inverse times the gap: a quarter of the time (devices remake their own
    # discriminant every round).
    w = np.linalg.solve(_shrunk_covariance(pooled), gap)
    spread = float(gap @ w)  # D² = wᵀΣw: the unscaled score's within-class variance
    if not spread > 0.0 or not math.isfinite(spread):
        return None
    return w, math.sqrt(spread)


def discriminant_scores(params: np.ndarray, X: np.ndarray) -> np.ndarray:
    """The discriminant's score of each feature row (see :func:`discriminant`)."""
    return np.asarray(X, dtype=np.float64).dot(params[:-1]) + params[-1]


# --------------------------------------------------------------------------------------------
# Calibration: score histograms → thresholds
# --------------------------------------------------------------------------------------------


def histogram(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``scores`` per bin of ``edges`` (len(edges) + 1 bins: below the first edge,
    between edges, from the last edge up)."""
    return np.bincount(
        np.searchsorted(edges, np.asarray(scores, dtype=np.float64), side="right"),
        minlength=edges.size + 1,
    ).astype(np.int64)


def best_mcc_threshold(
    positives: np.ndarray, negatives: np.ndarray, edges: np.ndarray
) -> float | None:
    """The bin edge ``t`` whose rule ``score >= t`` has the highest Matthews correlation on the
    summed histograms (ties: the higher edge); None when there is no positive or no negative.

    Preferred to the F1-best edge for calibration: where anomalies are common, flagging every
    reading already has a high F1 (0.52 at 35 % anomalies), so a weakly ranking model gets the
    lowest edge and flags everything; that has an MCC of 0 and is never chosen here."""
    positives = np.asarray(positives, dtype=np.float64)
    negatives = np.asarray(negatives, dtype=np.float64)
    p, n = positives.sum(), negatives.sum()
    if p == 0 or n == 0:
        return None
    tp = np.cumsum(positives[::-1])[::-1][1:]
    fp = np.cumsum(negatives[::-1])[::-1][1:]
    fn, tn = p - tp, n - fp
    fn, tn = np.maximum(fn, 0.0), np.maximum(tn, 0.0)  # faded sums: rounding may dip below 0
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = np.where(denominator > 0, (tp * tn - fp * fn) / np.maximum(denominator, 1e-300), 0.0)
    best = np.flatnonzero(mcc >= mcc.max() - 1e-12)[-1]
    return float(edges[best])


def quantile_threshold(counts: np.ndarray, edges: np.ndarray, share: float) -> float | None:
    """The lowest bin edge ``t`` such that at most ``share`` of the counted scores are
    ``>= t``; None when nothing was counted."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return None
    above = np.cumsum(counts[::-1])[::-1][1:] / total  # share flagged by each edge
    ok = np.flatnonzero(above <= share)
    return float(edges[ok[0]]) if ok.size else float(edges[-1])
