"""Aggregation rules (streaming.model.aggregation) against independent oracles: numbers worked
out by hand, plain-Python reimplementations on sorted lists, properties, and attacks."""

from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from streaming.model import aggregation as agg
from streaming.model.aggregation import (
    RULES,
    AggregationRule,
    ClippedFedAvg,
    CoordinateMedian,
    FedAvg,
    GeometricMedian,
    ServerMomentum,
    TrimmedMean,
    Updates,
    make_rule,
)

NO_CAPS = {"max_update_norm": 0.0, "staleness_alpha": 0.0}
ROBUST = ("trimmed_mean", "median", "clipped_fedavg", "geometric_median")


def batch(params, samples=None, staleness=None) -> Updates:
    params = np.asarray(params, dtype=float)
    samples = np.ones(len(params)) if samples is None else samples
    return Updates(params, samples, staleness)


def random_batch(seed: int, m: int = 9, d: int = 4) -> tuple[Updates, np.ndarray]:
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=d)
    params = reference + rng.normal(size=(m, d))
    samples = rng.integers(1, 200, size=m)
    staleness = rng.integers(0, 4, size=m)
    return Updates(params, samples, staleness), reference


# --- plain-Python oracles -------------------------------------------------------------------


def py_weighted_median(values: list[float], weights: list[float]) -> float:
    """Walk the sorted (value, weight) pairs until half the weight is passed; exactly half:
    mean of that value and the next."""
    pairs = sorted(zip(values, weights, strict=True))
    half, run = sum(weights) / 2.0, 0.0
    for i, (value, weight) in enumerate(pairs):
        run += weight
        if math.isclose(run, half, rel_tol=1e-12):
            return (value + pairs[i + 1][0]) / 2.0
        if run > half:
            return value
    raise AssertionError("unreachable")


def py_trimmed_mean(values: list[float], weights: list[float], fraction: float) -> float:
    pairs = sorted(zip(values, weights, strict=True), key=lambda p: p[0])
    cut = int(fraction * len(pairs))
    kept = pairs[cut : len(pairs) - cut]
    return sum(v * w for v, w in kept) / sum(w for _, w in kept)


def columns(updates: Updates, reference: np.ndarray) -> list[list[float]]:
    return [[p[j] - reference[j] for p in updates.params.tolist()] for j in range(updates.dim)]


# --- input validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "samples", "staleness", "reason"),
    [
        (np.zeros((0, 3)), [], None, "empty"),
        (np.zeros((2, 0)), [1, 1], None, "empty"),
        ([[1.0, 2.0], [3.0]], [1, 1], None, "rectangular"),
        ([1.0, 2.0], [1, 1], None, "2-D"),
        ([[1.0, np.nan]], [1], None, "not finite"),
        ([[1.0], [np.inf]], [1, 1], None, r"updates \[1\] are not finite"),
        ([[1.0], [2.0]], [1], None, "sample counts"),
        ([[1.0], [2.0]], [1, 0], None, "> 0"),
        ([[1.0], [2.0]], [1, -5], None, "> 0"),
        ([[1.0], [2.0]], [1, np.nan], None, "finite"),
        ([[1.0], [2.0]], [1, 1], [0], "staleness values"),
        ([[1.0], [2.0]], [1, 1], [0, -1], "staleness"),
        ([[1.0], [2.0]], [1, 1], [0, 1.5], "whole numbers"),
        ([[1.0], [2.0]], [1, 1], [0, 1e300], "whole numbers"),
        ([["a", "b"]], [1], None, "numbers"),
    ],
)
def test_updates_refuse_bad_input_with_a_reason(params, samples, staleness, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        Updates(params, samples, staleness)


def test_updates_are_read_only_copies() -> None:
    params = np.array([[1.0, 2.0]])
    updates = Updates(params, [3], [2])
    params[0, 0] = 99.0
    assert updates.params[0, 0] == 1.0
    assert updates.staleness.dtype == np.int64
    with pytest.raises(ValueError):
        updates.params[0, 0] = 5.0
    assert (updates.count, updates.dim) == (1, 2)


def test_staleness_defaults_to_fresh() -> None:
    assert batch([[1.0], [2.0]]).staleness.tolist() == [0, 0]


@pytest.mark.parametrize("reference", [[0.0], [0.0, 0.0, 0.0], [0.0, np.nan], [[0.0, 0.0]]])
def test_reference_must_match_the_updates(reference) -> None:
    with pytest.raises(ValueError, match="reference"):
        FedAvg().combine(batch([[1.0, 2.0]]), reference)


def test_updates_too_far_to_subtract_are_refused() -> None:
    with pytest.raises(ValueError, match="too far"):
        FedAvg().combine(batch([[1e308]]), [-1e308])


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "options"),
    [
        (FedAvg, {"max_samples": 0}),
        (FedAvg, {"max_samples": 10.5}),
        (FedAvg, {"max_samples": True}),
        (FedAvg, {"staleness_alpha": -0.1}),
        (FedAvg, {"staleness_alpha": math.nan}),
        (FedAvg, {"max_update_norm": -1.0}),
        (FedAvg, {"max_update_norm": math.inf}),
        (FedAvg, {"max_update_norm": "10"}),
        (TrimmedMean, {"trim_fraction": 0.5}),
        (TrimmedMean, {"trim_fraction": -0.1}),
        (ClippedFedAvg, {"clip_multiple": 0.0}),
        (GeometricMedian, {"iterations": 0}),
        (GeometricMedian, {"smoothing": 0.0}),
        (FedAvg, {"bucket_size": 0}),
        (CoordinateMedian, {"bucket_size": 2.5}),
    ],
)
def test_rules_refuse_bad_options(rule: type[AggregationRule], options: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        rule(**options)


def test_registry_has_the_config_names() -> None:
    assert {"fedavg", "trimmed_mean", "median", "clipped_fedavg"} <= set(RULES)
    for name, rule in RULES.items():
        assert rule.name == name
        assert isinstance(make_rule(name), rule)


def test_make_rule_passes_options() -> None:
    rule = make_rule("trimmed_mean", trim_fraction=0.1, max_samples=70)
    assert rule == TrimmedMean(trim_fraction=0.1, max_samples=70)


def test_make_rule_lists_valid_names_and_options() -> None:
    with pytest.raises(ValueError, match=r"unknown aggregation rule 'krum'.*fedavg.*median"):
        make_rule("krum")
    with pytest.raises(ValueError, match=r"'trim'.*max_samples.*trim_fraction"):
        make_rule("trimmed_mean", trim=0.1)


# --- weights --------------------------------------------------------------------------------


def test_weight_is_capped_samples_times_staleness_discount() -> None:
    updates = batch([[0.0], [0.0], [0.0]], samples=[10, 2e9, 100], staleness=[0, 3, 8])
    weights = FedAvg(max_samples=100, staleness_alpha=0.5).weights(updates)
    np.testing.assert_allclose(weights, [10.0, 100 / 2, 100 / 3])


def test_inflated_sample_claim_weighs_exactly_the_cap() -> None:
    params = [[1.0, 0.0], [0.0, 1.0]]
    for name in RULES:
        rule = make_rule(name, max_samples=80)
        claimed = rule.combine(batch(params, samples=[40, 2e9]), [0.0, 0.0])
        capped = rule.combine(batch(params, samples=[40, 80]), [0.0, 0.0])
        np.testing.assert_array_equal(claimed, capped)


# --- FedAvg ---------------------------------------------------------------------------------


def test_fedavg_three_updates_by_hand() -> None:
    # reference (1, 1); deltas (1, 0), (0, 2), (-1, -1) with weights 1, 2, 1:
    # x: (1·1 + 2·0 + 1·-1)/4 = 0; y: (1·0 + 2·2 + 1·-1)/4 = 0.75
    updates = batch([[2.0, 1.0], [1.0, 3.0], [0.0, 0.0]], samples=[1, 2, 1])
    np.testing.assert_allclose(FedAvg(**NO_CAPS).combine(updates, [1.0, 1.0]), [1.0, 1.75])


def test_fedavg_discounts_stale_updates_by_hand() -> None:
    # weights 1 and (1 + 3)^-0.5 = 0.5: (0·1 + 3·0.5)/1.5 = 1
    updates = batch([[0.0], [3.0]], staleness=[0, 3])
    rule = FedAvg(staleness_alpha=0.5, max_update_norm=0.0)
    np.testing.assert_allclose(rule.combine(updates, [0.0]), [1.0])


def test_fedavg_of_one_update_is_that_update() -> None:
    updates = batch([[0.3, -2.0, 5.0]], samples=[7], staleness=[2])
    np.testing.assert_allclose(FedAvg().combine(updates, [0.0, -1.0, 4.0]), [0.3, -2.0, 5.0])


def test_update_norm_cap_keeps_direction() -> None:
    # delta (30, 40) has norm 50; capped at 10 it becomes (6, 8)
    updates = batch([[31.0, 41.0]])
    np.testing.assert_allclose(FedAvg(max_update_norm=10.0).combine(updates, [1.0, 1.0]), [7, 9])
    np.testing.assert_allclose(FedAvg(max_update_norm=0.0).combine(updates, [1, 1]), [31, 41])


# --- trimmed mean and median ----------------------------------------------------------------


def test_trimmed_mean_by_hand() -> None:
    # 5 updates, trim 0.2 → drop 1 lowest and 1 highest per coordinate:
    # x: [-9, 1, 2, 3, 50] → (1 + 2 + 3)/3 = 2;  y: [0, 0, 4, 8, 8] → (0 + 4 + 8)/3 = 4
    params = [[1.0, 0.0], [2.0, 8.0], [-9.0, 4.0], [50.0, 0.0], [3.0, 8.0]]
    rule = TrimmedMean(trim_fraction=0.2, **NO_CAPS)
    np.testing.assert_allclose(rule.combine(batch(params), [0.0, 0.0]), [2.0, 4.0])


def test_median_by_hand() -> None:
    # Weights 1, 1, 1, 1, 5 (total 9, half 4.5). x sorted: -9, 1, 2 (cumulative 3), then 3
    # with weight 5 (cumulative 8 > 4.5) → 3. y sorted: 0, 0, 0 (3), 4 (4), 8 (9) → 8.
    # Unweighted, x is the middle of [-9, 1, 2, 3, 50] → 2 and y of [0, 0, 0, 4, 8] → 0.
    params = [[1.0, 0.0], [2.0, 0.0], [-9.0, 4.0], [50.0, 0.0], [3.0, 8.0]]
    weighted = batch(params, samples=[1, 1, 1, 1, 5])
    np.testing.assert_allclose(CoordinateMedian(**NO_CAPS).combine(weighted, [0, 0]), [3.0, 8.0])
    np.testing.assert_allclose(CoordinateMedian(**NO_CAPS).combine(batch(params), [0, 0]), [2, 0])


def test_median_of_even_count_averages_the_middle_pair() -> None:
    updates = batch([[1.0], [2.0], [10.0], [4.0]])
    np.testing.assert_allclose(CoordinateMedian(**NO_CAPS).combine(updates, [0.0]), [3.0])


@pytest.mark.parametrize("seed", range(6))
def test_trimmed_mean_and_median_match_sorted_list_oracles(seed: int) -> None:
    updates, reference = random_batch(seed, m=11)
    trim = TrimmedMean(trim_fraction=0.2, max_samples=100, max_update_norm=0.0)
    median = CoordinateMedian(max_samples=100, max_update_norm=0.0)
    weights = trim.weights(updates).tolist()
    expected_trim = [py_trimmed_mean(c, weights, 0.2) for c in columns(updates, reference)]
    expected_median = [py_weighted_median(c, weights) for c in columns(updates, reference)]
    np.testing.assert_allclose(trim.combine(updates, reference) - reference, expected_trim)
    np.testing.assert_allclose(median.combine(updates, reference) - reference, expected_median)


@pytest.mark.parametrize("name", ["trimmed_mean", "median", "geometric_median"])
@pytest.mark.parametrize("seed", range(5))
def test_robust_result_stays_within_the_per_coordinate_range(name: str, seed: int) -> None:
    updates, reference = random_batch(seed)
    result = make_rule(name, max_update_norm=0.0).combine(updates, reference)
    assert np.all(result >= updates.params.min(axis=0) - 1e-12)
    assert np.all(result <= updates.params.max(axis=0) + 1e-12)


# --- clipping and geometric median ----------------------------------------------------------


def test_clipped_fedavg_by_hand() -> None:
    # deltas (1, 0), (0, 1), (0, 10): median norm 1, bound 2 → third becomes (0, 2);
    # equal weights: ((1 + 0 + 0)/3, (0 + 1 + 2)/3)
    updates = batch([[1.0, 0.0], [0.0, 1.0], [0.0, 10.0]])
    rule = ClippedFedAvg(clip_multiple=2.0, **NO_CAPS)
    np.testing.assert_allclose(rule.combine(updates, [0.0, 0.0]), [1 / 3, 1.0])


@pytest.mark.parametrize("seed", range(5))
def test_clipped_result_is_within_the_bound_of_the_reference(seed: int) -> None:
    updates, reference = random_batch(seed)
    updates = Updates(updates.params * [[1.0]] * 30, updates.samples, updates.staleness)
    norms = sorted(float(np.sqrt(np.sum((p - reference) ** 2))) for p in updates.params)
    median_norm = norms[len(norms) // 2]  # m = 9: the middle one
    result = ClippedFedAvg(clip_multiple=1.5, max_update_norm=0.0).combine(updates, reference)
    assert np.linalg.norm(result - reference) <= 1.5 * median_norm + 1e-9
    capped = ClippedFedAvg(clip_multiple=1.5, max_update_norm=0.5).combine(updates, reference)
    assert np.linalg.norm(capped - reference) <= 0.5 + 1e-9


def test_geometric_median_of_a_triangle_is_its_centre() -> None:
    # The Fermat point of an equilateral triangle is its centroid.
    h = math.sqrt(3) / 2
    updates = batch([[0.0, 0.0], [1.0, 0.0], [0.5, h]])
    result = GeometricMedian(iterations=50, **NO_CAPS).combine(updates, [0.0, 0.0])
    np.testing.assert_allclose(result, [0.5, h / 3], atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_geometric_median_lowers_the_sum_of_distances(seed: int) -> None:
    updates, reference = random_batch(seed, m=7, d=3)
    rule = GeometricMedian(iterations=50, max_update_norm=0.0)
    weights = rule.weights(updates).tolist()
    points = updates.params.tolist()

    def cost(z) -> float:  # Σ wᵢ·‖pᵢ - z‖ in plain Python
        return sum(
            w * math.sqrt(sum((a - b) ** 2 for a, b in zip(p, z, strict=True)))
            for p, w in zip(points, weights, strict=True)
        )

    best = rule.combine(updates, reference).tolist()
    candidates = [*points, np.average(updates.params, axis=0, weights=weights).tolist()]
    rng = np.random.default_rng(seed)
    candidates += [(np.array(best) + 1e-3 * rng.normal(size=3)).tolist() for _ in range(20)]
    assert all(cost(best) <= cost(c) + 1e-9 for c in candidates)


# --- properties of every rule ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("bucket_size", [1, 3])
def test_rules_do_not_depend_on_the_order_of_updates(name: str, seed: int, bucket_size) -> None:
    updates, reference = random_batch(seed)
    order = np.random.default_rng(seed).permutation(updates.count)
    shuffled = Updates(updates.params[order], updates.samples[order], updates.staleness[order])
    rule = make_rule(name, bucket_size=bucket_size)
    np.testing.assert_allclose(rule.combine(shuffled, reference), rule.combine(updates, reference))


# --- bucketing ------------------------------------------------------------------------------


@pytest.mark.parametrize("bucket_size", [2, 3, 7])
def test_bucketing_leaves_fedavg_unchanged(bucket_size: int) -> None:
    # A weighted mean of bucket means weighted by the buckets' summed weights is the mean.
    updates, reference = random_batch(4)
    weights = np.minimum(updates.samples, 100) * (1.0 + updates.staleness) ** -0.5
    deltas = updates.params - reference
    expected = reference + weights @ deltas / weights.sum()
    result = make_rule("fedavg", bucket_size=bucket_size, max_update_norm=0.0)
    np.testing.assert_allclose(result.combine(updates, reference), expected, rtol=1e-12)


def test_bucketed_median_is_the_median_of_pair_means() -> None:
    # Six one-coordinate updates, buckets of two: the result is the median of three bucket
    # means, each the mean of a disjoint pair of the updates.
    values = [0.0, 1.0, 2.0, 10.0, 11.0, 40.0]
    updates = batch([[v] for v in values], samples=[10] * 6)
    result = make_rule("median", bucket_size=2, max_update_norm=0.0).combine(updates, [0.0])[0]
    medians = set()
    for pairing in _pairings(list(range(6))):
        means = sorted((values[a] + values[b]) / 2 for a, b in pairing)
        medians.add(means[1])
    assert result in medians
    assert result != np.median(values)  # 6.0, which no pairing's median is


def _pairings(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for k, other in enumerate(rest):
        for tail in _pairings(rest[:k] + rest[k + 1 :]):
            yield [(first, other), *tail]


def test_bucketing_lets_a_robust_rule_keep_rare_informative_updates() -> None:
    # 3 of 12 devices saw an anomaly and moved far along the first coordinate; the others
    # only jitter. A plain median drops what the three learned; in buckets of four nearly
    # every bucket mean carries a share of it.
    rng = np.random.default_rng(0)
    params = rng.normal(0.0, 0.01, (12, 3))
    params[[1, 5, 9], 0] += 4.0
    updates = batch(params.tolist(), samples=[50] * 12)
    plain = make_rule("median", max_update_norm=0.0).combine(updates, np.zeros(3))
    bucketed = make_rule("median", bucket_size=4, max_update_norm=0.0).combine(updates, np.zeros(3))
    assert abs(plain[0]) < 0.05
    # Three buckets hold k1 + k2 + k3 = 3 of the movers, so the median bucket mean is about 1.0
    # (one mover in it: 4.0 / 4) unless all three share a bucket (about 0.0); jitter is below
    # 0.01 per coordinate. This batch's seeded shuffle does not put the movers together.
    assert abs(bucketed[0] - 1.0) < 0.02


@pytest.mark.parametrize("name", sorted(RULES))
def test_identical_updates_give_that_update(name: str) -> None:
    updates = batch([[1.0, -2.0]] * 5, samples=[1, 5, 9, 50, 2e9])
    np.testing.assert_allclose(make_rule(name).combine(updates, [0.5, -1.0]), [1.0, -2.0])


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_respects_the_update_norm_cap(name: str) -> None:
    updates, reference = random_batch(7)
    updates = Updates(reference + 100 * (updates.params - reference), updates.samples)
    result = make_rule(name, max_update_norm=2.0).combine(updates, reference)
    assert np.linalg.norm(result - reference) <= 2.0 + 1e-9


# --- attacks --------------------------------------------------------------------------------


def attacked_batch(seed: int) -> tuple[Updates, np.ndarray, np.ndarray]:
    """20 honest updates around reference + true delta, 5 attackers sending ×-20 their delta
    and claiming 2e9 samples. Returns (updates, reference, honest FedAvg result)."""
    rng = np.random.default_rng(seed)
    d = 10
    reference = rng.normal(size=d)
    true_delta = np.full(d, 0.3)
    honest = reference + true_delta + 0.1 * rng.normal(size=(20, d))
    honest_samples = rng.integers(30, 100, size=20)
    honest_mean = (honest_samples[:, None] * honest).sum(axis=0) / honest_samples.sum()
    own = reference + true_delta + 0.1 * rng.normal(size=(5, d))
    attackers = reference - 20.0 * (own - reference)
    params = np.vstack([honest, attackers])
    samples = np.concatenate([honest_samples, np.full(5, 2e9)])
    return Updates(params, samples), reference, honest_mean


@pytest.mark.parametrize("seed", range(5))
def test_a_trimmed_mean_shrugs_off_20_percent_attackers(seed: int) -> None:
    updates, reference, honest_mean = attacked_batch(seed)
    honest_step = np.linalg.norm(honest_mean - reference)  # ≈ 0.95
    trimmed = TrimmedMean(trim_fraction=0.3).combine(updates, reference)
    plain = FedAvg(max_samples=2**62, max_update_norm=0.0).combine(updates, reference)
    assert np.linalg.norm(trimmed - honest_mean) < 0.25 * honest_step
    assert np.linalg.norm(plain - honest_mean) > 15 * honest_step


@pytest.mark.parametrize("name", ["trimmed_mean", "median", "geometric_median"])
def test_high_breakdown_rules_shrug_off_the_attack(name: str) -> None:
    updates, reference, honest_mean = attacked_batch(11)
    honest_step = np.linalg.norm(honest_mean - reference)
    result = make_rule(name).combine(updates, reference)
    assert np.linalg.norm(result - honest_mean) < 0.3 * honest_step


def test_caps_alone_bound_the_damage_of_fedavg() -> None:
    updates, reference, honest_mean = attacked_batch(3)
    capped = FedAvg(max_samples=100, max_update_norm=10.0).combine(updates, reference)
    uncapped = FedAvg(max_samples=2**62, max_update_norm=0.0).combine(updates, reference)
    assert np.linalg.norm(capped - reference) <= 10.0
    assert np.linalg.norm(capped - honest_mean) < np.linalg.norm(uncapped - honest_mean) / 2


# --- server momentum ------------------------------------------------------------------------


def test_momentum_off_is_the_rule_result() -> None:
    reference, combined = np.array([1.0, 1.0]), np.array([2.0, 0.0])
    new, velocity = ServerMomentum().step(reference, combined, None)
    np.testing.assert_allclose(new, combined)
    np.testing.assert_allclose(velocity, [1.0, -1.0])


def test_momentum_by_hand() -> None:
    # β = 0.5, lr 0.1: v1 = Δ1 = (1, 0) → x1 = (0.1, 0); Δ2 = (0, 2): v2 = (0.5, 2) →
    # x2 = x1 + 0.1·v2 = (0.15, 0.2)
    momentum = ServerMomentum(beta=0.5, server_lr=0.1)
    x1, v1 = momentum.step(np.zeros(2), np.array([1.0, 0.0]), None)
    np.testing.assert_allclose(x1, [0.1, 0.0])
    x2, v2 = momentum.step(x1, x1 + np.array([0.0, 2.0]), v1)
    np.testing.assert_allclose(v2, [0.5, 2.0])
    np.testing.assert_allclose(x2, [0.15, 0.2])


def test_momentum_with_lr_one_minus_beta_keeps_the_long_run_step() -> None:
    # A steady Δ each version: v → Δ/(1 - β), so the step server_lr·v → Δ.
    momentum, x, v = ServerMomentum(beta=0.9, server_lr=0.1), np.zeros(2), None
    assert momentum.server_lr == pytest.approx(1 - momentum.beta)
    for _ in range(300):
        previous = x
        x, v = momentum.step(x, x + np.array([1.0, -2.0]), v)
    np.testing.assert_allclose(x - previous, [1.0, -2.0], rtol=1e-9)


@pytest.mark.parametrize("options", [{"beta": 1.0}, {"beta": -0.1}, {"server_lr": 0.0}])
def test_momentum_refuses_bad_options(options: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        ServerMomentum(**options)


def test_momentum_refuses_a_velocity_of_another_size() -> None:
    with pytest.raises(ValueError, match="velocity"):
        ServerMomentum(beta=0.5).step(np.zeros(2), np.ones(2), np.zeros(3))


def test_module_imports_only_numpy_and_the_standard_library() -> None:
    # It must run in the PyFlink environment (older numpy, nothing else installed).
    tree = ast.parse(Path(agg.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported - set(sys.stdlib_module_names) - {"__future__"} == {"numpy"}
