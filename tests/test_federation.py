"""streaming.federation: when rounds close, how updates merge and combine, version numbering
and calibration, against sums and brute-force F1 computed here."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef

from streaming.federation import Federation, FederationConfig
from streaming.learner import LocalRound
from streaming.model.detectors import LOGIT_EDGES, NORMAL_EDGES, Network, NormalStats
from streaming.model.features import N_FEATURES, N_POOLED
from streaming.model.metrics import Confusion

HIDDEN = 2
SIZE = Network(N_POOLED, HIDDEN).size
MINUTE = 60_000


def fed_config(**overrides) -> FederationConfig:
    base = {
        "min_devices": 20,
        "round_window_ms": MINUTE,
        "active_window_ms": 5 * MINUTE,
        "rule": "fedavg",
        "rule_options": (("max_update_norm", 0.0), ("staleness_alpha", 0.5)),
        "max_samples": 100,
        "server_momentum": 0.0,
        "calibration_decay": 0.9,
        "normal_decay": 0.9,
        "contamination": 0.05,
        "hidden": HIDDEN,
    }
    base.update(overrides)
    return FederationConfig(**base)


def update(
    device: str,
    ts: int,
    *,
    base: int = 0,
    params: np.ndarray | None = None,
    samples: int = 50,
    seed: int = 0,
    scored_version: int = 0,
    rows: np.ndarray | None = None,
    hist_pos: np.ndarray | None = None,
    hist_neg: np.ndarray | None = None,
    prequential: Confusion | None = None,
    label_source: str = "ground_truth",
) -> LocalRound:
    rng = np.random.default_rng(seed)
    if params is None:
        params = rng.normal(size=SIZE)
    if rows is None:
        rows = rng.uniform(0, 4, size=(10, N_FEATURES))
    return LocalRound(
        device_id=device,
        round=1,
        base_version=base,
        params=np.asarray(params, dtype=np.float64),
        samples=samples,
        label_source=label_source,
        loss=0.5,
        accuracy=0.9,
        normal=NormalStats.of(rows),
        hist_pos=np.zeros(LOGIT_EDGES.size + 1) if hist_pos is None else hist_pos,
        hist_neg=np.zeros(LOGIT_EDGES.size + 1) if hist_neg is None else hist_neg,
        hist_normal=np.zeros(NORMAL_EDGES.size + 1),
        scored_version=scored_version,
        prequential=prequential or Confusion(0, 0, 0, 0),
        timestamp_ms=ts,
    )


def devices(n: int) -> list[str]:
    return [f"device_{i:02d}" for i in range(n)]


def first_round(fed: Federation, ids: list[str], ts: int = 0):
    """A first version from every device (added in one go, then closed)."""
    for i, d in enumerate(ids):
        fed.add(update(d, ts, seed=i))
    return fed.close(ts)


# --------------------------------------------------------------------------------------------
# When a round closes
# --------------------------------------------------------------------------------------------


def test_a_fleet_smaller_than_min_devices_gets_a_version_once_all_have_sent():
    fed = Federation(fed_config(min_devices=20))
    ids = devices(5)
    assert first_round(fed, ids).model.version == 1
    t = 10_000
    for i, d in enumerate(ids[:-1]):
        fed.add(update(d, t, base=1, seed=10 + i))
        assert not fed.due(t), f"due after {i + 1} of 5 devices"
    fed.add(update(ids[-1], t, base=1, seed=20))
    assert fed.due(t)
    version = fed.close(t)
    assert version.model.version == 2
    assert version.num_devices == 5


def test_min_devices_below_the_fleet_size_closes_at_min_devices():
    fed = Federation(fed_config(min_devices=3))
    ids = devices(6)
    first_round(fed, ids)
    for i, d in enumerate(ids[:2]):
        fed.add(update(d, 1000, base=1, seed=i))
        assert not fed.due(1000)
    fed.add(update(ids[2], 1000, base=1, seed=9))
    assert fed.due(1000)


def test_a_one_device_fleet_gets_a_version_per_update():
    fed = Federation(fed_config(min_devices=20))
    for k in range(1, 5):
        fed.add(update("solo", k * 1000, base=k - 1, seed=k))
        assert fed.due(k * 1000)
        assert fed.close(k * 1000).model.version == k
    assert fed.version == 4


def test_the_time_window_closes_a_round_when_a_device_is_silent():
    cfg = fed_config(min_devices=20, round_window_ms=MINUTE, active_window_ms=5 * MINUTE)
    fed = Federation(cfg)
    ids = devices(3)
    first_round(fed, ids, ts=0)
    t0 = 1000
    fed.add(update(ids[0], t0, base=1, seed=1))
    fed.add(update(ids[1], t0 + 500, base=1, seed=2))
    assert not fed.due(t0 + MINUTE - 1)  # the third is still active: wait for it ...
    assert fed.due(t0 + MINUTE)  # ... but not longer than the round window
    version = fed.close(t0 + MINUTE)
    assert version.num_devices == 2 and version.model.version == 2


def test_a_device_silent_beyond_the_active_window_is_not_waited_for():
    cfg = fed_config(min_devices=20, round_window_ms=10 * MINUTE, active_window_ms=5 * MINUTE)
    fed = Federation(cfg)
    ids = devices(3)
    first_round(fed, ids, ts=0)
    t = 6 * MINUTE  # all three were last seen at 0: none active any more
    fed.add(update(ids[0], t, base=1, seed=1))
    assert fed.active_devices(t) == 1
    assert fed.due(t)


def test_empty_buffer_is_never_due_and_cannot_close():
    fed = Federation(fed_config())
    assert not fed.due(10**12)
    with pytest.raises(ValueError):
        fed.close(0)


# --------------------------------------------------------------------------------------------
# What a version holds
# --------------------------------------------------------------------------------------------


def test_versions_are_numbered_without_gaps():
    fed = Federation(fed_config(min_devices=2))
    ids = devices(2)
    numbers = []
    for k in range(6):
        for i, d in enumerate(ids):
            fed.add(update(d, k * 1000, base=fed.version, seed=10 * k + i))
        assert fed.due(k * 1000)
        numbers.append(fed.close(k * 1000).model.version)
        assert fed.version == numbers[-1]
    assert numbers == [1, 2, 3, 4, 5, 6]


def test_fedavg_is_the_sample_weighted_mean_of_the_updates():
    fed = Federation(fed_config(min_devices=3, server_momentum=0.0))
    rng = np.random.default_rng(1)
    params = rng.normal(size=(3, SIZE))
    samples = [10, 35, 80]  # all below max_samples (100): no cap
    for i, d in enumerate(devices(3)):
        fed.add(update(d, 0, params=params[i], samples=samples[i]))
    version = fed.close(0)
    expected = (params * np.array(samples)[:, None]).sum(0) / sum(samples)
    np.testing.assert_allclose(version.model.params, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(version.weights, samples)
    # Second version: base_version = 1 for everyone, so staleness 0 again.
    params2 = rng.normal(size=(3, SIZE))
    for i, d in enumerate(devices(3)):
        fed.add(update(d, 1000, base=1, params=params2[i], samples=samples[::-1][i]))
    version = fed.close(1000)
    w = np.array(samples[::-1], dtype=float)
    np.testing.assert_allclose(
        version.model.params, (params2 * w[:, None]).sum(0) / w.sum(), rtol=1e-10, atol=1e-12
    )


def test_sample_counts_are_capped_at_max_samples():
    fed = Federation(fed_config(min_devices=2, max_samples=100))
    rng = np.random.default_rng(2)
    params = rng.normal(size=(2, SIZE))
    fed.add(update("a", 0, params=params[0], samples=1000))
    fed.add(update("b", 0, params=params[1], samples=100))
    version = fed.close(0)
    np.testing.assert_allclose(version.model.params, params.mean(0), rtol=1e-10, atol=1e-12)


def test_two_updates_of_one_device_are_merged_and_count_once():
    fed = Federation(fed_config(min_devices=20))
    start = first_round(fed, devices(3)).model.params
    rng = np.random.default_rng(3)
    pa1, pa2, pb = rng.normal(size=(3, SIZE))
    rows_a1 = rng.uniform(0, 2, size=(12, N_FEATURES))
    rows_a2 = rng.uniform(1, 3, size=(7, N_FEATURES))
    hist = np.zeros(LOGIT_EDGES.size + 1)
    hist[40] = 3
    fed.add(
        update(
            "device_00",
            100,
            base=1,
            params=pa1,
            samples=20,
            rows=rows_a1,
            hist_pos=hist,
            scored_version=1,
            prequential=Confusion(1, 2, 3, 4),
        )
    )
    fed.add(
        update(
            "device_00",
            200,
            base=1,
            params=pa2,
            samples=30,
            rows=rows_a2,
            hist_pos=hist,
            scored_version=1,
            prequential=Confusion(10, 0, 5, 1),
        )
    )
    fed.add(update("device_01", 300, base=1, params=pb, samples=50))
    assert len(fed.buffer) == 2
    assert not fed.due(300)  # device_02 is active and silent: two distinct devices of three
    version = fed.close(MINUTE + 100)
    assert version.num_devices == 2
    merged = {u.device_id: u for u in version.updates}["device_00"]
    assert merged.samples == 50
    np.testing.assert_allclose(merged.params, (20 * pa1 + 30 * pa2) / 50, rtol=1e-12)
    both = np.vstack((rows_a1, rows_a2))
    assert merged.normal.count == 19
    np.testing.assert_allclose(merged.normal.mean, both.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        merged.normal.comoment, np.cov(both, rowvar=False, ddof=0) * 19, rtol=1e-9, atol=1e-9
    )
    np.testing.assert_array_equal(merged.hist_pos, 2 * hist)
    assert merged.prequential == Confusion(11, 2, 8, 5)
    assert version.prequential == {1: Confusion(11, 2, 8, 5)}
    proposed = ((20 * pa1 + 30 * pa2) / 50 * 50 + pb * 50) / 100
    expected = start + 2 / 3 * (proposed - start)  # two of the fleet's three devices
    np.testing.assert_allclose(version.model.params, expected, rtol=1e-10, atol=1e-12)


def test_an_update_from_a_future_version_is_refused():
    fed = Federation(fed_config(min_devices=1))
    with pytest.raises(ValueError):
        fed.add(update("a", 0, base=1))
    fed.add(update("a", 0, base=0))
    fed.close(0)
    with pytest.raises(ValueError):
        fed.add(update("a", 1000, base=2))
    fed.add(update("a", 1000, base=1))  # the latest is fine
    with pytest.raises(ValueError):
        fed.add(update("b", 1000, params=np.zeros(SIZE + 1)))  # another network's shape


def brute_force_mcc_threshold(pos: np.ndarray, neg: np.ndarray) -> float:
    edges = LOGIT_EDGES
    reps = np.concatenate(([edges[0] - 1], (edges[:-1] + edges[1:]) / 2, [edges[-1] + 1]))
    pos, neg = pos.astype(int), neg.astype(int)
    scores = np.concatenate((np.repeat(reps, pos), np.repeat(reps, neg)))
    truth = np.concatenate((np.ones(pos.sum()), np.zeros(neg.sum())))
    best, best_mcc = None, -2.0
    for t in edges:
        mcc = matthews_corrcoef(truth, scores >= t)
        if mcc >= best_mcc - 1e-12:
            best, best_mcc = float(t), mcc
    return best


def test_the_first_version_threshold_is_the_best_mcc_of_the_summed_histograms():
    fed = Federation(fed_config(min_devices=4))
    rng = np.random.default_rng(4)
    bins = LOGIT_EDGES.size + 1
    pos_sum = np.zeros(bins)
    neg_sum = np.zeros(bins)
    for i, d in enumerate(devices(4)):
        pos = np.bincount(np.clip(rng.normal(55, 6, 15).astype(int), 0, bins - 1), minlength=bins)
        neg = np.bincount(np.clip(rng.normal(40, 8, 300).astype(int), 0, bins - 1), minlength=bins)
        pos_sum += pos
        neg_sum += neg
        fed.add(update(d, 0, seed=i, hist_pos=pos.astype(float), hist_neg=neg.astype(float)))
    version = fed.close(0)
    assert version.model.threshold == brute_force_mcc_threshold(pos_sum, neg_sum)
    # No positives anywhere: no supervised threshold.
    fed = Federation(fed_config(min_devices=1))
    fed.add(update("a", 0, hist_neg=neg_sum))
    assert fed.close(0).model.threshold is None


def test_the_label_free_threshold_is_mcc_best_on_labelled_scores_else_the_contamination_quantile():
    bins = NORMAL_EDGES.size + 1
    rng = np.random.default_rng(8)
    pos = np.bincount(np.clip(rng.normal(45, 5, 40).astype(int), 0, bins - 1), minlength=bins)
    neg = np.bincount(np.clip(rng.normal(30, 6, 500).astype(int), 0, bins - 1), minlength=bins)
    everything = pos + neg
    labelled = replace(
        update("a", 0),
        hist_normal=everything.astype(float),
        hist_normal_pos=pos.astype(float),
        hist_normal_neg=neg.astype(float),
    )
    fed = Federation(fed_config(min_devices=1))
    fed.add(labelled)
    reps = np.concatenate(
        ([NORMAL_EDGES[0] - 1], (NORMAL_EDGES[:-1] + NORMAL_EDGES[1:]) / 2, [NORMAL_EDGES[-1] + 1])
    )
    scores = np.concatenate((np.repeat(reps, pos), np.repeat(reps, neg)))
    truth = np.concatenate((np.ones(pos.sum()), np.zeros(neg.sum())))
    mccs = [matthews_corrcoef(truth, scores >= t) for t in NORMAL_EDGES]
    best = max(range(len(mccs)), key=lambda k: (round(mccs[k], 12), k))
    assert fed.close(0).model.normal_threshold == NORMAL_EDGES[best]
    # No label anywhere: the score that flags at most `contamination` (5 %) of all readings.
    fed = Federation(fed_config(min_devices=1))
    fed.add(replace(update("a", 0), hist_normal=everything.astype(float)))
    threshold = fed.close(0).model.normal_threshold
    flagged = np.mean(scores >= threshold)
    below = NORMAL_EDGES[np.searchsorted(NORMAL_EDGES, threshold) - 1]
    assert flagged <= 0.05 < np.mean(scores >= below)


def test_the_normal_model_is_the_sum_of_the_devices_statistics():
    fed = Federation(fed_config(min_devices=3))
    rng = np.random.default_rng(5)
    rows = [rng.normal(i, 1 + i, size=(8 + 3 * i, N_FEATURES)) for i in range(3)]
    for i, d in enumerate(devices(3)):
        fed.add(update(d, 0, seed=i, rows=rows[i]))
    normal = fed.close(0).model.normal
    everything = np.vstack(rows)
    assert normal.count == everything.shape[0]
    np.testing.assert_allclose(normal.mean, everything.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        normal.comoment,
        np.cov(everything, rowvar=False, ddof=0) * everything.shape[0],
        rtol=1e-9,
        atol=1e-9,
    )


def test_server_momentum_accumulates_the_deltas():
    beta = 0.5
    fed = Federation(fed_config(min_devices=1, server_momentum=beta))
    reference = Network(N_POOLED, HIDDEN).initial()
    p1 = reference + 1.0
    fed.add(update("a", 0, params=p1))
    v1 = fed.close(0).model.params
    np.testing.assert_allclose(v1, p1)  # first step: velocity = delta
    p2 = v1 + 2.0
    fed.add(update("a", 1000, base=1, params=p2))
    v2 = fed.close(1000).model.params
    np.testing.assert_allclose(v2, v1 + beta * 1.0 + 2.0)


def test_config_validation():
    for bad in (
        {"min_devices": 0},
        {"contamination": 0.0},
        {"contamination": 0.5},
        {"server_momentum": 1.0},
        {"calibration_decay": -0.1},
    ):
        with pytest.raises(ValueError):
            fed_config(**bad)
    with pytest.raises(ValueError):
        fed_config(rule="nonsense").make_rule()


def test_a_version_from_part_of_the_fleet_takes_that_share_of_the_step():
    # Four devices known; later one sends alone: FedAvg proposes its parameters, and the
    # version moves a quarter of the way there from the previous one (min_devices 20 > 4).
    fed = Federation(fed_config(min_devices=20, round_window_ms=MINUTE))
    ids = devices(4)
    first = first_round(fed, ids, ts=0).model.params
    alone = np.full(SIZE, 3.0)
    fed.add(update(ids[0], 2 * MINUTE, base=1, params=alone))
    assert fed.due(2 * MINUTE + MINUTE)
    version = fed.close(3 * MINUTE)
    np.testing.assert_allclose(version.model.params, first + 0.25 * (alone - first), rtol=1e-12)
    # Once the others are forgotten (beyond fleet_memory_ms) the lone device is the fleet.
    fed = Federation(fed_config(min_devices=20, fleet_memory_ms=MINUTE))
    first = first_round(fed, ids, ts=0).model.params
    fed.add(update(ids[0], 2 * MINUTE, base=1, params=alone))
    np.testing.assert_allclose(fed.close(2 * MINUTE).model.params, alone, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# The discriminant and the detector choice
# --------------------------------------------------------------------------------------------


def own_fisher(normal: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Fisher's discriminant by hand from the rows: pooled covariance (n0 + n1 - 2), shrunk 5 %
    towards its diagonal, direction scaled to unit within-class spread; (w, b, D)."""
    m0, m1 = normal.mean(0), anomalous.mean(0)
    scatter = (normal - m0).T @ (normal - m0) + (anomalous - m1).T @ (anomalous - m1)
    cov = scatter / (len(normal) + len(anomalous) - 2)
    cov = 0.95 * cov + 0.05 * np.diag(np.diag(cov))
    w = np.linalg.solve(cov, m1 - m0)
    distance = np.sqrt((m1 - m0) @ w)
    w = w / distance
    return w, -0.5 * (m0 + m1) @ w, distance


def test_the_discriminant_is_that_of_all_rows_pooled_whatever_the_grouping():
    rng = np.random.default_rng(21)
    normal = [rng.normal(0, 1, (40, N_FEATURES)) for _ in range(4)]
    anomalous = [rng.normal(1.5, 1.2, (6, N_FEATURES)) for _ in range(4)]
    # Rows only the z-score rule called normal: the label-free model's, not the discriminant's.
    pseudo = [rng.normal(3.0, 2.0, (20, N_FEATURES)) for _ in range(4)]
    w, b, distance = own_fisher(np.vstack(normal), np.vstack(anomalous))

    def stats_update(i: int, ts: int) -> LocalRound:
        return replace(
            update(f"d{i}", ts, seed=i, rows=normal[i]),
            anomalous=NormalStats.of(anomalous[i]),
            pseudo_normal=NormalStats.of(pseudo[i]),
        )

    together = Federation(fed_config(min_devices=4, normal_decay=1.0))
    for i in range(4):
        together.add(stats_update(i, 0))
    model = together.close(0).model
    np.testing.assert_allclose(model.discriminant, np.r_[w, b], rtol=1e-9, atol=1e-12)
    every_normal_row = np.vstack(normal + pseudo)
    assert model.normal.count == every_normal_row.shape[0]
    np.testing.assert_allclose(model.normal.mean, every_normal_row.mean(0), rtol=1e-9)
    # No score histogram yet: the Bayes boundary with the classes' shares as priors.
    assert model.discriminant_threshold == pytest.approx(np.log(160 / 24) / distance)
    # One device per version, in another order: the same discriminant (sums are exact).
    one_by_one = Federation(fed_config(min_devices=1, normal_decay=1.0))
    for i in (2, 0, 3, 1):
        one_by_one.add(stats_update(i, 0))
        last = one_by_one.close(0).model
    np.testing.assert_allclose(last.discriminant, model.discriminant, rtol=1e-9, atol=1e-12)


def test_a_fleet_without_labelled_anomalies_separates_the_rules_classes_until_it_has_some():
    rng = np.random.default_rng(24)
    bins = LOGIT_EDGES.size + 1
    labelled_normal = rng.normal(0, 1, (30, N_FEATURES))
    rule_normal = rng.normal(0.2, 1, (40, N_FEATURES))
    rule_flagged = rng.normal(2.0, 1.5, (8, N_FEATURES))
    w, b, _ = own_fisher(np.vstack((labelled_normal, rule_normal)), rule_flagged)
    fed = Federation(fed_config(min_devices=1, calibration_decay=1.0, normal_decay=1.0))
    fed.add(
        replace(
            update("a", 0, rows=labelled_normal),
            pseudo_normal=NormalStats.of(rule_normal),
            pseudo_anomalous=NormalStats.of(rule_flagged),
        )
    )
    first = fed.close(0).model
    assert first.discriminant_labels == "pseudo" and first.detector == "discriminant"
    np.testing.assert_allclose(first.discriminant, np.r_[w, b], rtol=1e-9, atol=1e-12)
    # Devices report its scores by the rule's labels; the threshold is their MCC-best edge.
    pos, neg = np.eye(bins)[50] * 5, np.eye(bins)[40] * 60 + np.eye(bins)[52] * 2
    again = update("a", 0, base=1, scored_version=1, rows=labelled_normal)
    fed.add(replace(again, hist_disc_pos=pos, hist_disc_neg=neg))
    second = fed.close(0).model
    assert second.discriminant_labels == "pseudo"
    assert second.discriminant_threshold == brute_force_mcc_threshold(pos, neg)
    # Labelled anomalies arrive: the stream's classes from now on; the scores counted by the
    # rule's labels are dropped, and a late round still scored by version 2 does not count.
    anomalous = rng.normal(1.5, 1, (6, N_FEATURES))
    fed.add(
        replace(update("b", 0, base=2, rows=labelled_normal), anomalous=NormalStats.of(anomalous))
    )
    third = fed.close(0).model
    assert third.discriminant_labels == "ground_truth"
    w, b, distance = own_fisher(np.vstack([labelled_normal] * 3), anomalous)
    np.testing.assert_allclose(third.discriminant, np.r_[w, b], rtol=1e-9, atol=1e-12)
    assert fed.state.hist_disc_pos.sum() == fed.state.hist_disc_neg.sum() == 0
    assert third.discriminant_threshold == pytest.approx(np.log(90 / 6) / distance)
    late = update("a", 0, base=2, scored_version=2, rows=labelled_normal)
    fed.add(replace(late, hist_disc_pos=pos, hist_disc_neg=neg))
    fourth = fed.close(0).model
    assert fed.state.hist_disc_pos.sum() == fed.state.hist_disc_neg.sum() == 0
    _, _, distance = own_fisher(np.vstack([labelled_normal] * 4), anomalous)
    assert fourth.discriminant_threshold == pytest.approx(np.log(120 / 6) / distance)


@pytest.mark.parametrize(
    "discriminant, label_free, labels, common, expected",
    [
        (True, True, "ground_truth", False, "discriminant"),
        (True, True, "ground_truth", True, "discriminant"),
        (False, True, "ground_truth", False, "label_free"),
        # An unlabelled fleet: the Gaussian model while the rule flags few readings, the
        # discriminant of the rule's classes where it flags many; either when alone.
        (True, True, "pseudo", False, "label_free"),
        (True, True, "pseudo", True, "discriminant"),
        (True, False, "pseudo", False, "discriminant"),
        (False, True, "pseudo", True, "label_free"),
        (False, False, "pseudo", True, "zscore"),
    ],
)
def test_choose_detector(discriminant, label_free, labels, common, expected):
    from streaming.federation import choose_detector

    chosen = choose_detector(
        discriminant=discriminant,
        label_free=label_free,
        discriminant_labels=labels,
        anomalies_common=common,
    )
    assert chosen == expected


def test_an_unlabelled_fleet_counts_anomalies_common_beyond_five_times_the_contamination():
    rng = np.random.default_rng(25)
    bins = NORMAL_EDGES.size + 1

    def unlabelled_round(flagged: int) -> LocalRound:
        return replace(
            update("a", 0, rows=np.zeros((0, N_FEATURES))),
            pseudo_normal=NormalStats.of(rng.normal(0, 1, (100 - flagged, N_FEATURES))),
            pseudo_anomalous=NormalStats.of(rng.normal(2, 1, (flagged, N_FEATURES))),
            hist_normal=np.eye(bins)[20] * 100,
        )

    # contamination 0.02: common above 5 × 2 % = 10 % of the unlabelled rows flagged.
    for flagged, expected in ((10, "label_free"), (11, "discriminant")):
        fed = Federation(fed_config(min_devices=1, contamination=0.02))
        fed.add(unlabelled_round(flagged))
        model = fed.close(0).model
        # All 100 fresh label-free scores in bin 20: the edge above them flags none (<= 2 %).
        assert model.discriminant_labels == "pseudo"
        assert model.normal_threshold == NORMAL_EDGES[20]
        assert model.detector == expected, flagged


def test_the_discriminant_threshold_is_the_best_mcc_of_its_histograms():
    rng = np.random.default_rng(22)
    bins = LOGIT_EDGES.size + 1
    pos = np.bincount(np.clip(rng.normal(50, 5, 30).astype(int), 0, bins - 1), minlength=bins)
    neg = np.bincount(np.clip(rng.normal(38, 6, 400).astype(int), 0, bins - 1), minlength=bins)
    fed = Federation(fed_config(min_devices=1))
    first = replace(
        update("a", 0, rows=rng.normal(0, 1, (30, N_FEATURES))),
        anomalous=NormalStats.of(rng.normal(2, 1, (5, N_FEATURES))),
        hist_disc_pos=pos.astype(float),
        hist_disc_neg=neg.astype(float),
    )
    fed.add(first)
    assert fed.close(0).model.discriminant_threshold == brute_force_mcc_threshold(pos, neg)
    # Without anomalous rows anywhere there is no discriminant (and no threshold to use).
    fed = Federation(fed_config(min_devices=1))
    fed.add(update("a", 0))
    model = fed.close(0).model
    assert model.discriminant is None and model.discriminant_threshold is None


def test_the_choice_is_a_fixed_preference_not_the_labelled_counts():
    logit_bins, normal_bins = LOGIT_EDGES.size + 1, NORMAL_EDGES.size + 1
    # The network's scores split the labelled rows perfectly; the discriminant's are spread
    # almost alike over both classes (MCC < 0.01). Still the discriminant, once it has one.
    rng = np.random.default_rng(23)
    fed = Federation(fed_config(min_devices=1))
    fed.add(update("a", 0))
    fed.close(0)
    favours_the_network = replace(
        update(
            "a",
            0,
            base=1,
            scored_version=1,
            rows=rng.normal(0, 1, (30, N_FEATURES)),
            hist_pos=np.eye(logit_bins)[50] * 4,
            hist_neg=np.eye(logit_bins)[30] * 41,
        ),
        anomalous=NormalStats.of(rng.normal(2, 1, (5, N_FEATURES))),
        hist_normal=np.eye(normal_bins)[20] * 45,
        hist_disc_pos=np.eye(logit_bins)[40] * 2 + np.eye(logit_bins)[35] * 2,
        hist_disc_neg=np.eye(logit_bins)[40] * 20 + np.eye(logit_bins)[35] * 21,
    )
    fed.add(favours_the_network)
    model = fed.close(0).model
    assert model.threshold is not None and model.normal_threshold is not None
    assert model.discriminant is not None and model.discriminant_threshold is not None
    assert model.detector == "discriminant"
    # No anomalous statistics (so no discriminant), a normal model and its threshold: the
    # label-free model, though the network has a threshold too.
    fed = Federation(fed_config(min_devices=1))
    fed.add(
        replace(
            update("a", 0, hist_pos=np.eye(logit_bins)[50] * 4, hist_neg=np.eye(logit_bins)[30]),
            hist_normal=np.eye(normal_bins)[20] * 45,
        )
    )
    model = fed.close(0).model
    assert model.discriminant is None and model.discriminant_threshold is None
    assert model.threshold is not None and model.normal_threshold is not None
    assert model.detector == "label_free"
    # Nothing calibrated: the z-score rule; a supervised threshold alone does not change it.
    fed = Federation(fed_config(min_devices=1))
    fed.add(update("a", 0))
    model = fed.close(0).model
    assert (model.threshold, model.normal_threshold, model.discriminant) == (None, None, None)
    assert model.detector == "zscore"
    fed = Federation(fed_config(min_devices=1))
    fed.add(update("a", 0, hist_pos=np.eye(logit_bins)[50] * 4, hist_neg=np.eye(logit_bins)[30]))
    model = fed.close(0).model
    assert model.threshold is not None and model.normal_threshold is None
    assert model.detector == "zscore"


# --------------------------------------------------------------------------------------------
# Statistics a lying device sends
# --------------------------------------------------------------------------------------------


def test_statistics_no_bounded_features_can_give_are_refused():
    fed = Federation(fed_config(min_devices=2))
    rows = np.random.default_rng(1).uniform(-1, 1, size=(10, N_FEATURES))
    beyond_cap = rows.copy()
    beyond_cap[:, 3] = 10.5  # features are clipped to ±10
    too_spread = NormalStats.of(rows)
    too_spread = NormalStats(10.0, too_spread.mean, too_spread.comoment * 500.0)
    nan_mean = NormalStats(10.0, np.full(N_FEATURES, np.nan), np.eye(N_FEATURES))
    negative = update("a", 0)
    negative = replace(negative, hist_pos=negative.hist_pos - 1.0)
    for bad, reason in [
        (update("a", 0, rows=beyond_cap), "mean beyond"),
        (replace(update("a", 0), normal=too_spread), "spread beyond"),
        (replace(update("a", 0), anomalous=nan_mean), "not finite"),
        (negative, "non-negative"),
    ]:
        with pytest.raises(ValueError, match=reason):
            fed.add(bad)
    assert fed.buffer == {}  # nothing of a refused round stays
    fed.add(update("a", 0, rows=rows))  # the same device's honest round is taken
    assert list(fed.buffer) == ["a"]


def test_a_device_claiming_more_rows_than_a_round_holds_counts_for_one_round():
    fed = Federation(fed_config(min_devices=2, max_samples=100))
    rng = np.random.default_rng(4)
    honest_rows = rng.uniform(0, 1, size=(100, N_FEATURES))
    liar_rows = rng.uniform(2, 3, size=(10, N_FEATURES))
    liar_stats = NormalStats.of(liar_rows)
    inflated = NormalStats(2e9, liar_stats.mean, liar_stats.comoment * 2e8)
    hist = np.zeros(LOGIT_EDGES.size + 1)
    hist[5] = 4e9  # 4·10⁹ claimed scores: histograms are scaled to 2 · 100 readings
    fed.add(update("honest", 0, rows=honest_rows, samples=100))
    fed.add(replace(update("liar", 0), samples=2_000_000_000, normal=inflated, hist_neg=hist))
    model = fed.close(0).model
    # By hand: the liar's 2·10⁹ rows become 100 rows of the same mean.
    assert model.normal.count == pytest.approx(200.0)
    expected = (honest_rows.sum(0) + 100 * liar_rows.mean(0)) / 200
    np.testing.assert_allclose(model.normal.mean, expected, rtol=1e-9)
    assert fed.state.hist_neg[5] == pytest.approx(200.0)


def test_an_honest_round_is_taken_as_sent():
    fed = Federation(fed_config(min_devices=1, max_samples=100))
    rows = np.random.default_rng(6).uniform(-10, 10, size=(100, N_FEATURES))  # at the bounds
    sent = update("a", 0, rows=rows, samples=100)
    sent = replace(
        sent, hist_normal=np.full(NORMAL_EDGES.size + 1, 200.0 / (NORMAL_EDGES.size + 1))
    )
    fed.add(sent)
    assert fed.buffer["a"] is sent
