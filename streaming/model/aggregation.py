"""Aggregation rules for the FedAvg service: small typed strategy objects, in the style of
Flower's strategies, over plain parameter vectors (model-agnostic; numpy only, so it runs in the
PyFlink environment too: numpy 1.26 and 2.x).

Input: :class:`Updates`, the ``m`` updates' flattened parameters (m × d), claimed sample counts
and staleness (global versions since each update's base), validated once; and ``reference``, the
current global vector the devices started from. Every rule works on **deltas** ``p - reference``
and returns ``reference + combined delta``: a delta says what one round learned, and the caps
below are only meaningful on deltas (a norm bound on raw parameters would fight the model's own
size). Shared by every rule (:class:`AggregationRule`):

- weight = ``min(samples, max_samples) · (1 + staleness)^-staleness_alpha``. The cap is what one
  round can hold (the service sets ``train_every`` + the positive-example memory): without it one
  device claiming 2e9 samples *is* the global model under FedAvg or a weighted median. The
  polynomial staleness discount is FedAsync's (Xie et al. 2019).
- a delta longer than ``max_update_norm`` is scaled down to it (0 = off): a last line against a
  runaway or scaled-up update, whatever the rule.

Rules (``RULES``, by config name):

- ``fedavg``: the weighted mean of deltas (McMahan et al. 2017). Unbiased, not robust.
- ``trimmed_mean``: per coordinate, drop the ``trim_fraction`` lowest and highest deltas (by
  count, so inflated sample claims do not help) and average the rest (Yin et al. 2018).
- ``median``: per-coordinate weighted median of deltas (Yin et al. 2018).
- ``geometric_median``: the weighted geometric median of deltas by smoothed Weiszfeld iterations
  (RFA, Pillutla, Kakade & Harchaoui 2022): robust like the median, but rotation-invariant.
- ``clipped_fedavg``: the weighted mean of deltas each clipped to ``clip_multiple`` × the batch's
  median delta norm (norm bounding, Sun et al. 2019, with a bound that adapts to how far honest
  rounds move). It bounds each update's influence but does not reject any.

:class:`ServerMomentum` (FedAvgM, Hsu, Qi & Brown 2019) smooths the global model over versions:
``v = beta·v_prev + Δ``, ``next = reference + server_lr·v``; the caller keeps ``v``.

Every rule can first average the updates in shuffled groups of ``bucket_size`` (bucketing,
Karimireddy, He & Jaggi 2022) and combine the group means. That is what makes the robust rules
usable on anomaly data: only the rounds of devices that saw an anomaly teach what one looks
like, their deltas are the rare large ones, and a median or trimmed mean of raw updates drops
exactly those (on the synthetic fleet the median learned an inverted model, anomalies scored
*below* normal readings). Group means each carry a share of them. FedAvg is unchanged by it.

What each rule withstands is measured with the real learner in
``benchmarks/detection_quality.py`` (the poisoning grid; README shows it).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

DEFAULT_MAX_SAMPLES = 100
"""What one round can honestly hold: ``train_every`` (50) plus the positive-example memory."""


# --- input ----------------------------------------------------------------------------------


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _as_float(values: Any, what: str, ndim: int) -> np.ndarray:
    """``values`` as a fresh float64 array of ``ndim`` dimensions, or ValueError saying why."""
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:  # ragged lists, strings, None
        raise ValueError(f"{what} must be a rectangular array of numbers ({exc})") from None
    if array.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {array.shape}")
    return array


@dataclass(frozen=True, eq=False)
class Updates:
    """A batch of ``m`` local updates, validated once so every rule can trust it.

    ``params`` (m × d): each update's flattened parameter vector; ``samples`` (m,): the claimed
    sample counts (> 0; capped by the rule, not here: the claim is what the device said);
    ``staleness`` (m,): global versions published since the update's base (ints >= 0;
    ``None`` = all fresh). Arrays are copied to read-only float64 (staleness: int64).
    """

    params: np.ndarray
    samples: np.ndarray
    staleness: np.ndarray | None = None

    def __post_init__(self) -> None:
        params = _as_float(self.params, "params", 2)
        m, d = params.shape
        if m == 0 or d == 0:
            raise ValueError(f"cannot aggregate an empty batch (params of shape {params.shape})")
        if not np.all(np.isfinite(params)):
            bad = sorted({int(i) for i in np.nonzero(~np.isfinite(params))[0]})
            raise ValueError(f"params of updates {bad} are not finite")
        samples = _as_float(self.samples, "samples", 1)
        if samples.shape != (m,):
            raise ValueError(f"{m} updates but {samples.size} sample counts")
        if not (np.all(np.isfinite(samples)) and np.all(samples > 0)):
            raise ValueError("sample counts must be finite and > 0")
        staleness = np.zeros(m) if self.staleness is None else self.staleness
        staleness = _as_float(staleness, "staleness", 1)
        if staleness.shape != (m,):
            raise ValueError(f"{m} updates but {staleness.size} staleness values")
        whole = (staleness >= 0) & (staleness < 2**53) & (staleness == np.round(staleness))
        if not np.all(whole):
            raise ValueError("staleness must be whole numbers >= 0 (versions since the base)")
        object.__setattr__(self, "params", _readonly(params))
        object.__setattr__(self, "samples", _readonly(samples))
        object.__setattr__(self, "staleness", _readonly(staleness.astype(np.int64)))

    @property
    def count(self) -> int:
        return int(self.params.shape[0])

    @property
    def dim(self) -> int:
        return int(self.params.shape[1])

    def check_reference(self, reference: Any) -> np.ndarray:
        """``reference`` as a float64 (d,) vector matching these updates, or ValueError."""
        ref = _as_float(reference, "reference", 1)
        if ref.size != self.dim:
            raise ValueError(f"reference has {ref.size} parameters, updates have {self.dim}")
        if not np.all(np.isfinite(ref)):
            raise ValueError("reference parameters must be finite")
        return ref


# --- shared helpers -------------------------------------------------------------------------


def _norms(deltas: np.ndarray) -> np.ndarray:
    """Row L2 norms without overflow: rows are scaled by their largest entry first."""
    peak = np.max(np.abs(deltas), axis=1)
    safe = np.where(peak > 0, peak, 1.0)
    return peak * np.linalg.norm(deltas / safe[:, None], axis=1)


def _clip(deltas: np.ndarray, bound: float | np.ndarray) -> np.ndarray:
    """Each row scaled down to L2 norm ``bound`` when longer (direction kept)."""
    norms = _norms(deltas)
    scale = np.minimum(1.0, bound / np.where(norms > 0, norms, 1.0))
    return deltas * scale[:, None]


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per column of ``values`` (m × d), the value where cumulative weight reaches half; the
    mean of the two neighbours when it lands exactly on half (equal weights: ``np.median``)."""
    order = np.argsort(values, axis=0, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=0)
    cumulative = np.cumsum(weights[order], axis=0)
    half = weights.sum() / 2.0
    tol = 1e-12 * weights.sum()
    lower = np.argmax(cumulative >= half - tol, axis=0)
    cols = np.arange(values.shape[1])
    on_half = np.abs(cumulative[lower, cols] - half) <= tol
    upper = np.minimum(lower + on_half, values.shape[0] - 1)
    return (sorted_values[lower, cols] + sorted_values[upper, cols]) / 2.0


def _buckets(
    deltas: np.ndarray, weights: np.ndarray, size: int, params: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The deltas shuffled into groups of ``size`` (the last ones may hold one more), each
    replaced by its weighted mean with the group's summed weight (bucketing, Karimireddy, He &
    Jaggi 2022). The shuffle is seeded by the updates themselves: deterministic for a batch,
    unknowable to a device before it sends."""
    m = deltas.shape[0]
    groups = max(1, m // size)
    if groups == m:
        return deltas, weights
    # Canonical row order first, so the buckets do not depend on the order updates arrived in.
    canonical = np.lexsort(params.T[::-1])
    digest = hashlib.blake2b(params[canonical].tobytes(), digest_size=8).digest()
    shuffled = canonical[np.random.default_rng(int.from_bytes(digest, "big")).permutation(m)]
    members = np.array_split(shuffled, groups)
    means = np.vstack([weights[g] @ deltas[g] / weights[g].sum() for g in members])
    return means, np.array([weights[g].sum() for g in members])


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float = math.inf) -> None:
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")


# --- rules ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AggregationRule(ABC):
    """A rule turning a batch of updates into the next global parameter vector.

    Shared by every rule: the weight of an update is ``min(samples, max_samples) ·
    (1 + staleness)^-staleness_alpha``, and each delta ``p - reference`` longer than
    ``max_update_norm`` (0 = no cap) is scaled down to it before the rule sees it.
    """

    name: ClassVar[str]
    max_samples: int = DEFAULT_MAX_SAMPLES
    staleness_alpha: float = 0.5
    # Honest deltas of the linear model measured < 4 (95th percentile) without the memory; the
    # rare longer ones are capped at no measured cost in F1.
    max_update_norm: float = 10.0
    bucket_size: int = 1

    def __post_init__(self) -> None:
        _check_int("max_samples", self.max_samples, 1)
        _check_float("staleness_alpha", self.staleness_alpha, 0.0)
        _check_float("max_update_norm", self.max_update_norm, 0.0)
        _check_int("bucket_size", self.bucket_size, 1)

    def weights(self, updates: Updates) -> np.ndarray:
        """Capped sample counts times the staleness discount (FedAsync's polynomial form)."""
        capped = np.minimum(updates.samples, float(self.max_samples))
        return capped * (1.0 + updates.staleness) ** -float(self.staleness_alpha)

    def deltas(self, updates: Updates, reference: np.ndarray) -> np.ndarray:
        """``params - reference`` per update, norm-capped at ``max_update_norm``."""
        with np.errstate(over="ignore", invalid="ignore"):
            deltas = updates.params - reference
        if not np.all(np.isfinite(deltas)):
            raise ValueError("an update is too far from the reference to subtract in float64")
        return _clip(deltas, self.max_update_norm) if self.max_update_norm > 0 else deltas

    def combine(self, updates: Updates, reference: Any) -> np.ndarray:
        """The next global parameter vector (d,): ``reference`` plus the combined delta."""
        ref = updates.check_reference(reference)
        deltas, weights = self.deltas(updates, ref), self.weights(updates)
        if self.bucket_size > 1:
            deltas, weights = _buckets(deltas, weights, self.bucket_size, updates.params)
        return ref + self.combine_deltas(deltas, weights)

    @abstractmethod
    def combine_deltas(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The rule proper: (m × d) capped deltas and (m,) weights > 0 → one (d,) delta."""

    @classmethod
    def options(cls) -> dict[str, Any]:
        """Option name → default, for messages and config listings."""
        return {f.name: f.default for f in fields(cls)}


@dataclass(frozen=True, kw_only=True)
class FedAvg(AggregationRule):
    """Weighted mean of the deltas (McMahan et al. 2017)."""

    name: ClassVar[str] = "fedavg"

    def combine_deltas(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return weights @ deltas / weights.sum()


@dataclass(frozen=True, kw_only=True)
class TrimmedMean(AggregationRule):
    """Per coordinate, drop the ``floor(trim_fraction·m)`` smallest and largest deltas and take
    the weighted mean of the rest (Yin et al. 2018). Trimming counts updates, not samples."""

    name: ClassVar[str] = "trimmed_mean"
    trim_fraction: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_float("trim_fraction", self.trim_fraction, 0.0, 0.49)

    def combine_deltas(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        m = deltas.shape[0]
        cut = math.floor(self.trim_fraction * m)
        order = np.argsort(deltas, axis=0, kind="stable")[cut : m - cut]
        kept = np.take_along_axis(deltas, order, axis=0)
        kept_w = weights[order]
        return (kept * kept_w).sum(axis=0) / kept_w.sum(axis=0)


@dataclass(frozen=True, kw_only=True)
class CoordinateMedian(AggregationRule):
    """Per-coordinate weighted median of the deltas (Yin et al. 2018)."""

    name: ClassVar[str] = "median"

    def combine_deltas(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return _weighted_median(deltas, weights)


@dataclass(frozen=True, kw_only=True)
class ClippedFedAvg(AggregationRule):
    """Weighted mean of deltas each clipped to ``clip_multiple`` × the batch's median delta
    norm (norm bounding, Sun et al. 2019, with an adaptive bound)."""

    name: ClassVar[str] = "clipped_fedavg"
    clip_multiple: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_float("clip_multiple", self.clip_multiple, 1e-9)

    def combine_deltas(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        # Median over updates, not weighted: claimed samples must not move the bound.
        bound = self.clip_multiple * float(np.median(_norms(deltas)))
        return weights @ _clip(deltas, bound) / weights.sum()


@dataclass(frozen=True, kw_only=True)
class GeometricMedian(AggregationRule):
    """Weighted geometric median of the deltas by smoothed Weiszfeld (RFA, Pillutla et al.)."""

    name: ClassVar[str] = "geometric_median"
    iterations: int = 8
    smoothing: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("iterations", self.iterations, 1)
        _check_float("smoothing", self.smoothing, 1e-12)

    def combine_deltas(self, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        # Weiszfeld: re-weight each point by 1/distance to the current estimate; the smoothing
        # floor keeps it finite when the estimate lands on a point.
        z = weights @ deltas / weights.sum()
        for _ in range(self.iterations):
            alpha = weights / np.maximum(_norms(deltas - z), self.smoothing)
            z = alpha @ deltas / alpha.sum()
        return z


# --- server momentum ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ServerMomentum:
    """Server momentum (FedAvgM, Hsu et al. 2019) applied to any rule's result.

    With ``Δ = combined - reference``: ``v = beta·v_prev + Δ`` and the next global vector is
    ``reference + server_lr·v``. Pure: the caller stores the velocity ``v`` between versions
    (``None`` before the first). The defaults (beta 0, server_lr 1) return ``combined`` itself;
    ``server_lr = 1 - beta`` keeps the long-run step of a steady Δ and averages out the swing.
    """

    beta: float = 0.0
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        _check_float("beta", self.beta, 0.0, 0.999)
        _check_float("server_lr", self.server_lr, 1e-9)

    def step(
        self, reference: np.ndarray, combined: np.ndarray, velocity: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(next global vector, new velocity)`` from a rule's ``combined`` result."""
        reference = np.asarray(reference, dtype=np.float64)
        delta = np.asarray(combined, dtype=np.float64) - reference
        if velocity is None:
            v = delta
        else:
            previous = np.asarray(velocity, dtype=np.float64)
            if previous.shape != delta.shape or not np.all(np.isfinite(previous)):
                raise ValueError(
                    f"velocity must be finite and of shape {delta.shape}, got {previous.shape}"
                )
            v = self.beta * previous + delta
        return reference + self.server_lr * v, v


RULES: dict[str, type[AggregationRule]] = {
    rule.name: rule
    for rule in (
        FedAvg,
        TrimmedMean,
        CoordinateMedian,
        ClippedFedAvg,
        GeometricMedian,
    )
}


def make_rule(name: str, **options: Any) -> AggregationRule:
    """The rule registered as ``name`` with ``options``; ValueError naming the valid ones."""
    try:
        rule = RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregation rule {name!r}; valid: {', '.join(sorted(RULES))}"
        ) from None
    unknown = sorted(set(options) - set(rule.options()))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for {name!r}; valid: {', '.join(rule.options())}"
        )
    return rule(**options)
