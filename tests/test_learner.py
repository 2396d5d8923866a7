"""streaming.learner: buffering, labels, local rounds, detector choice and prequential counts,
checked against numpy/scikit-learn computations made here from the Scored rows."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from streaming import learner as L
from streaming.learner import (
    ChannelMismatch,
    Detector,
    DeviceState,
    GlobalParams,
    LearnerConfig,
    is_held_out,
    readings_matrix,
    record,
    score,
    train_round,
)
from streaming.messages import single_reading
from streaming.model.detectors import INPUT_SCALE, LOGIT_EDGES, NORMAL_EDGES, Network, NormalStats
from streaming.model.features import N_FEATURES, N_POOLED, WARMUP
from streaming.model.metrics import Confusion

CHANNELS = ("humidity", "temperature")


def config(**overrides) -> LearnerConfig:
    base = {
        "train_every": 50,
        "min_round_samples": 10,
        "hidden": 0,
        "learning_rate": 0.1,
        "epochs": 2,
        "batch_size": 16,
        "positive_memory": 0,
        "detector": "auto",
        "anomaly_z": 2.5,
        "critical_z": 4.0,
        "gate": float("inf"),
        "holdout_fraction": 0.1,
        "seed": 7,
        "train_network": True,  # rounds run SGD whatever the detector (tested on its own below)
    }
    base.update(overrides)
    return LearnerConfig(**base)


def series(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2)) * [5.0, 0.3] + [60.0, 21.0]
    X[rng.random(n) < 0.08] += [30.0, 2.0]  # spikes
    return X


def scored_batch(cfg: LearnerConfig, n: int = 140, seed: int = 0):
    state = DeviceState()
    X = readings_matrix(state, CHANNELS, series(n, seed).tolist())
    return state, score(state, X, cfg)


def labels_for(n: int, seed: int = 1) -> np.ndarray:
    """Stream labels: 1/0 on two thirds of the rows, -1 (unlabelled) on the rest."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.1).astype(np.int64)
    labels[rng.random(n) < 1 / 3] = -1
    return labels


def rule_of(scored, cfg: LearnerConfig) -> np.ndarray:
    return (np.abs(scored.z).max(axis=1) > cfg.anomaly_z).astype(np.int64)


def sk_confusion(actual: np.ndarray, flagged: np.ndarray) -> Confusion:
    tn, fp, fn, tp = confusion_matrix(actual, flagged, labels=[0, 1]).ravel()
    return Confusion(int(tp), int(fp), int(tn), int(fn))


# --------------------------------------------------------------------------------------------
# readings_matrix
# --------------------------------------------------------------------------------------------


def test_readings_matrix_fixes_the_channels_then_refuses_others():
    state = DeviceState()
    X = readings_matrix(state, CHANNELS, [(1.0, 2.0), (3.0, 4.0), (5.0, 6.0)])
    np.testing.assert_array_equal(X, [[1, 2], [3, 4], [5, 6]])
    assert state.features.channels == CHANNELS
    np.testing.assert_array_equal(readings_matrix(state, CHANNELS, [(7.0, 8.0)]), [[7, 8]])
    for other in (("humidity",), ("humidity", "pressure"), ("temperature", "humidity")):
        with pytest.raises(ChannelMismatch):
            readings_matrix(state, other, [(1.0,) * len(other)])
    assert issubclass(ChannelMismatch, ValueError)
    assert state.features.channels == CHANNELS


def test_score_moves_the_state_past_the_batch():
    cfg = config()
    state = DeviceState()
    X = readings_matrix(state, CHANNELS, series(30).tolist())
    s1 = score(state, X[:12], cfg)
    assert state.features.seen == 12
    s2 = score(state, X[12:], cfg)
    assert state.features.seen == 30
    assert s1.warm.sum() == 12 - WARMUP and s2.warm.all()


# --------------------------------------------------------------------------------------------
# record
# --------------------------------------------------------------------------------------------


def test_record_buffers_warm_rows_with_stream_or_rule_labels():
    cfg = config()
    state, scored = scored_batch(cfg)
    labels = labels_for(140)
    record(state, scored, labels, Detector(None, cfg), cfg)
    warm = scored.warm
    assert warm.sum() == 140 - WARMUP
    assert state.buffered == warm.sum()
    np.testing.assert_array_equal(np.vstack(state.rows), scored.features[warm])
    rule = rule_of(scored, cfg)[warm]
    expected = np.where(labels[warm] >= 0, labels[warm], rule)
    np.testing.assert_array_equal(np.concatenate(state.labels), expected)
    assert int(np.concatenate(state.pseudo).sum()) == np.count_nonzero(labels[warm] < 0)
    assert rule.any() and (expected != labels[warm]).any()  # the rule did label something
    # Before any version: no histogram, no prequential counts.
    assert state.hist_pos.sum() == state.hist_neg.sum() == state.hist_normal.sum() == 0
    assert state.hist_disc_pos.sum() == state.hist_disc_neg.sum() == 0
    assert state.prequential == Confusion(0, 0, 0, 0)


def test_record_skips_a_cold_batch():
    cfg = config()
    state = DeviceState()
    X = readings_matrix(state, CHANNELS, series(WARMUP).tolist())
    scored = score(state, X, cfg)
    record(state, scored, np.zeros(WARMUP, np.int64), Detector(None, cfg), cfg)
    assert state.buffered == 0 and state.rows == []


def test_record_with_a_higher_anomaly_z_labels_fewer_rows():
    lo, hi = config(anomaly_z=2.0), config(anomaly_z=6.0)
    state_lo, scored = scored_batch(lo)
    state_hi = copy.deepcopy(state_lo)
    unlabelled = np.full(140, -1, dtype=np.int64)
    record(state_lo, scored, unlabelled, Detector(None, lo), lo)
    record(state_hi, scored, unlabelled, Detector(None, hi), hi)
    max_z = np.abs(scored.z).max(axis=1)[scored.warm]
    np.testing.assert_array_equal(np.concatenate(state_lo.labels), max_z > 2.0)
    np.testing.assert_array_equal(np.concatenate(state_hi.labels), max_z > 6.0)
    assert sum(p.sum() for p in state_lo.pseudo) == sum(p.sum() for p in state_hi.pseudo) == 130


# --------------------------------------------------------------------------------------------
# train_round
# --------------------------------------------------------------------------------------------


def buffered_state(cfg: LearnerConfig, n: int = 140, labels=None) -> tuple[DeviceState, tuple]:
    """A state with ``n`` recorded readings, and its warm rows: features, training labels
    (the rule's where unlabelled) and the stream's labels (-1: none)."""
    state, scored = scored_batch(cfg, n)
    labels = labels_for(n) if labels is None else labels
    record(state, scored, labels, Detector(None, cfg), cfg)
    rule = rule_of(scored, cfg)[scored.warm]
    y = np.where(labels[scored.warm] >= 0, labels[scored.warm], rule)
    return state, (scored.features[scored.warm], y, labels[scored.warm])


def assert_statistics_of(stats, rows: np.ndarray) -> None:
    """Count, mean and co-moment of ``rows``, computed here with numpy."""
    assert stats.count == rows.shape[0]
    if rows.shape[0]:
        np.testing.assert_allclose(stats.mean, rows.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(
            stats.comoment,
            np.cov(rows, rowvar=False, ddof=0) * rows.shape[0],
            rtol=1e-9,
            atol=1e-9,
        )


def test_train_round_takes_exactly_train_every_oldest_rows():
    cfg = config(train_every=50, min_round_samples=10)
    state, (X, y, truth) = buffered_state(cfg)  # 130 warm rows
    sizes = []
    taken = 0
    while (update := train_round(state, "dev-1", None, cfg, now_ms=1_000)) is not None:
        n = update.samples
        sizes.append(n)
        rows, labels = X[taken : taken + n], y[taken : taken + n]
        stream = truth[taken : taken + n]
        # The stream's normal rows in ``normal``, the rule's in ``pseudo_normal``; the round's
        # own labelled anomalies (none is replayed: positive_memory 0; pseudo-labels do not
        # count) in ``anomalous``.
        assert_statistics_of(update.normal, rows[(labels == 0) & (stream == 0)])
        assert_statistics_of(update.pseudo_normal, rows[(labels == 0) & (stream < 0)])
        assert_statistics_of(update.anomalous, rows[(labels == 1) & (stream == 1)])
        assert_statistics_of(update.pseudo_anomalous, rows[(labels == 1) & (stream < 0)])
        taken += n
        assert state.buffered == X.shape[0] - taken
        assert update.round == len(sizes) and update.timestamp_ms == 1_000
        assert update.device_id == "dev-1" and update.base_version == 0
    assert sizes == [50, 50, 30]  # the last: all that waits (>= min_round_samples)
    # The anomalous statistics were checked on some round, with pseudo-labels left out, and
    # both kinds of normal rows were there.
    assert ((y == 1) & (truth == 1)).any() and ((y == 1) & (truth < 0)).any()
    assert ((y == 0) & (truth == 0)).any() and ((y == 0) & (truth < 0)).any()
    assert state.rounds == 3


def test_train_round_below_min_round_samples_returns_none_and_keeps_the_buffer():
    cfg = config(train_every=50, min_round_samples=10)
    state, _ = buffered_state(cfg, n=WARMUP + 9)
    assert state.buffered == 9
    assert train_round(state, "dev", None, cfg, 0) is None
    assert state.buffered == 9 and state.rounds == 0
    assert not L.round_due(state, cfg)


def test_train_round_is_deterministic():
    cfg = config(hidden=4, epochs=3)
    state, _ = buffered_state(cfg)
    twin = copy.deepcopy(state)
    a = train_round(state, "dev", None, cfg, 5)
    b = train_round(twin, "dev", None, cfg, 5)
    np.testing.assert_array_equal(a.params, b.params)
    assert (a.loss, a.accuracy, a.samples) == (b.loss, b.accuracy, b.samples)


def global_model(cfg: LearnerConfig, params: np.ndarray, version: int = 3, **kw) -> GlobalParams:
    fields = {
        "version": version,
        "hidden": cfg.hidden,
        "params": params,
        "threshold": None,
        "normal": NormalStats.empty(),
        "normal_threshold": None,
        "label_source": "ground_truth",
        "detector": "zscore",
    }
    fields.update(kw)
    return GlobalParams(**fields)


def test_train_round_starts_from_the_global_params():
    cfg = config(hidden=4, epochs=0)  # no SGD step: the round returns its starting point
    net = Network(N_POOLED, 4)
    start = np.random.default_rng(3).normal(size=net.size)
    state, _ = buffered_state(cfg)
    update = train_round(state, "dev", global_model(cfg, start, version=3), cfg, 0)
    np.testing.assert_array_equal(update.params, start)
    assert update.base_version == 3
    # No global version (or one of another shape): the shared initial parameters, base 0.
    state, _ = buffered_state(cfg)
    update = train_round(state, "dev", None, cfg, 0)
    np.testing.assert_array_equal(update.params, net.initial())
    assert update.base_version == 0
    state, _ = buffered_state(cfg)
    other = global_model(cfg, np.zeros(N_POOLED + 1), hidden=0)
    update = train_round(state, "dev", other, cfg, 0)
    np.testing.assert_array_equal(update.params, net.initial())
    assert update.base_version == 0


def test_train_round_result_depends_on_the_global_params():
    cfg = config(hidden=0, epochs=2)
    net = Network(N_POOLED, 0)
    state, _ = buffered_state(cfg)
    twin = copy.deepcopy(state)
    a = train_round(state, "dev", global_model(cfg, np.zeros(net.size), version=1), cfg, 0)
    b = train_round(twin, "dev", global_model(cfg, np.full(net.size, 0.5), version=1), cfg, 0)
    assert not np.allclose(a.params, b.params)


@pytest.mark.parametrize(
    ("detector", "train_network", "trains"),
    [
        ("auto", False, False),
        ("discriminant", False, False),
        ("supervised", False, True),
        ("auto", True, True),
    ],
)
def test_rounds_train_the_network_only_where_it_is_used(detector, train_network, trains):
    """``auto`` never scores with the network, so by default its rounds send the network they
    started from, and its versions' scores of fresh readings do not calibrate it."""
    cfg = config(hidden=0, epochs=2, detector=detector, train_network=train_network)
    start = np.random.default_rng(4).normal(size=N_POOLED + 1)
    model = global_model(cfg, start, version=2)
    state, scored = scored_batch(cfg)
    labels = labels_for(140)
    labels[np.flatnonzero(labels >= 0)[::7]] = 1
    record(state, scored, labels, Detector(model, cfg), cfg)
    X = scored.features[scored.warm]
    rule = rule_of(scored, cfg)[scored.warm]
    y = np.where(labels[scored.warm] >= 0, labels[scored.warm], rule)
    calibrated = state.hist_pos.sum() + state.hist_neg.sum()
    update = train_round(state, "dev", model, cfg, 0)
    assert update.samples == 50
    assert calibrated == (np.count_nonzero(scored.warm) if trains else 0)
    if trains:
        assert np.abs(update.params - start).max() > 1e-3
    else:
        np.testing.assert_array_equal(update.params, start)
        # What the round reports is the network it sends, on the round's rows.
        logits = own_logits(start, X[:50])
        assert update.accuracy == np.mean((logits > 0) == (y[:50] == 1))


def test_label_source_majority_of_a_round():
    cfg = config()
    n = 140
    state, _ = buffered_state(cfg, n, labels=np.zeros(n, np.int64))
    assert train_round(state, "dev", None, cfg, 0).label_source == "ground_truth"
    state, _ = buffered_state(cfg, n, labels=np.full(n, -1, np.int64))
    assert train_round(state, "dev", None, cfg, 0).label_source == "pseudo"


def test_label_source_counts_the_rows_the_round_takes():
    cfg = config(train_every=50)
    labels = np.concatenate((np.zeros(WARMUP + 50, np.int64), np.full(50, -1, np.int64)))
    state, _ = buffered_state(cfg, n=labels.size, labels=labels)
    first = train_round(state, "dev", None, cfg, 0)  # the 50 labelled rows
    second = train_round(state, "dev", None, cfg, 0)  # the 50 unlabelled rows
    assert (first.label_source, second.label_source) == ("ground_truth", "pseudo")


def test_positive_memory_replays_remembered_anomalies():
    cfg = config(positive_memory=4)
    n = 140
    labels = np.zeros(n, np.int64)
    labels[[20, 30, 40, 50, 60, 70]] = 1  # all in the first round's 50 rows (rows 10..59)
    state, (X, _, _) = buffered_state(cfg, n, labels=labels)
    train_round(state, "dev", None, cfg, 0)
    positives = X[[i - WARMUP for i in (20, 30, 40, 50)]]
    np.testing.assert_array_equal(state.positives, positives[-4:])


# --------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------


def normal_stats(seed: int = 4) -> NormalStats:
    rng = np.random.default_rng(seed)
    return NormalStats.of(rng.uniform(0, 3, size=(200, N_FEATURES)))


def test_a_round_without_anomalies_reports_no_anomalous_statistics():
    cfg = config()
    n = 140
    state, _ = buffered_state(cfg, n, labels=np.zeros(n, np.int64))
    update = train_round(state, "dev", None, cfg, 0)
    assert update.anomalous.count == 0
    np.testing.assert_array_equal(update.anomalous.comoment, np.zeros((N_FEATURES, N_FEATURES)))


def test_detector_before_any_model_is_the_zscore_rule():
    for wanted in ("auto", "supervised", "discriminant", "label_free", "zscore"):
        det = Detector(None, config(detector=wanted))
        assert det.kind == "zscore" and det.version == 0
    cfg = config()
    _, scored = scored_batch(cfg)
    decision = Detector(None, cfg).decide(scored)
    expected = scored.warm & (np.abs(scored.z).max(axis=1) > cfg.anomaly_z)
    np.testing.assert_array_equal(decision.flagged, expected)
    assert decision.kind == "zscore" and decision.threshold == cfg.anomaly_z


@pytest.mark.parametrize(
    ("model_detector", "threshold", "normal_threshold", "wanted", "expected"),
    [
        ("supervised", 0.5, 1.0, "auto", "supervised"),
        ("label_free", 0.5, 1.0, "auto", "label_free"),
        ("zscore", 0.5, 1.0, "auto", "zscore"),
        ("supervised", None, 1.0, "auto", "zscore"),  # not calibrated: not ready
        ("label_free", 0.5, None, "auto", "zscore"),
        ("zscore", 0.5, None, "supervised", "supervised"),
        ("zscore", None, 1.0, "supervised", "zscore"),
        ("supervised", 0.5, 1.0, "label_free", "label_free"),
        ("supervised", 0.5, 1.0, "zscore", "zscore"),
        ("discriminant", 0.5, 1.0, "auto", "discriminant"),
        ("discriminant", None, 1.0, "auto", "zscore"),  # its threshold not calibrated
        ("supervised", 0.5, 1.0, "discriminant", "discriminant"),
    ],
)
def test_detector_kind(model_detector, threshold, normal_threshold, wanted, expected):
    cfg = config(detector=wanted)
    model = global_model(
        cfg,
        np.zeros(N_POOLED + 1),
        threshold=threshold,
        normal=normal_stats(),
        normal_threshold=normal_threshold,
        detector=model_detector,
        discriminant=np.ones(N_FEATURES + 1),
        discriminant_threshold=threshold,
    )
    det = Detector(model, cfg)
    assert det.kind == expected
    assert det.version == 3


def test_label_free_needs_a_normal_model_of_two_rows():
    cfg = config(detector="label_free")
    one_row = NormalStats.of(np.zeros((1, N_FEATURES)))
    model = global_model(cfg, np.zeros(N_POOLED + 1), normal=one_row, normal_threshold=1.0)
    assert Detector(model, cfg).kind == "zscore"


def own_logits(params: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Logistic regression by hand on the pooled block: features / INPUT_SCALE, then w·x + b."""
    pooled = X[:, :N_POOLED]
    return (pooled / INPUT_SCALE[:N_POOLED]) @ params[:-1] + params[-1]


def own_normal_scores(stats: NormalStats, X: np.ndarray) -> np.ndarray:
    cov = stats.comoment / (stats.count - 1)
    diag = np.maximum(np.diag(cov), 1e-4)
    cov = 0.95 * cov + 0.05 * np.diag(diag)
    cov[np.diag_indices_from(cov)] = diag
    d = X - stats.mean
    q = np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d) / X.shape[1]
    return np.minimum(np.sqrt(q), NORMAL_EDGES[-1])


def calibrated_model(cfg: LearnerConfig, features: np.ndarray, version: int = 1) -> GlobalParams:
    """A version whose supervised rule and label-free rule each flag some rows."""
    params = np.random.default_rng(11).normal(size=N_POOLED + 1)
    logits = own_logits(params, features)
    stats = normal_stats()
    w = np.random.default_rng(13).normal(size=N_FEATURES + 1)
    return global_model(
        cfg,
        params,
        version=version,
        threshold=float(np.quantile(logits, 0.8)),
        normal=stats,
        normal_threshold=float(np.quantile(own_normal_scores(stats, features), 0.7)),
        detector="supervised",
        discriminant=w,
        discriminant_threshold=float(np.quantile(features @ w[:-1] + w[-1], 0.75)),
    )


def test_supervised_decisions_are_the_logit_rule():
    cfg = config()
    _, scored = scored_batch(cfg)
    model = calibrated_model(cfg, scored.features[scored.warm])
    decision = Detector(model, cfg).decide(scored)
    logits = own_logits(model.params, scored.features)
    np.testing.assert_allclose(decision.score, logits, rtol=1e-12)
    np.testing.assert_array_equal(decision.flagged, scored.warm & (logits >= model.threshold))
    assert decision.kind == "supervised" and decision.version == 1


def test_discriminant_decisions_are_the_linear_rule():
    cfg = config(detector="discriminant")
    _, scored = scored_batch(cfg)
    w = np.random.default_rng(12).normal(size=N_FEATURES + 1)
    own = scored.features @ w[:-1] + w[-1]
    threshold = float(np.quantile(own[scored.warm], 0.75))
    model = global_model(
        cfg, np.zeros(N_POOLED + 1), discriminant=w, discriminant_threshold=threshold
    )
    decision = Detector(model, cfg).decide(scored)
    np.testing.assert_allclose(decision.score, own, rtol=1e-12)
    np.testing.assert_array_equal(decision.flagged, scored.warm & (own >= threshold))
    assert decision.kind == "discriminant" and decision.version == 3


def test_prequential_counts_equal_a_confusion_of_the_decisions():
    cfg = config(detector="supervised")
    state, scored = scored_batch(cfg)
    warm = scored.warm
    model = calibrated_model(cfg, scored.features[warm])
    detector = Detector(model, cfg)
    assert detector.kind == "supervised"
    labels = labels_for(140, seed=5)
    labels[np.flatnonzero(labels >= 0)[::7]] = 1  # enough positives to count
    record(state, scored, labels, detector, cfg)

    truth = labels[warm]
    labelled = truth >= 0
    actual = truth[labelled]
    logits = own_logits(model.params, scored.features[warm])
    supervised = (logits >= model.threshold).astype(np.int64)
    disc = scored.features[warm] @ model.discriminant[:-1] + model.discriminant[-1]
    rule = rule_of(scored, cfg)[warm]
    expected_preq = sk_confusion(actual, supervised[labelled])
    assert state.prequential == expected_preq
    assert expected_preq.tp > 0 and expected_preq.fp > 0  # not a degenerate check
    # Histograms: the version's scores of all warm rows, split by the round's labels.
    y = np.where(truth >= 0, truth, rule)
    assert ((truth < 0) & (rule == 1)).any()  # the rule's pseudo-labels differ from the stream's
    assert state.hist_pos.sum() == np.count_nonzero(y == 1)
    assert state.hist_neg.sum() == np.count_nonzero(y == 0)
    assert state.hist_normal.sum() == warm.sum()
    top = np.searchsorted(LOGIT_EDGES, logits[y == 1], side="right")
    np.testing.assert_array_equal(state.hist_pos, np.bincount(top, minlength=LOGIT_EDGES.size + 1))
    # The label-free scores of the labelled rows only, by their stream label (not the rule's).
    normal = own_normal_scores(model.normal, scored.features[warm])
    for hist, label in ((state.hist_normal_pos, 1), (state.hist_normal_neg, 0)):
        bins = np.searchsorted(NORMAL_EDGES, normal[truth == label], side="right")
        np.testing.assert_array_equal(hist, np.bincount(bins, minlength=NORMAL_EDGES.size + 1))
    assert state.hist_normal_pos.sum() == np.count_nonzero(truth == 1) > 0
    # The discriminant's scores likewise of the labelled rows only, by their stream label.
    for hist, label in ((state.hist_disc_pos, 1), (state.hist_disc_neg, 0)):
        bins = np.searchsorted(LOGIT_EDGES, disc[truth == label], side="right")
        np.testing.assert_array_equal(hist, np.bincount(bins, minlength=LOGIT_EDGES.size + 1))
    assert state.hist_disc_pos.sum() == np.count_nonzero(truth == 1) > 0
    assert state.hist_disc_neg.sum() == np.count_nonzero(truth == 0) > 0

    update = train_round(state, "dev", model, cfg, 0)
    assert update.scored_version == 1
    assert update.prequential == expected_preq
    assert update.hist_pos.sum() == np.count_nonzero(y == 1)
    assert update.hist_normal_neg.sum() == np.count_nonzero(truth == 0)
    assert update.hist_disc_pos.sum() == np.count_nonzero(truth == 1)
    assert update.hist_disc_neg.sum() == np.count_nonzero(truth == 0)
    # The counts went with the update: the next round starts from zero.
    assert state.prequential == Confusion(0, 0, 0, 0)
    assert state.hist_pos.sum() == 0 == state.hist_normal_pos.sum() == state.hist_normal_neg.sum()
    assert state.hist_disc_pos.sum() == 0 == state.hist_disc_neg.sum()


def test_a_discriminant_of_the_rules_classes_is_calibrated_by_the_rules_labels():
    # A fleet without labelled anomalies: its discriminant separates the rule's classes, so
    # its fresh scores are counted by the rule's labels where the stream has none.
    cfg = config()
    state, scored = scored_batch(cfg)
    warm = scored.warm
    model = replace(calibrated_model(cfg, scored.features[warm]), discriminant_labels="pseudo")
    labels = labels_for(140, seed=5)
    record(state, scored, labels, Detector(model, cfg), cfg)
    truth, rule = labels[warm], rule_of(scored, cfg)[warm]
    y = np.where(truth >= 0, truth, rule)
    assert (y != truth).any() and ((truth < 0) & (rule == 0)).any()
    disc = scored.features[warm] @ model.discriminant[:-1] + model.discriminant[-1]
    for hist, label in ((state.hist_disc_pos, 1), (state.hist_disc_neg, 0)):
        bins = np.searchsorted(LOGIT_EDGES, disc[y == label], side="right")
        np.testing.assert_array_equal(hist, np.bincount(bins, minlength=LOGIT_EDGES.size + 1))
    assert state.hist_disc_pos.sum() + state.hist_disc_neg.sum() == warm.sum()


def test_a_new_version_resets_the_counts():
    cfg = config()
    state, scored = scored_batch(cfg, n=140)
    features = scored.features[scored.warm]
    labels = labels_for(140, seed=6)
    record(state, scored, labels, Detector(calibrated_model(cfg, features, 1), cfg), cfg)
    # The next batch is scored by version 2: only its counts remain.
    X2 = readings_matrix(state, CHANNELS, series(60, seed=9).tolist())
    scored2 = score(state, X2, cfg)
    labels2 = labels_for(60, seed=7)
    model2 = calibrated_model(cfg, features, 2)
    record(state, scored2, labels2, Detector(model2, cfg), cfg)
    lab = labels2 >= 0
    flagged = own_logits(model2.params, scored2.features) >= model2.threshold
    assert state.scored_version == 2
    assert state.prequential == sk_confusion(labels2[lab], flagged[lab].astype(np.int64))
    assert state.hist_normal.sum() == 60


# --------------------------------------------------------------------------------------------
# Configuration and hold-out
# --------------------------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ValueError):
        config(min_round_samples=0)
    with pytest.raises(ValueError):
        config(train_every=5, min_round_samples=10)
    with pytest.raises(ValueError):
        config(detector="magic")
    with pytest.raises(ValueError):
        config(positive_memory=-1)
    assert config(hidden=3).network == Network(N_POOLED, 3)


def test_is_held_out_is_a_deterministic_fraction():
    ids = [f"device_{i:05d}" for i in range(4000)]
    held = [is_held_out(d, 0.1, seed=42) for d in ids]
    assert held == [is_held_out(d, 0.1, seed=42) for d in ids]
    assert 0.08 < np.mean(held) < 0.12
    assert not any(is_held_out(d, 0.0) for d in ids[:200])
    assert all(is_held_out(d, 1.0) for d in ids[:200])
    assert [is_held_out(d, 0.1, seed=1) for d in ids] != held
    # Nested: a device held out at 10 % is held out at 20 %.
    assert all(is_held_out(d, 0.2, seed=42) for d, h in zip(ids, held, strict=True) if h)


def test_a_state_remembers_the_event_time_it_began_and_its_rounds_carry_it() -> None:
    config = LearnerConfig(train_every=4, min_round_samples=4)
    state = DeviceState()
    detector = Detector(None, config)
    first = [single_reading("d", 5_000 + 10 * i, float(i % 3)) for i in range(WARMUP + 5)]
    later = [single_reading("d", 9_000 + 10 * i, float(i % 3)) for i in range(WARMUP + 5)]
    L.observe(state, "d", first, detector, config, True)
    L.observe(state, "d", later, detector, config, True)
    assert state.since_ms == 5_000
    update = train_round(state, "d", None, config, 0)
    assert (update.round, update.since_ms) == (1, 5_000)


@pytest.mark.parametrize(
    "detector, model_detector, labels, needed",
    [
        ("auto", "discriminant", "ground_truth", False),  # a labelled fleet's: for ever
        ("auto", "discriminant", "pseudo", True),  # it may go back to the Gaussian model
        ("auto", "label_free", "ground_truth", True),
        ("auto", "zscore", "ground_truth", True),  # calibrating it before it is chosen
        ("label_free", "discriminant", "ground_truth", True),
        ("discriminant", "label_free", "pseudo", False),
        ("supervised", "label_free", "pseudo", False),
        ("zscore", "label_free", "pseudo", False),
    ],
)
def test_the_normal_model_travels_to_devices_that_use_it(detector, model_detector, labels, needed):
    cfg = config(detector=detector)
    model = global_model(
        cfg,
        np.zeros(Network(N_POOLED, 0).size),
        normal=normal_stats(),
        normal_threshold=2.0,
        detector=model_detector,
        discriminant=np.ones(N_FEATURES + 1),
        discriminant_threshold=0.5,
        discriminant_labels=labels,
    )
    assert L.needs_normal_model(model, detector) is needed
    sent = L.as_sent(model, detector)
    if needed:
        assert sent is model
    else:
        assert sent.normal.count == 0 and sent.normal_threshold is None
        assert replace(sent, normal=model.normal, normal_threshold=2.0) == replace(model)
        assert Detector(sent, cfg).kind == Detector(model, cfg).kind  # what they score with


# --------------------------------------------------------------------------------------------
# personalisation: the device's own discriminant where it has proven better
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wins, losses, preferred",
    [
        (12, 1, True),  # 11 > 3·√13 = 10.8
        (10, 1, False),  # 9 < 3·√11 = 9.95
        (40, 10, True),  # 30 > 3·√50 = 21.2
        (30, 25, False),  # 5 < 3·√55
        (0, 0, False),
        (1, 12, False),
    ],
)
def test_the_personal_model_is_preferred_by_mcnemars_test_at_three(wins, losses, preferred):
    personal = L.PersonalModel.empty()
    personal.params, personal.threshold = np.zeros(N_FEATURES + 1), 0.0
    personal.wins, personal.losses = float(wins), float(losses)
    assert personal.preferred(3.0) is preferred
    personal.params = None  # no discriminant yet: never preferred
    assert not personal.preferred(3.0)


def level_shifts(n: int = 1_000, period: int = 100, length: int = 25, seed: int = 4):
    """Two channels with a labelled shift of the first for ``length`` readings per ``period``."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2)) * [5.0, 0.3] + [60.0, 21.0]
    labels = np.zeros(n, dtype=np.int64)
    for start in range(period // 2, n, period):
        X[start : start + length, 0] += 12.0
        labels[start : start + length] = 1
    labels[np.random.default_rng(seed + 1).random(n) < 0.2] = -1  # some readings unlabelled
    return X, labels


def stream(cfg, X, labels, detector, trains, batch=25, flush=False):
    """The device's state and anomalies after the stream, in messages of ``batch``."""
    state, found = DeviceState(), []
    for lo in range(0, X.shape[0], batch):
        rows = slice(lo, lo + batch)
        out = L.observe_arrays(
            state, "dev", CHANNELS, X[rows].tolist(), labels[rows],
            list(range(lo, min(lo + batch, X.shape[0]))), detector, cfg, trains,
        )  # fmt: skip
        found += out
        while trains and L.round_due(state, cfg):
            train_round(state, "dev", detector.model, cfg, lo)
    while trains and flush and state.buffered:
        train_round(state, "dev", detector.model, cfg, 0)
    return state, found


@pytest.mark.parametrize("trains", [True, False])
def test_the_personal_classes_are_the_devices_labelled_warm_rows(trains):
    cfg = config(min_round_samples=1)
    X, labels = level_shifts()
    state, _ = stream(cfg, X, labels, Detector(None, cfg), trains, flush=True)
    # The oracle: the same feature rows (the features module alone, in the same messages),
    # numpy's mean and co-moment of each class of labelled warm rows.
    own = DeviceState()
    batches = [score(own, readings_matrix(own, CHANNELS, X[lo : lo + 25].tolist()), cfg)
               for lo in range(0, X.shape[0], 25)]  # fmt: skip
    features = np.vstack([b.features for b in batches])
    rows = np.concatenate([b.warm for b in batches]) & (labels >= 0)
    personal, within = state.personal, np.zeros((N_FEATURES, N_FEATURES))
    for label in (0, 1):
        F = features[rows & (labels == label)]
        centred = F - F.mean(axis=0)
        within += centred.T @ centred
        assert personal.counts[label] == F.shape[0]
        np.testing.assert_allclose(personal.means[label], F.mean(axis=0), rtol=1e-9, atol=1e-9)
    # Fisher's discriminant needs the classes' co-moments only summed, and keeps only the sum.
    np.testing.assert_allclose(personal.within, within, rtol=1e-7, atol=1e-6)


def test_a_device_whose_anomalies_the_fleet_misses_switches_to_its_own_model():
    cfg = config()
    X, labels = level_shifts()
    blind = global_model(  # a version whose discriminant never flags
        cfg,
        np.zeros(N_POOLED + 1),
        detector="discriminant",
        discriminant=np.r_[np.zeros(N_FEATURES), -1.0],
        discriminant_threshold=0.0,
    )
    detector = Detector(blind, cfg)
    for trains in (True, False):
        state, found = stream(cfg, X, labels, detector, trains)
        assert found and all(a.detector == "personal" and a.model_version == 3 for a in found)
        assert state.personal.preferred(cfg.personal_z)
        # The last shift (its labels known or not) is found by the device's own model.
        last = np.zeros(X.shape[0], bool)
        last[950:975] = True
        flagged = np.isin(np.arange(X.shape[0]), [a.timestamp_ms for a in found])
        assert np.count_nonzero(flagged & last) >= 20
        assert np.count_nonzero(flagged & ~(labels == 1) & (labels >= 0)) < 10
        # Not before the device had any evidence: the first shift is the fleet's (none).
        assert not (flagged[:150]).any()
    off = replace(cfg, personalise=False)
    state, found = stream(off, X, labels, detector, True)
    assert state.personal is None and found == []
