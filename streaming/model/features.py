"""Per-device features: bounded state per device, scale-free features per reading.

A device reports one or several named channels per reading. For each channel the device keeps
a *baseline* (running mean and standard deviation, Welford) and a short window of its recent
raw values; across channels it keeps their correlation. From these, every reading gets a fixed
number of features (:data:`FEATURE_NAMES`) whatever the number of channels, so one global model
serves a one-channel humidity sensor and a twelve-channel PLC alike:

- per channel, in the channel's own standard deviations (``s``, the baseline's std):
  ``z`` (reading vs baseline), ``step`` (jump from the previous reading), ``level_W`` (mean of
  the last W readings vs baseline: level shifts and drifts) and ``vol_W`` (log of the last W
  readings' std over the baseline's: noise bursts > 0, stuck sensors < 0), for W = 5 and 30;
- pooled over channels as the max and the mean (so the count of channels does not matter);
- across channels, the Mahalanobis length of the z vector and of each level vector under the
  channels' running correlation (``mahal_*``): a reading can be normal channel by channel and
  still break the usual relation between channels;
- per channel, *signed*, in :data:`SLOTS` slots: ``ch{i}_z``, ``ch{i}_level30``,
  ``ch{i}_zmean60`` (the mean of the last 60 readings' z, each against the baseline of its
  time) and ``ch{i}_vol30``; the channels in the order of their names (a device that reports
  fewer channels has zeros in the rest; channels past the last slot appear only in the pooled
  features). Where a fleet's devices share channels, which channel moved and which way is most
  of what tells a fault from normal operation: on SKAB these slots raised the discriminant's
  held-out F1 from 0.655 to 0.749 (README, *Detection*). The pooled block (:data:`N_POOLED`
  features) is what the network sees; the discriminant and the label-free model see all
  features.

Every pooled feature is unchanged when a channel's readings become ``a·x + b`` (a ≠ 0), and
every slot feature too for a > 0 (for a < 0 the signed ones change sign): differences divided
by the channel's std, then absolute values or logs of ratios. Every feature is finite
and bounded (``|z|``-like ones in [0, CAP], ``vol`` in [-VOL_CAP, VOL_CAP]) for any accepted
reading, however wild.

**Gated baseline.** A reading whose largest |z| exceeds ``gate`` does not enter the baseline:
an anomaly must not become the normal it is measured against (a long fault would otherwise
drag the mean along and hide itself). So that a permanent change of level is eventually
accepted as the new normal, after ``max_gated`` consecutive gated readings the next one is
admitted anyway, and so on until the baseline has caught up. Measured on SKAB, WSN and the
synthetic fleet: gating at |z| > 4 raised the F1 of every model and of the z-score rule itself.

State is a :class:`FeatureState` of plain numpy arrays, bounded by ``O(C² + (WINDOW + SLOW)·C)``;
the functions here are pure (the caller keeps the state: Flink's keyed state, a benchmark's dict).
:func:`advance` takes a whole batch of one device's readings and is vectorised over it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

CAP = 10.0
"""z-like features are clipped to [0, CAP] standard deviations: bounded inputs, bounded steps."""
VOL_CAP = 5.0
"""``vol`` features (natural logs of std ratios) are clipped to [-VOL_CAP, VOL_CAP]."""
WARMUP = 10
"""Readings a device must have seen before its features mean anything: before, all are 0."""
SHORT, LONG = 5, 30
"""The two window lengths (readings) of the level and volatility features."""
SLOW = 60
"""The window of the channel slots' mean z: drifts too slow for 30 readings to show."""
WINDOW = LONG
"""Raw readings kept per channel."""
GATE = 4.0
"""Readings with max |z| above this do not enter the baseline (see the module doc)."""
MAX_GATED = 200
"""After this many consecutive gated readings the next one enters the baseline anyway."""
PRECISION_REFRESH = 50
"""The channels' correlation is inverted again after this many new baseline readings."""
SHRINK = 0.1
"""Correlation matrices are shrunk towards the identity by this much before inversion, so
perfectly correlated or constant channels still give a well-conditioned inverse."""
_REL_EPS = 1e-9
"""A std below this fraction of |mean| is floating-point noise, not spread (see :func:`_scale`)."""
_ABS_EPS = 1e-12

SLOTS = 8
"""Channels with their own signed features (see the module doc)."""

POOLED_NAMES: tuple[str, ...] = (
    "z_max",
    "z_mean",
    "step_max",
    "step_mean",
    "zprev_max",
    f"level{SHORT}_max",
    f"level{SHORT}_mean",
    f"vol{SHORT}_max",
    f"vol{SHORT}_min",
    f"vol{SHORT}_mean",
    f"level{LONG}_max",
    f"level{LONG}_mean",
    f"vol{LONG}_max",
    f"vol{LONG}_min",
    f"vol{LONG}_mean",
    "mahal_z",
    f"mahal_level{SHORT}",
    f"mahal_level{LONG}",
)
N_POOLED = len(POOLED_NAMES)
SLOT_NAMES: tuple[str, ...] = ("z", f"level{LONG}", f"zmean{SLOW}", f"vol{LONG}")
FEATURE_NAMES: tuple[str, ...] = POOLED_NAMES + tuple(
    f"ch{slot}_{name}" for slot in range(SLOTS) for name in SLOT_NAMES
)
"""Feature columns, in order (model inputs, dashboards, docs): the pooled block, then the
channel slots."""
N_FEATURES = len(FEATURE_NAMES)


@dataclass(frozen=True)
class FeatureState:
    """One device's bounded memory for features (plain arrays; a new device: :func:`new_state`).

    ``count``/``mean``/``m2``: the gated per-channel baseline (Welford); ``comoment``: the
    baseline's co-moment matrix (C × C) for the channels' correlation; ``precision``: the
    inverse of the shrunk correlation, refreshed every :data:`PRECISION_REFRESH` baseline
    readings (``refreshed_at`` = the baseline count then); ``window``: the last
    ``min(seen, WINDOW)`` raw readings (rows, oldest first); ``last_abs_z``: |z| of the previous
    reading per channel; ``seen``: readings seen (admitted or not); ``gated``: consecutive
    readings kept out of the baseline; ``z_window``: the signed z of the last (up to
    :data:`SLOW`) readings.
    """

    channels: tuple[str, ...]
    seen: int
    count: int
    mean: np.ndarray
    m2: np.ndarray
    comoment: np.ndarray
    precision: np.ndarray
    refreshed_at: int
    window: np.ndarray
    last_abs_z: np.ndarray
    gated: int = 0
    z_window: np.ndarray | None = None  # None: none kept yet (a state of an older job)

    def __post_init__(self) -> None:
        if self.z_window is None:
            object.__setattr__(self, "z_window", np.zeros((0, len(self.channels))))

    @property
    def slots(self) -> np.ndarray:
        """The channels (indices) of the slots, in the order of their names."""
        return _slots(self.channels)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    def std(self) -> np.ndarray:
        """Per-channel sample std of the baseline (0 below two readings)."""
        if self.count < 2:
            return np.zeros(self.n_channels)
        return np.sqrt(np.maximum(self.m2, 0.0) / (self.count - 1))


def _slots(channels: tuple[str, ...]) -> np.ndarray:
    slots = _SLOTS.get(channels)
    if slots is None:
        if len(_SLOTS) >= 4096:  # bounded: a fleet's channel sets are few
            _SLOTS.clear()
        slots = np.argsort(np.array(channels, dtype=object), kind="stable")[:SLOTS].astype(np.intp)
        slots.flags.writeable = False  # shared by every device with these channels
        _SLOTS[channels] = slots
    return slots


_SLOTS: dict[tuple[str, ...], np.ndarray] = {}


def new_state(channels: tuple[str, ...]) -> FeatureState:
    """The empty state of a device that reports ``channels``."""
    c = len(channels)
    if c == 0:
        raise ValueError("a device needs at least one channel")
    return FeatureState(
        channels=tuple(channels),
        seen=0,
        count=0,
        mean=np.zeros(c),
        m2=np.zeros(c),
        comoment=np.zeros((c, c)),
        precision=np.eye(c),
        refreshed_at=0,
        window=np.zeros((0, c)),
        last_abs_z=np.zeros(c),
    )


@dataclass(frozen=True)
class Scored:
    """What :func:`advance` computes for a batch of n readings."""

    features: np.ndarray  # (n, N_FEATURES)
    z: np.ndarray  # (n, C) signed z per channel against the baseline before each reading
    warm: np.ndarray  # (n,) bool: the device had seen >= WARMUP readings before this one


# The reductions and the clip as the ufuncs they are: ``ndarray.max`` and ``np.clip`` reach the
# same ufuncs through Python wrappers, which cost more than the work on a message's rows.
_max, _min, _sum = np.maximum.reduce, np.minimum.reduce, np.add.reduce


def _clip(values: np.ndarray, cap: float, out: np.ndarray | None = None) -> np.ndarray:
    """``values`` clipped to [-cap, cap] (NaN stays NaN, as with ``np.clip``), into ``out``."""
    return np.minimum(np.maximum(values, -cap, out=out), cap, out=out)


def _scale(std: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The divisor of every z-like feature: the std, kept off zero relative to the level so a
    perfectly constant history makes any change a capped, not infinite, z."""
    return np.maximum(std, _REL_EPS * np.abs(mean) + _ABS_EPS)


def _prefix_baseline(
    state: FeatureState, X: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(count, mean, std)`` of the baseline before each row of ``X`` if every row entered it.

    Chan et al.'s merge of the state with prefix sums of the rows, shifted by the first row so
    that ``1e9 + noise`` keeps its small variance."""
    n = X.shape[0]
    shift = X[0]
    d = X - shift
    i = np.arange(n)[:, None].astype(np.float64)
    dd = d * d
    s1 = d.cumsum(axis=0) - d  # sums of rows before row i
    s2 = dd.cumsum(axis=0) - dd
    safe_i = np.maximum(i, 1.0)
    mean_b = shift + s1 / safe_i
    m2_b = np.maximum(s2 - s1 * s1 / safe_i, 0.0)
    n0 = float(state.count)
    count = n0 + i
    safe_count = np.maximum(count, 1.0)
    delta = np.where(i > 0, mean_b - state.mean, 0.0)
    mean = np.where(count > 0, state.mean + delta * i / safe_count, 0.0)
    m2 = state.m2 + np.where(i > 0, m2_b, 0.0) + delta * delta * n0 * i / safe_count
    std = np.where(count > 1, np.sqrt(m2 / np.maximum(count - 1, 1.0)), 0.0)
    return count[:, 0], mean, std


def _admitted(state: FeatureState, X: np.ndarray) -> dict[str, object]:
    """The baseline fields (count, mean, m2, co-moments) of ``state`` with the rows of ``X``
    added (Chan et al.'s merge): a dict for the one ``replace`` that moves the state on."""
    n = float(X.shape[0])
    mean_b = np.add.reduce(X, axis=0) / n  # ndarray.mean's own arithmetic, without its wrapper
    d = X - mean_b
    m2_b = np.add.reduce(d * d, axis=0)
    co_b = d.T.dot(d)
    n0 = float(state.count)
    total = n0 + n
    delta = mean_b - state.mean
    weight = n0 * n / total
    return {
        "count": int(total),
        "mean": state.mean + delta * (n / total),
        "m2": state.m2 + m2_b + delta * delta * weight,
        "comoment": state.comoment + co_b + np.multiply.outer(delta, delta) * weight,
    }


def _refreshed(state: FeatureState) -> FeatureState:
    """Invert the channels' (shrunk) correlation again if enough baseline readings came in."""
    if state.n_channels == 1 or state.count < 2:
        return state
    if state.refreshed_at and state.count - state.refreshed_at < PRECISION_REFRESH:
        return state
    cov = state.comoment / (state.count - 1)
    sd = _scale(np.sqrt(np.maximum(np.diag(cov), 0.0)), state.mean)
    corr = cov / np.outer(sd, sd)
    corr = (1.0 - SHRINK) * np.clip(corr, -1.0, 1.0) + SHRINK * np.eye(state.n_channels)
    np.fill_diagonal(corr, 1.0)
    return replace(state, precision=np.linalg.inv(corr), refreshed_at=state.count)


def _window_sums(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefix sums of ``values`` (history first, then the batch) shifted by its last row (so
    ``1e9 + noise`` keeps its small variance): ``(shift, sums, sums of squares)``, each with a
    leading zero row, for :func:`_rolling`."""
    shift = values[-1]
    d = values - shift
    zero = np.zeros((1, d.shape[1]))
    return (
        shift,
        np.concatenate((zero, d.cumsum(axis=0))),
        np.concatenate((zero, (d * d).cumsum(axis=0))),
    )


def _rolling(
    sums: tuple[np.ndarray, np.ndarray, np.ndarray], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std of the last ``SHORT`` and the last ``LONG`` rows ending at each
    of the last ``n`` rows (over however many rows exist), from :func:`_window_sums`: each
    2 × n × C, the short window first (both widths in one pass of numpy calls)."""
    shift, s1, s2 = sums
    total = s1.shape[0] - 1
    end = np.arange(total - n + 1, total + 1)
    start = np.maximum(end - _WIDTHS, 0)
    k = (end - start)[:, :, None].astype(np.float64)
    m1 = (s1[end] - s1[start]) / k
    var = np.maximum((s2[end] - s2[start]) / k - m1 * m1, 0.0)
    return shift + m1, np.sqrt(var)


_WIDTHS = np.array([[SHORT], [LONG]])


def _rolling_mean(values: np.ndarray, width: int, n: int) -> np.ndarray:
    """Mean of the last ``width`` rows ending at each of the last ``n`` rows of ``values``."""
    total = values.shape[0]
    s1 = np.concatenate((np.zeros((1, values.shape[1])), values.cumsum(axis=0)))
    end = np.arange(total - n + 1, total + 1)
    start = np.maximum(end - width, 0)
    return (s1[end] - s1[start]) / (end - start)[:, None]


def _mahalanobis(v: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """sqrt(vᵀ P v / C) per row, clipped to [0, CAP] (for one channel: |v|)."""
    c = v.shape[1]
    if c == 1:
        return np.minimum(np.abs(v[:, 0]), CAP)
    q = np.einsum("ni,ij,nj->n", v, precision, v) / c
    return np.minimum(np.sqrt(np.maximum(q, 0.0)), CAP)


# The pooled block is reduced in three calls, not fifteen: the per-channel arrays it pools are
# the layers of one (7, n, C) array (|z|, step, |z| of the previous reading, |level| and vol of
# both windows), and each reduction over channels fills its columns of the features.
_LAYERS = ("z", "step", "zprev", f"level{SHORT}", f"level{LONG}", f"vol{SHORT}", f"vol{LONG}")
_POOLED_MAX = [POOLED_NAMES.index(f"{layer}_max") for layer in _LAYERS]
_MEAN_LAYERS = [i for i, layer in enumerate(_LAYERS) if f"{layer}_mean" in POOLED_NAMES]
_POOLED_MEAN = [POOLED_NAMES.index(f"{_LAYERS[i]}_mean") for i in _MEAN_LAYERS]
_POOLED_MIN = [POOLED_NAMES.index(f"{layer}_min") for layer in _LAYERS[5:]]  # the vol layers


def _features(
    X: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    z: np.ndarray,
    history: np.ndarray,
    z_history: np.ndarray,
    last_abs_z: np.ndarray,
    precision: np.ndarray,
    slots: np.ndarray,
) -> np.ndarray:
    n, c = X.shape
    out = np.zeros((n, N_FEATURES))  # filled column by column: no stacking copies
    layers = np.empty((7, n, c))
    abs_z = np.abs(z, out=layers[0])
    prev = np.concatenate((history[-1:] if history.shape[0] else X[:1], X[:-1]))
    np.minimum(np.abs(X - prev) / scale, CAP, out=layers[1])  # step
    layers[2, 0] = last_abs_z
    layers[2, 1:] = abs_z[:-1]
    w_mean, w_std = _rolling(_window_sums(np.concatenate((history, X))), n)
    level = _clip((w_mean - mean) / scale, CAP)
    np.abs(level, out=layers[3:5])
    vol = _clip(np.log((w_std + 1e-3 * scale) / scale), VOL_CAP, out=layers[5:7])
    out[:, _POOLED_MAX] = _max(layers, 2).T
    # sum × 1/C: ndarray.mean's overhead shows in the profile
    out[:, _POOLED_MEAN] = (_sum(layers[_MEAN_LAYERS], 2) * (1.0 / c)).T
    out[:, _POOLED_MIN] = _min(vol, 2).T
    out[:, 15] = _mahalanobis(z, precision)
    out[:, 16] = _mahalanobis(level[0], precision)
    out[:, 17] = _mahalanobis(level[1], precision)
    slot = out[:, N_POOLED:].reshape(n, SLOTS, len(SLOT_NAMES))  # a view into out
    used = slots.size
    slot[:, :used, 0] = z[:, slots]
    slot[:, :used, 1] = level[1][:, slots]
    # Each z against the baseline of its own time: unlike a window mean against today's
    # baseline, it still shows how unusual the stretch was after the baseline moved on.
    slot[:, :used, 2] = _rolling_mean(np.concatenate((z_history, z))[:, slots], SLOW, n)
    slot[:, :used, 3] = vol[1][:, slots]
    return out


def advance(
    state: FeatureState, X: np.ndarray, gate: float = GATE, max_gated: int = MAX_GATED
) -> tuple[FeatureState, Scored]:
    """Score a batch of one device's time-ordered readings (``X``: n × C, the state's channel
    order) against its state, then learn the batch: the new state and the batch's features.

    Each reading is judged by the baseline *before* it. Vectorised: the rows up to the first
    gated one are handled in one step, so the per-row Python loop only runs inside gated
    stretches (rare except during long faults).
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != state.n_channels or X.shape[0] == 0:
        raise ValueError(f"need a non-empty (n, {state.n_channels}) array, got {X.shape}")
    if not np.logical_and.reduce(np.isfinite(X), axis=None):
        raise ValueError("readings must be finite")
    n = X.shape[0]
    slots = state.slots
    features = np.empty((n, N_FEATURES))
    z_all = np.zeros((n, state.n_channels))
    warm = np.empty(n, dtype=bool)
    i = 0
    while i < n:
        state = _refreshed(state)
        seg = X[i:]
        _, mean, std = _prefix_baseline(state, seg)
        scale = _scale(std, mean)
        seen = state.seen + np.arange(seg.shape[0])
        is_warm = seen >= WARMUP
        z = np.where(is_warm[:, None], _clip((seg - mean) / scale, CAP), 0.0)
        over = is_warm & (_max(np.abs(z), 1) > gate)
        first = int(np.argmax(over)) if over.any() else seg.shape[0]
        forced = first == 0 and state.gated >= max_gated
        if forced:
            first = 1  # admitted anyway, and so are the next ones until one passes the gate
        stop = max(first, 1)
        rows = slice(i, i + stop)
        part = _features(
            seg[:stop],
            mean[:stop],
            scale[:stop],
            z[:stop],
            state.window,
            state.z_window,
            state.last_abs_z,
            state.precision,
            slots,
        )
        features[rows] = np.where(is_warm[:stop, None], part, 0.0)
        z_all[rows] = z[:stop]
        warm[rows] = is_warm[:stop]
        common = {
            "seen": state.seen + stop,
            "window": np.concatenate((state.window, seg[:stop]))[-WINDOW:],
            "z_window": np.concatenate((state.z_window, z[:stop]))[-SLOW:],
            "last_abs_z": np.abs(z[stop - 1]),
        }
        if first == 0:  # the row at i is gated: it moves everything but the baseline
            state = replace(state, gated=state.gated + 1, **common)
        else:
            gated = state.gated if forced else 0
            state = replace(state, gated=gated, **common, **_admitted(state, seg[:stop]))
        i += stop
    return state, Scored(features, z_all, warm)


def max_abs_z(scored: Scored) -> np.ndarray:
    """The z-score rule's statistic per reading: the largest |z| over channels."""
    return _max(np.abs(scored.z), 1)
