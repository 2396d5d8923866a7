"""streaming.model.features against independent oracles (pandas rolling/expanding statistics,
numpy correlation), plus the documented invariances and bounds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from streaming.model import features as F
from streaming.model.features import (
    CAP,
    FEATURE_NAMES,
    GATE,
    LONG,
    MAX_GATED,
    SHORT,
    VOL_CAP,
    WARMUP,
    advance,
    new_state,
)

NO_GATE = float("inf")
MAHAL = [i for i, name in enumerate(FEATURE_NAMES) if name.startswith("mahal_")]
VOL = [i for i, name in enumerate(FEATURE_NAMES) if "vol" in name]
SIGNED = [i for i, name in enumerate(FEATURE_NAMES) if name.startswith("ch") and "vol" not in name]
Z_LIKE = [i for i in range(len(FEATURE_NAMES)) if i not in VOL and i not in SIGNED]


def signs_of_slots(a: np.ndarray) -> np.ndarray:
    """Per feature column, the sign a channel scaling by ``a`` gives it (channels ch0, ch1, ...
    fill the slots in order): the signed slot features follow their channel's sign."""
    signs = np.ones(len(FEATURE_NAMES))
    for i in SIGNED:
        slot = int(FEATURE_NAMES[i].split("_")[0][2:])
        signs[i] = np.sign(a[slot]) if slot < a.size else 1.0
    return signs


def col(name: str) -> int:
    return FEATURE_NAMES.index(name)


def channels(c: int) -> tuple[str, ...]:
    return tuple(f"ch{i}" for i in range(c))


def run(X: np.ndarray, gate: float = NO_GATE, batch: int | None = None, max_gated=MAX_GATED):
    """Feed ``X`` in batches of ``batch`` rows; the final state and the stacked results."""
    X = np.asarray(X, dtype=np.float64)
    state = new_state(channels(X.shape[1]))
    feats, zs, warms = [], [], []
    step = batch or X.shape[0]
    for lo in range(0, X.shape[0], step):
        state, scored = advance(state, X[lo : lo + step], gate=gate, max_gated=max_gated)
        feats.append(scored.features)
        zs.append(scored.z)
        warms.append(scored.warm)
    return state, np.vstack(feats), np.vstack(zs), np.concatenate(warms)


def random_series(n: int = 240, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)) * [1.0, 2.5, 0.4] + [0.5, -3.0, 2.0]


def pandas_reference(X: np.ndarray) -> dict[str, np.ndarray]:
    """Per channel (n × C): baseline before each reading (expanding, ddof=1, shifted by one),
    z, step, and for each window the level and vol of the documented formulas."""
    df = pd.DataFrame(X)
    mean_b = df.expanding().mean().shift(1).to_numpy()
    std_b = df.expanding().std(ddof=1).shift(1).to_numpy()
    out = {
        "mean": mean_b,
        "std": std_b,
        "z": np.clip((X - mean_b) / std_b, -CAP, CAP),
        "step": np.minimum(np.abs(df.diff().to_numpy()) / std_b, CAP),
    }
    for w in (SHORT, LONG):
        roll_mean = df.rolling(w, min_periods=1).mean().to_numpy()
        roll_std = df.rolling(w, min_periods=1).std(ddof=0).to_numpy()
        out[f"level{w}"] = np.clip((roll_mean - mean_b) / std_b, -CAP, CAP)
        out[f"vol{w}"] = np.clip(np.log((roll_std + 1e-3 * std_b) / std_b), -VOL_CAP, VOL_CAP)
    return out


# --------------------------------------------------------------------------------------------
# Against pandas
# --------------------------------------------------------------------------------------------


def test_z_equals_pandas_expanding_baseline_before_each_reading():
    X = random_series()
    _, feats, z, warm = run(X)
    ref = pandas_reference(X)
    assert warm.sum() == X.shape[0] - WARMUP
    np.testing.assert_allclose(z[warm], ref["z"][warm], rtol=1e-7, atol=1e-9)
    abs_z = np.abs(ref["z"][warm])
    np.testing.assert_allclose(feats[warm, col("z_max")], abs_z.max(1), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(feats[warm, col("z_mean")], abs_z.mean(1), rtol=1e-7, atol=1e-9)


def test_step_and_previous_z_equal_pandas():
    X = random_series(seed=1)
    _, feats, _, warm = run(X)
    ref = pandas_reference(X)
    step = ref["step"][warm]
    np.testing.assert_allclose(feats[warm, col("step_max")], step.max(1), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(feats[warm, col("step_mean")], step.mean(1), rtol=1e-7, atol=1e-9)
    # zprev: |z| of the previous reading (z is 0 before the warm-up ends; 0 before the first).
    abs_z = np.where(np.arange(X.shape[0])[:, None] >= WARMUP, np.abs(ref["z"]), 0.0)
    prev_abs = np.vstack((np.zeros((1, 3)), abs_z[:-1]))
    np.testing.assert_allclose(
        feats[warm, col("zprev_max")], prev_abs[warm].max(1), rtol=1e-7, atol=1e-9
    )


@pytest.mark.parametrize("width", [SHORT, LONG])
def test_level_and_vol_equal_pandas_rolling(width):
    X = random_series(n=300, seed=2)
    X[150:170, 1] += 3.0  # a level shift the windows must see
    X[200:230, 0] *= 4.0  # a noise burst
    _, feats, _, warm = run(X)
    ref = pandas_reference(X)
    level = np.abs(ref[f"level{width}"][warm])
    vol = ref[f"vol{width}"][warm]
    got = feats[warm]
    np.testing.assert_allclose(got[:, col(f"level{width}_max")], level.max(1), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        got[:, col(f"level{width}_mean")], level.mean(1), rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(got[:, col(f"vol{width}_max")], vol.max(1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[:, col(f"vol{width}_min")], vol.min(1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[:, col(f"vol{width}_mean")], vol.mean(1), rtol=1e-6, atol=1e-7)


def test_mahalanobis_of_second_batch_uses_the_shrunk_correlation_of_the_first():
    """After a first batch, the next batch's ``mahal_*`` use the inverse of the channels'
    correlation shrunk towards the identity by SHRINK (numpy corrcoef as the oracle)."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(400, 1))
    X = np.hstack((base + 0.3 * rng.normal(size=(400, 1)), -base, rng.normal(size=(400, 1))))
    X = X * [2.0, 0.5, 1.0] + [10.0, -4.0, 0.0]
    first, second = X[:300], X[300:]
    state = new_state(channels(3))
    state, _ = advance(state, first, gate=NO_GATE)
    _, scored = advance(state, second, gate=NO_GATE)
    corr = np.corrcoef(first, rowvar=False)
    shrunk = (1 - F.SHRINK) * corr + F.SHRINK * np.eye(3)
    precision = np.linalg.inv(shrunk)
    ref = pandas_reference(X)
    z = ref["z"][300:]
    expected = np.minimum(np.sqrt(np.einsum("ni,ij,nj->n", z, precision, z) / 3), CAP)
    np.testing.assert_allclose(scored.features[:, col("mahal_z")], expected, rtol=1e-5)
    lv = ref[f"level{SHORT}"][300:]
    expected_lv = np.minimum(np.sqrt(np.einsum("ni,ij,nj->n", lv, precision, lv) / 3), CAP)
    np.testing.assert_allclose(
        scored.features[:, col(f"mahal_level{SHORT}")], expected_lv, rtol=1e-5
    )
    # Channels 0 and 1 move in opposite directions: the same per-channel |z| scores higher
    # on the Mahalanobis length when both go up (against the correlation) than when they
    # keep their relation.
    sd = state.std()
    consistent = state.mean + np.array([1.5, -1.5, 0.0]) * sd
    broken = state.mean + np.array([1.5, 1.5, 0.0]) * sd
    _, ok = advance(state, consistent[None, :], gate=NO_GATE)
    _, bad = advance(state, broken[None, :], gate=NO_GATE)
    np.testing.assert_allclose(ok.features[0, col("z_max")], bad.features[0, col("z_max")])
    assert bad.features[0, col("mahal_z")] > 2 * ok.features[0, col("mahal_z")]


# --------------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------------


def test_batch_invariance_without_gate_multichannel():
    X = random_series(n=260, seed=3)
    _, whole, z_whole, warm_whole = run(X, batch=None)
    _, sevens, z_sevens, warm_sevens = run(X, batch=7)
    keep = [i for i in range(len(FEATURE_NAMES)) if i not in MAHAL]
    np.testing.assert_array_equal(warm_whole, warm_sevens)
    np.testing.assert_allclose(z_whole, z_sevens, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(whole[:, keep], sevens[:, keep], rtol=1e-9, atol=1e-10)


def test_the_z_window_carries_over_batches_and_keeps_the_last_slow_readings():
    X = random_series(n=150, seed=13)
    state, feats, z, _ = run(X, batch=7)
    np.testing.assert_allclose(state.z_window, z[-F.SLOW :], rtol=1e-12)
    _, whole, _, _ = run(X, batch=None)
    zmean = [col(f"ch{k}_zmean{F.SLOW}") for k in range(3)]
    np.testing.assert_allclose(feats[:, zmean], whole[:, zmean], rtol=1e-9, atol=1e-10)


def test_batch_invariance_without_gate_single_channel_all_columns():
    X = random_series(n=260, seed=4)[:, :1]
    _, whole, z_whole, _ = run(X, batch=None)
    _, sevens, z_sevens, _ = run(X, batch=7)
    _, ones, _, _ = run(X, batch=1)
    np.testing.assert_allclose(z_whole, z_sevens, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(whole, sevens, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(whole, ones, rtol=1e-9, atol=1e-10)


def test_batch_invariance_with_gate_single_channel():
    """Gating is decided reading by reading, so batching does not change it either."""
    X = random_series(n=400, seed=6)[:, :1]
    X[100:130, 0] += 40.0  # a gated fault
    X[300:, 0] += 25.0  # a lasting change
    _, whole, z_whole, _ = run(X, gate=GATE, batch=None, max_gated=40)
    _, sevens, z_sevens, _ = run(X, gate=GATE, batch=7, max_gated=40)
    np.testing.assert_allclose(z_whole, z_sevens, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(whole, sevens, rtol=1e-9, atol=1e-10)


def scale_inputs():
    X = random_series(n=260, seed=7)
    b = np.array([1e6, 1e6, 1e6])
    return X, SCALE * X + b


SCALE = np.array([-3.7, -3.7, -3.7])


def test_scale_invariance_affine_rtol_1e6():
    X, Y = scale_inputs()
    _, fx, zx, _ = run(X)
    _, fy, zy, _ = run(Y)
    np.testing.assert_allclose(np.abs(zy), np.abs(zx), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fy, fx * signs_of_slots(SCALE), rtol=1e-6, atol=1e-9)


def test_scale_invariance_affine_within_documented_epsilon():
    """What does hold for a·x + b: differences bounded by the relative epsilon of the divisor
    (1e-9·|b| / (|a|·std) ≈ 1e-3 here)."""
    X, Y = scale_inputs()
    _, fx, zx, _ = run(X)
    _, fy, zy, _ = run(Y)
    np.testing.assert_allclose(np.abs(zy), np.abs(zx), rtol=3e-3, atol=1e-6)
    np.testing.assert_allclose(fy, fx * signs_of_slots(SCALE), rtol=3e-3, atol=3e-3)


def test_scale_invariance_pure_scaling_and_sign_is_exact():
    X = random_series(n=260, seed=8)
    a = np.array([-3.7, 1e3, -1e-3])
    _, fx, zx, _ = run(X)
    _, fy, zy, _ = run(a * X)
    np.testing.assert_allclose(zy, zx * np.sign(a), rtol=1e-6, atol=1e-9)
    # atol: logs of ratios near 1
    np.testing.assert_allclose(fy, fx * signs_of_slots(a), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Bounds, warm-up, errors
# --------------------------------------------------------------------------------------------


def hostile_series() -> dict[str, np.ndarray]:
    n = 300
    rng = np.random.default_rng(9)
    spikes = rng.normal(size=(n, 3))
    spikes[::37, 0] = 1e15
    spikes[::53, 2] = -1e15
    constant = np.column_stack((np.full(n, 7.0), np.full(n, 1e15), rng.normal(size=n)))
    alternating = np.column_stack(
        (np.where(np.arange(n) % 2, 1e15, -1e15), rng.normal(size=n) * 1e15, np.zeros(n))
    )
    step_from_constant = constant.copy()
    step_from_constant[150:, 0] = 7.000001
    return {
        "spikes": spikes,
        "constant": constant,
        "alternating": alternating,
        "step_from_constant": step_from_constant,
        "single_alternating": alternating[:, :1],
    }


@pytest.mark.parametrize("name", sorted(hostile_series()))
@pytest.mark.parametrize("gate", [GATE, NO_GATE])
@pytest.mark.parametrize("batch", [None, 7])
def test_hostile_inputs_give_finite_bounded_features(name, gate, batch):
    X = hostile_series()[name]
    _, feats, z, warm = run(X, gate=gate, batch=batch)
    assert np.isfinite(feats).all() and np.isfinite(z).all()
    assert feats.shape == (X.shape[0], len(FEATURE_NAMES))
    assert feats[:, Z_LIKE].min() >= 0.0 and feats[:, Z_LIKE].max() <= CAP
    assert np.abs(feats[:, SIGNED]).max() <= CAP
    assert feats[:, VOL].min() >= -VOL_CAP and feats[:, VOL].max() <= VOL_CAP
    assert np.abs(z).max() <= CAP
    assert not warm[:WARMUP].any() and warm[WARMUP:].all()


def test_channel_slots_hold_each_channel_signed_in_the_order_of_the_names():
    # Channels reported as (c, a, b): slot 0 is "a", slot 1 "b", slot 2 "c", the rest zeros.
    X = random_series(n=120, seed=12)
    X[60:, 1] += 10.0  # "a" rises by 4 of its standard deviations
    X[60:, 2] -= 2.0  # "b" falls by 5 of its
    state = new_state(("c", "a", "b"))
    state, scored = advance(state, X, gate=NO_GATE)
    feats, z = scored.features, scored.z
    order = [1, 2, 0]
    slot = {name: [col(f"ch{k}_{name}") for k in range(3)] for name in F.SLOT_NAMES}
    np.testing.assert_array_equal(feats[:, slot["z"]], z[:, order])
    # The slots' magnitudes are the channels' pooled ones (tested against pandas above).
    level, vol = f"level{LONG}", f"vol{LONG}"
    np.testing.assert_allclose(np.abs(feats[:, slot[level]]).max(1), feats[:, col(f"{level}_max")])
    np.testing.assert_allclose(feats[:, slot[vol]].min(1), feats[:, col(f"{vol}_min")])
    assert (feats[62:80, slot[level][0]] > 0.0).all() and (feats[62:80, slot[level][1]] < 0.0).all()
    # The mean z of the last 60 readings, each against the baseline of its own time (pandas).
    z_mean = pd.DataFrame(z[:, order]).rolling(F.SLOW, min_periods=1).mean().to_numpy()
    np.testing.assert_allclose(feats[:, slot[f"zmean{F.SLOW}"]], z_mean, rtol=1e-9, atol=1e-12)
    unused = [col(f"ch{k}_{name}") for k in range(3, F.SLOTS) for name in F.SLOT_NAMES]
    assert not feats[:, unused].any()


def test_constant_then_change_is_a_capped_z():
    X = np.full((50, 1), 21.5)
    X[40, 0] = 21.6
    _, _, z, _ = run(X)
    assert z[39, 0] == 0.0
    assert z[40, 0] == CAP


@pytest.mark.parametrize("batch", [None, 3, 1])
def test_warm_up_rows_are_all_zero(batch):
    X = random_series(n=40, seed=10) * 1e3
    _, feats, z, warm = run(X, batch=batch)
    assert not warm[:WARMUP].any()
    assert warm[WARMUP:].all()
    assert (feats[:WARMUP] == 0).all()
    assert (z[:WARMUP] == 0).all()
    assert (feats[WARMUP:, col("z_max")] > 0).all()


def test_channel_count_mismatch_raises_value_error():
    state = new_state(channels(3))
    with pytest.raises(ValueError):
        advance(state, np.zeros((4, 2)))
    with pytest.raises(ValueError):
        advance(state, np.zeros((4, 4)))
    with pytest.raises(ValueError):
        advance(state, np.zeros(3))  # 1-D
    with pytest.raises(ValueError):
        advance(state, np.zeros((0, 3)))
    with pytest.raises(ValueError):
        advance(state, np.array([[1.0, np.nan, 2.0]]))
    with pytest.raises(ValueError):
        new_state(())


# --------------------------------------------------------------------------------------------
# Gated baseline
# --------------------------------------------------------------------------------------------


def calm_normal(n: int, seed: int) -> np.ndarray:
    """Normal noise kept within ±2: nothing in it is ever gated."""
    return np.clip(np.random.default_rng(seed).normal(size=(n, 1)), -2.0, 2.0)


def test_a_20_reading_fault_of_50_sigma_is_kept_out_of_the_baseline():
    pre = calm_normal(200, 11) + 100.0
    fault = pre[-20:] + 50.0 * pre.std()
    state, _, _, _ = run(pre, gate=GATE)
    assert state.count == 200  # nothing before the fault was gated
    state, scored = advance(state, fault, gate=GATE, max_gated=MAX_GATED)
    assert (np.abs(scored.z) == CAP).all()
    assert state.count == 200
    assert state.gated == 20
    assert state.seen == 220
    np.testing.assert_allclose(state.mean, [np.mean(pre)], rtol=1e-12)
    np.testing.assert_allclose(state.std(), [np.std(pre, ddof=1)], rtol=1e-9)
    # After the fault the old level is normal again, judged by the untouched baseline.
    after = calm_normal(30, 12) + 100.0
    state, scored = advance(state, after, gate=GATE, max_gated=MAX_GATED)
    assert np.abs(scored.z).max() < GATE
    assert state.gated == 0 and state.count == 230


def test_without_the_gate_the_fault_drags_the_baseline():
    pre = calm_normal(200, 11) + 100.0
    fault = pre[-20:] + 50.0 * pre.std()
    state, _, _, _ = run(np.vstack((pre, fault)), gate=NO_GATE)
    assert state.count == 220
    np.testing.assert_allclose(state.mean, [np.mean(np.vstack((pre, fault)))], rtol=1e-12)


@pytest.mark.parametrize("max_gated", [MAX_GATED, 25])
def test_after_max_gated_readings_the_next_one_enters_the_baseline(max_gated):
    pre = calm_normal(200, 13)
    shifted = calm_normal(max_gated + 1, 14) + 50.0
    state, _, _, _ = run(pre, gate=GATE)
    assert state.count == 200
    state, _ = advance(state, shifted[:max_gated], gate=GATE, max_gated=max_gated)
    assert state.count == 200 and state.gated == max_gated
    state, _ = advance(state, shifted[max_gated:], gate=GATE, max_gated=max_gated)
    assert state.count == 201
    expected = np.vstack((pre, shifted[max_gated:]))
    np.testing.assert_allclose(state.mean, expected.mean(0), rtol=1e-12)


def test_a_permanent_shift_is_admitted_within_max_gated_plus_100_readings():
    pre = calm_normal(200, 15)
    shifted = calm_normal(MAX_GATED + 100, 16) + 50.0
    state, _, _, _ = run(pre, gate=GATE)
    zs = []
    for lo in range(0, shifted.shape[0], 50):  # as the replay sends them
        state, scored = advance(state, shifted[lo : lo + 50], gate=GATE, max_gated=MAX_GATED)
        zs.append(scored.z)
    abs_z = np.abs(np.vstack(zs))[:, 0]
    assert (abs_z[-20:] < GATE).all(), f"still |z| = {abs_z[-5:]} after {len(abs_z)} readings"
