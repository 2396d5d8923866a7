"""One device's on-device learner: score each reading with the newest global model, buffer it,
and train a local round every ``train_every`` readings, as pure functions of a state object.

The same functions run in the Flink job (one state per key), in ``flead evaluate`` and in the
benchmarks, so that what is measured is what runs.

Per batch of one device's readings (:func:`observe`):

1. features and per-channel z against the device's baseline
   (:func:`streaming.model.features.advance`);
2. detection by the :class:`Detector` of the newest global version the device holds: the
   supervised network when the fleet's version was trained on ground-truth labels, the
   label-free normal model otherwise, the z-score rule before any calibrated version;
3. on training devices, test-then-train bookkeeping: the detector's scores go into the
   calibration histograms and, where a label is known, into the prequential confusion counts
   of that version; then the rows join the round's buffer (label: the stream's, else the
   z-score rule's);
4. on any device with labelled readings, personalisation (:class:`PersonalModel`): the
   device's own discriminant decides instead of the version while it has proven better, and
   learns from the labelled rows after scoring them.

:func:`train_round` turns the buffer into a :class:`~streaming.messages.ModelUpdate`.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from streaming.model import detectors, features
from streaming.model.detectors import LOGIT_EDGES, NORMAL_EDGES, Network, NormalStats
from streaming.model.features import FeatureState, Scored
from streaming.model.metrics import Confusion

DETECTORS = ("auto", "supervised", "discriminant", "label_free", "zscore")
"""``auto``: the detector the server chose for the version (see
:func:`streaming.federation.choose_detector`)."""


@dataclass(frozen=True)
class LearnerConfig:
    """The knobs of the device learner (filled from :class:`flead.config.Settings`)."""

    train_every: int = 50
    min_round_samples: int = 10
    hidden: int = 16
    learning_rate: float = 0.2
    epochs: int = 5
    batch_size: int = 16
    positive_memory: int = 32
    detector: str = "auto"
    anomaly_z: float = 2.5
    critical_z: float = 4.0
    gate: float = features.GATE
    holdout_fraction: float = 0.1
    seed: int = 42
    personalise: bool = True
    personal_memory: int = 100
    personal_z: float = 3.0
    train_network: bool = False  # SGD in every round, whatever the detector (trains_network)

    def __post_init__(self) -> None:
        if not 1 <= self.min_round_samples <= self.train_every:
            raise ValueError(
                f"need 1 <= min_round_samples ({self.min_round_samples}) <= train_every "
                f"({self.train_every})"
            )
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}: {self.detector!r}")
        if self.positive_memory < 0:
            raise ValueError("positive_memory must be >= 0")
        if self.personal_memory < 1:
            raise ValueError("personal_memory must be >= 1")
        if not self.personal_z >= 0.0:
            raise ValueError("personal_z must be >= 0")

    @property
    def network(self) -> Network:
        return Network(features.N_POOLED, self.hidden)

    @property
    def trains_network(self) -> bool:
        """Whether rounds run SGD on the supervised network: where the device scores with it
        (``detector="supervised"``) or :attr:`train_network` asks. ``auto`` never picks it
        (:func:`streaming.federation.choose_detector`), and its SGD was half of what a device
        spent per reading, so other detectors' rounds send the network they started from."""
        return self.train_network or self.detector == "supervised"

    @classmethod
    def from_settings(cls, settings) -> LearnerConfig:
        return cls(
            train_every=settings.train_every,
            min_round_samples=settings.min_round_samples,
            hidden=settings.hidden_units,
            learning_rate=settings.learning_rate,
            epochs=settings.local_epochs,
            batch_size=settings.local_batch_size,
            positive_memory=settings.positive_memory,
            detector=settings.detector,
            anomaly_z=settings.anomaly_z,
            critical_z=settings.critical_z,
            gate=settings.baseline_gate,
            holdout_fraction=settings.holdout_fraction,
            seed=settings.seed,
            personalise=settings.personalise,
            personal_memory=settings.personal_memory,
            personal_z=settings.personal_z,
            train_network=settings.train_network,
        )


def is_held_out(device_id: str, fraction: float, seed: int = 42) -> bool:
    """Whether ``device_id`` is an evaluation device: scored, never trained on.

    A hash, not a list, so the Flink job, the FedAvg service and the Spark evaluation agree on
    the split without sharing state, for any fleet, deterministically for a seed.
    """
    digest = hashlib.blake2b(f"{seed}:{device_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


# --------------------------------------------------------------------------------------------
# The global model as a device uses it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalParams:
    """What a global version holds (the transport-free form of ``global-model-updates``)."""

    version: int
    hidden: int
    params: np.ndarray
    threshold: float | None  # logit threshold of the supervised network; None: not calibrated
    normal: NormalStats
    normal_threshold: float | None  # label-free score threshold; None: not calibrated
    label_source: str  # "ground_truth" or "pseudo": what most of its training labels were
    detector: str = "zscore"  # what ``auto`` devices score with (chosen by the server)
    discriminant: np.ndarray | None = None  # [w, b] of the linear discriminant; None: not yet
    discriminant_threshold: float | None = None  # its score threshold; None: not calibrated
    # What the discriminant's classes are: the stream's labels ("ground_truth") or, in a fleet
    # without labelled anomalies, the z-score rule's classes of unlabelled rows ("pseudo").
    # Devices histogram its fresh scores by the same labels, to calibrate its threshold.
    discriminant_labels: str = "ground_truth"


def needs_normal_model(model: GlobalParams, detector: str) -> bool:
    """Whether devices that score with ``detector`` (their :class:`LearnerConfig` setting) use
    the version's normal model: ``label_free`` devices do, and ``auto`` ones do unless the
    version's detector is a discriminant of labelled classes. Such a fleet never goes back to
    the label-free model (its labelled anomalies' statistics only add up), so the model's
    co-moments (three fifths of a version's bytes) would travel to every device for nothing."""
    if detector == "label_free":
        return True
    if detector != "auto":
        return False
    return not (model.detector == "discriminant" and model.discriminant_labels == "ground_truth")


def as_sent(model: GlobalParams, detector: str) -> GlobalParams:
    """The version as it travels to devices that score with ``detector``: without its normal
    model where they do not use it (:func:`needs_normal_model`)."""
    if needs_normal_model(model, detector):
        return model
    return replace(model, normal=NormalStats.empty(), normal_threshold=None)


@dataclass(frozen=True)
class Decision:
    """A detector's verdict on a batch: flags, scores, the threshold, which detector."""

    flagged: np.ndarray  # bool (n,)
    score: np.ndarray  # (n,) the detector's score (|z| max for the rule)
    threshold: float
    kind: str  # "supervised" | "discriminant" | "label_free" | "zscore" | "personal"
    version: int  # the global version the device held (0: the rule before any version)


class Detector:
    """A global version ready to score (the normal model's inverse is computed once)."""

    def __init__(self, model: GlobalParams | None, config: LearnerConfig) -> None:
        self.model = model
        self.config = config
        self.network = Network(features.N_POOLED, model.hidden if model else config.hidden)
        self.kind = self._kind()
        if model is not None and model.normal.count >= 2:
            self.precision = detectors.normal_precision(model.normal)
        else:
            self.precision = None

    def _kind(self) -> str:
        m, wanted = self.model, self.config.detector
        supervised_ready = m is not None and m.threshold is not None
        label_free_ready = m is not None and m.normal_threshold is not None and m.normal.count >= 2
        discriminant_ready = (
            m is not None and m.discriminant is not None and m.discriminant_threshold is not None
        )
        if wanted == "supervised":
            return "supervised" if supervised_ready else "zscore"
        if wanted == "discriminant":
            return "discriminant" if discriminant_ready else "zscore"
        if wanted == "label_free":
            return "label_free" if label_free_ready else "zscore"
        if wanted == "auto" and m is not None:
            ready = {
                "supervised": supervised_ready,
                "discriminant": discriminant_ready,
                "label_free": label_free_ready,
            }
            return m.detector if ready.get(m.detector) else "zscore"
        return "zscore"

    @property
    def version(self) -> int:
        return self.model.version if self.model else 0

    def supervised_scores(self, X: np.ndarray) -> np.ndarray | None:
        if self.model is None or self.model.params.size != self.network.size:
            return None
        return self.network.logits(self.model.params, X)

    def discriminant_scores(self, X: np.ndarray) -> np.ndarray | None:
        if self.model is None or self.model.discriminant is None:
            return None
        return detectors.discriminant_scores(self.model.discriminant, X)

    def normal_scores(self, X: np.ndarray) -> np.ndarray | None:
        if self.precision is None:
            return None
        return detectors.normal_scores(self.model.normal.mean, self.precision, X)

    def decide(self, scored: Scored) -> Decision:
        if self.kind == "supervised":
            score = self.supervised_scores(scored.features)
            threshold = float(self.model.threshold)
        elif self.kind == "label_free":
            score = self.normal_scores(scored.features)
            threshold = float(self.model.normal_threshold)
        elif self.kind == "discriminant":
            score = self.discriminant_scores(scored.features)
            threshold = float(self.model.discriminant_threshold)
        else:
            score = features.max_abs_z(scored)
            threshold = self.config.anomaly_z
            return Decision(scored.warm & (score > threshold), score, threshold, "zscore", 0)
        return Decision(
            scored.warm & (score >= threshold), score, threshold, self.kind, self.version
        )


# --------------------------------------------------------------------------------------------
# Personalisation: the device's own discriminant, used where it has proven better
# --------------------------------------------------------------------------------------------

PERSONAL_CALIBRATION_DECAY = 0.99
"""How much of the personal threshold's score histograms is kept per ``train_every`` readings:
the server's default ``calibration_decay`` per version, so the device calibrates its own
discriminant as a fleet of one would (``flead evaluate``'s ``local_only``)."""


@dataclass
class PersonalModel:
    """A device's own discriminant of its labelled rows (what it would have federating alone)
    and the evidence whether it detects this device's anomalies better than the global version.

    Devices differ: a fleet's discriminant may miss what one device's anomalies look like, and
    a device with labels learns its own. It is used only while it has been right where the
    global version was wrong significantly more often than the other way round, over about
    the last ``personal_memory`` labelled readings (McNemar's test at ``personal_z``): a device
    whose own model is noise (few anomalies of its own) keeps the fleet's. Nothing of it leaves
    the device; the rounds a device sends are the same with or without it."""

    # Its classes, normal and anomalous: counts (2), means (2 × F), and the sum of their
    # co-moments (F × F), all Fisher's discriminant uses: half the keyed state of two.
    counts: np.ndarray
    means: np.ndarray
    within: np.ndarray
    hist_pos: np.ndarray  # its scores of fresh labelled readings, by label (faded)
    hist_neg: np.ndarray
    params: np.ndarray | None = None  # [w, b] (detectors.discriminant); None: a class is missing
    threshold: float | None = None
    wins: float = 0.0  # labelled readings it got right and the global version wrong (faded)
    losses: float = 0.0  # ... and the other way round

    @classmethod
    def empty(cls, n_features: int = features.N_FEATURES) -> PersonalModel:
        return cls(
            np.zeros(2),
            np.zeros((2, n_features)),
            np.zeros((n_features, n_features)),
            np.zeros(LOGIT_EDGES.size + 1),
            np.zeros(LOGIT_EDGES.size + 1),
        )

    def preferred(self, z: float) -> bool:
        """McNemar's test on the readings where the two disagree: wins − losses beyond ``z``
        standard errors (under "equally good", wins − losses has variance wins + losses)."""
        gap = self.wins - self.losses
        return (
            self.params is not None and gap > 0.0 and gap > z * math.sqrt(self.wins + self.losses)
        )

    def learn(self, normal: NormalStats, anomalous: NormalStats) -> None:
        """Add labelled rows' statistics to its classes and remake the discriminant."""
        for k, fresh in enumerate((normal, anomalous)):
            if fresh.count:
                # The class without its co-moment plus the rows: the merged co-moment is the
                # rows' own plus the shift of the class mean, exactly what the sum gains.
                merged = NormalStats(self.counts[k], self.means[k], _NO_ROWS.comoment) + fresh
                self.counts[k], self.means[k] = merged.count, merged.mean
                self.within = self.within + merged.comoment
        classes = self.classes()
        self.params = detectors.discriminant(*classes)
        if self.params is not None:
            self.threshold = detectors.best_mcc_threshold(self.hist_pos, self.hist_neg, LOGIT_EDGES)
            if self.threshold is None:  # no fresh score of both labels yet
                self.threshold = detectors.discriminant_boundary(*classes)

    def classes(self) -> tuple[NormalStats, NormalStats]:
        """Its classes as statistics, the summed co-moment in the first: Fisher's direction
        and distance use only the sum (:func:`streaming.model.detectors.discriminant`)."""
        return (
            NormalStats(float(self.counts[0]), self.means[0], self.within),
            NormalStats(float(self.counts[1]), self.means[1], _NO_ROWS.comoment),
        )

    def flags(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = detectors.discriminant_scores(self.params, X)
        return scores >= self.threshold, scores


# --------------------------------------------------------------------------------------------
# The device's state and its learning
# --------------------------------------------------------------------------------------------


class ChannelMismatch(ValueError):
    """A reading whose channels differ from the ones the device has reported so far."""


@dataclass
class DeviceState:
    """Everything one device remembers; bounded: feature state O(C² + 30·C), a buffer of fewer
    than ``train_every`` rows between batches, at most ``positive_memory`` remembered anomalies,
    histograms of fixed size, and with labels a personal model of O(F²) (F features)."""

    features: FeatureState | None = None
    rows: list[np.ndarray] = field(default_factory=list)  # feature rows waiting for a round
    labels: list[np.ndarray] = field(default_factory=list)
    pseudo: list[np.ndarray] = field(default_factory=list)  # row labelled by the z-score rule
    buffered: int = 0
    positives: np.ndarray | None = None  # remembered anomalous rows, replayed in each round
    rounds: int = 0
    # Event time of the first reading this state holds. A device whose state expired (or a
    # fresh job) numbers its rounds from 1 again; (since_ms, round) stays unique, and a
    # round recomputed after a restore keeps both.
    since_ms: int = 0
    local_params: np.ndarray | None = None
    hist_pos: np.ndarray = field(default_factory=lambda: np.zeros(LOGIT_EDGES.size + 1, np.int64))
    hist_neg: np.ndarray = field(default_factory=lambda: np.zeros(LOGIT_EDGES.size + 1, np.int64))
    hist_normal: np.ndarray = field(
        default_factory=lambda: np.zeros(NORMAL_EDGES.size + 1, np.int64)
    )
    # The label-free scores of labelled readings, by label (a labelled fleet's calibration)
    hist_normal_pos: np.ndarray = field(
        default_factory=lambda: np.zeros(NORMAL_EDGES.size + 1, np.int64)
    )
    hist_normal_neg: np.ndarray = field(
        default_factory=lambda: np.zeros(NORMAL_EDGES.size + 1, np.int64)
    )
    # The discriminant's scores of fresh readings, by label (its calibration)
    hist_disc_pos: np.ndarray = field(
        default_factory=lambda: np.zeros(LOGIT_EDGES.size + 1, np.int64)
    )
    hist_disc_neg: np.ndarray = field(
        default_factory=lambda: np.zeros(LOGIT_EDGES.size + 1, np.int64)
    )
    prequential: Confusion = field(default_factory=lambda: Confusion(0, 0, 0, 0))
    scored_version: int = 0  # the global version the histograms and counts belong to
    personal: PersonalModel | None = None  # from the first labelled reading on (personalise)


def readings_matrix(state: DeviceState, channels: tuple[str, ...], values: list) -> np.ndarray:
    """The batch as an (n × C) array in the device's channel order; the first batch fixes the
    channels, a later one with other channels raises :class:`ChannelMismatch`."""
    if state.features is None:
        state.features = features.new_state(channels)
    elif channels != state.features.channels:
        raise ChannelMismatch(
            f"channels {list(channels)} differ from the device's {list(state.features.channels)}"
        )
    return np.asarray(values, dtype=np.float64).reshape(len(values), len(channels))


def score(state: DeviceState, X: np.ndarray, config: LearnerConfig) -> Scored:
    """Features of the batch against the device's state; the state moves past the batch."""
    state.features, scored = features.advance(state.features, X, gate=config.gate)
    return scored


def record(
    state: DeviceState,
    scored: Scored,
    labels: np.ndarray,
    detector: Detector,
    config: LearnerConfig,
) -> None:
    """Test-then-train on a training device: count how the device's global version scored the
    batch (before any training on it), then buffer the rows for the next round.

    ``labels``: 1/0 where the stream has a label, -1 where it has none.
    """
    warm = scored.warm
    if not warm.any():
        return
    X = scored.features[warm]
    truth = labels[warm]
    rule = (features.max_abs_z(scored)[warm] > config.anomaly_z).astype(np.int64)
    y = np.where(truth >= 0, truth, rule)
    if detector.version and detector.version != state.scored_version:
        _reset_scores(state, detector.version)
    logits = normal = disc = None
    if detector.version:
        # Only a trained network's scores calibrate it: an untrained one gets no threshold.
        logits = detector.supervised_scores(X) if config.trains_network else None
        if logits is not None:
            state.hist_pos += detectors.histogram(logits[y == 1], LOGIT_EDGES)
            state.hist_neg += detectors.histogram(logits[y == 0], LOGIT_EDGES)
        normal = detector.normal_scores(X)
        if normal is not None:
            state.hist_normal += detectors.histogram(normal, NORMAL_EDGES)
            state.hist_normal_pos += detectors.histogram(normal[truth == 1], NORMAL_EDGES)
            state.hist_normal_neg += detectors.histogram(normal[truth == 0], NORMAL_EDGES)
        disc = detector.discriminant_scores(X)
        if disc is not None:
            # By the labels its classes were made of: the stream's (labelled rows only), or
            # the rule's where the fleet has no labelled anomaly to learn from.
            classes = y if detector.model.discriminant_labels == "pseudo" else truth
            state.hist_disc_pos += detectors.histogram(disc[classes == 1], LOGIT_EDGES)
            state.hist_disc_neg += detectors.histogram(disc[classes == 0], LOGIT_EDGES)
    labelled = truth >= 0
    if labelled.any():
        actual = truth[labelled] == 1
        if detector.kind != "zscore":
            flagged = detector.decide(scored).flagged[warm][labelled]
            state.prequential = state.prequential + _counts(flagged, actual)
    state.rows.append(X)
    state.labels.append(y)
    state.pseudo.append(truth < 0)
    state.buffered += X.shape[0]


def _counts(flagged: np.ndarray, actual: np.ndarray) -> Confusion:
    return Confusion(
        int(np.count_nonzero(flagged & actual)),
        int(np.count_nonzero(flagged & ~actual)),
        int(np.count_nonzero(~flagged & ~actual)),
        int(np.count_nonzero(~flagged & actual)),
    )


def _reset_scores(state: DeviceState, version: int) -> None:
    for name in HISTOGRAMS:  # new arrays: the last LocalRound still holds the old ones
        counts = getattr(state, name)
        setattr(state, name, np.zeros(counts.shape, counts.dtype))
    state.prequential = Confusion(0, 0, 0, 0)
    state.scored_version = version


def personalised(
    state: DeviceState, scored: Scored, decision: Decision, config: LearnerConfig
) -> Decision:
    """The device's decision on a batch: the global version's ``decision``, or its own
    discriminant's while that has proven better (:class:`PersonalModel`)."""
    personal = state.personal
    if not config.personalise or personal is None or not personal.preferred(config.personal_z):
        return decision
    flagged, scores = personal.flags(scored.features)
    return Decision(
        scored.warm & flagged, scores, float(personal.threshold), "personal", decision.version
    )


def learn_personal(
    state: DeviceState,
    scored: Scored,
    labels: np.ndarray,
    decision: Decision,
    config: LearnerConfig,
    trains: bool,
) -> None:
    """Test-then-train the device's own discriminant on a batch's labelled readings: first
    count where it and the global version's ``decision`` were right, and its scores into its
    calibration histograms; then learn from the rows (a training device: in its next round,
    from the statistics the round computes for the server anyway)."""
    if not config.personalise:
        return
    rows = scored.warm & (labels >= 0)
    if not rows.any():
        return
    if state.personal is None:
        state.personal = PersonalModel.empty()
    personal = state.personal
    X, actual = scored.features[rows], labels[rows] == 1
    n = X.shape[0]
    if personal.params is not None:
        mine, scores = personal.flags(X)
        theirs = decision.flagged[rows]
        kept = (1.0 - 1.0 / config.personal_memory) ** n
        personal.wins = personal.wins * kept + np.count_nonzero(
            (mine == actual) & (theirs != actual)
        )
        personal.losses = personal.losses * kept + np.count_nonzero(
            (theirs == actual) & (mine != actual)
        )
        faded = PERSONAL_CALIBRATION_DECAY ** (n / config.train_every)
        personal.hist_pos = personal.hist_pos * faded + detectors.histogram(
            scores[actual], LOGIT_EDGES
        )
        personal.hist_neg = personal.hist_neg * faded + detectors.histogram(
            scores[~actual], LOGIT_EDGES
        )
    if not trains:  # a training device's rounds add its rows (train_round): no second pass
        personal.learn(_stats_or_none(X[~actual]), _stats_or_none(X[actual]))


def decide(
    state: DeviceState,
    scored: Scored,
    labels: np.ndarray,
    detector: Detector,
    config: LearnerConfig,
    trains: bool,
) -> Decision:
    """The device's decision on a batch (its version's, or its own model's where proven),
    then its own model learns from the batch's labels: test-then-train."""
    fleet = detector.decide(scored)
    decision = personalised(state, scored, fleet, config)
    learn_personal(state, scored, labels, fleet, config, trains)
    return decision


def round_due(state: DeviceState, config: LearnerConfig) -> bool:
    return state.buffered >= config.train_every


@dataclass(frozen=True)
class LocalRound:
    """The transport-free form of a ``local-model-updates`` message."""

    device_id: str
    round: int  # the device's round counter, 1, 2, ... within the state begun at since_ms
    base_version: int  # the global version the round started from (0 = none yet)
    params: np.ndarray
    samples: int
    label_source: str
    loss: float
    accuracy: float
    normal: NormalStats  # statistics of the round's normal rows
    hist_pos: np.ndarray
    hist_neg: np.ndarray
    hist_normal: np.ndarray
    scored_version: int  # the version the histograms and prequential counts belong to
    prequential: Confusion
    timestamp_ms: int
    hist_normal_pos: np.ndarray = field(default_factory=lambda: np.zeros(NORMAL_EDGES.size + 1))
    hist_normal_neg: np.ndarray = field(default_factory=lambda: np.zeros(NORMAL_EDGES.size + 1))
    since_ms: int = 0  # DeviceState.since_ms: with device_id and round, the round's identity
    anomalous: NormalStats = field(default_factory=NormalStats.empty)  # of the anomalous rows
    pseudo_normal: NormalStats = field(default_factory=NormalStats.empty)  # rule-labelled normal
    pseudo_anomalous: NormalStats = field(default_factory=NormalStats.empty)  # rule-flagged
    hist_disc_pos: np.ndarray = field(default_factory=lambda: np.zeros(LOGIT_EDGES.size + 1))
    hist_disc_neg: np.ndarray = field(default_factory=lambda: np.zeros(LOGIT_EDGES.size + 1))


STATISTICS = ("normal", "pseudo_normal", "anomalous", "pseudo_anomalous")
"""The feature statistics a :class:`LocalRound` carries: its rows labelled normal by the stream,
those only the z-score rule called normal (unlabelled readings), its labelled anomalies, and
the unlabelled rows the rule flagged."""

HISTOGRAMS = (
    "hist_pos",
    "hist_neg",
    "hist_normal",
    "hist_normal_pos",
    "hist_normal_neg",
    "hist_disc_pos",
    "hist_disc_neg",
)
"""The score histograms a :class:`LocalRound` carries (counts of fresh readings per bin)."""


def _take(state: DeviceState, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The oldest ``n`` buffered rows, their labels and which of them were pseudo-labelled."""
    X = np.vstack(state.rows)
    y = np.concatenate(state.labels)
    pseudo = np.concatenate(state.pseudo)
    rest = slice(n, None)
    state.rows = [X[rest]] if X.shape[0] > n else []
    state.labels = [y[rest]] if X.shape[0] > n else []
    state.pseudo = [pseudo[rest]] if X.shape[0] > n else []
    state.buffered = max(X.shape[0] - n, 0)
    return X[:n], y[:n], pseudo[:n]


def train_round(
    state: DeviceState,
    device_id: str,
    model: GlobalParams | None,
    config: LearnerConfig,
    now_ms: int,
) -> LocalRound | None:
    """One local round on the oldest ``train_every`` buffered rows (all of them after a
    timer), plus the remembered anomalies; None when fewer than ``min_round_samples`` wait."""
    if state.buffered < config.min_round_samples:
        return None
    network = config.network
    n = min(state.buffered, config.train_every)
    X, y, pseudo = _take(state, n)
    if model is not None and model.params.size == network.size:
        start, base = model.params, model.version
    elif state.local_params is not None:
        start, base = state.local_params, 0
    else:
        start, base = network.initial(), 0
    X_train, y_train = X, y
    if state.positives is not None and state.positives.shape[0]:
        X_train = np.vstack((X, state.positives))
        y_train = np.concatenate((y, np.ones(state.positives.shape[0], dtype=np.int64)))
    version = state.rounds + 1
    # Seeded by device and round: a round recomputed after a restore gives the same weights.
    seed = zlib.crc32(f"{config.seed}:{device_id}:{version}".encode())
    result = detectors.train(
        network,
        start,
        X_train,
        y_train,
        learning_rate=config.learning_rate,
        epochs=config.epochs if config.trains_network else 0,
        batch_size=config.batch_size,
        seed=seed,
    )
    _remember_positives(state, X[y == 1], config.positive_memory)
    labelled_anomalies = (y == 1) & ~pseudo
    update = LocalRound(
        device_id=device_id,
        round=version,
        base_version=base,
        params=result.params,
        samples=n,
        label_source="pseudo" if np.count_nonzero(pseudo) * 2 > n else "ground_truth",
        loss=result.loss,
        accuracy=result.accuracy,
        # Stream-labelled and rule-labelled rows travel apart: a fleet with labelled anomalies
        # learns its discriminant from the stream's labels only (the rule's would teach it the
        # rule); one without learns it from the rule's classes (pseudo_*), and the label-free
        # model adds both kinds of normal rows. Anomalies: the round's own only (the replayed
        # ones were counted when they came).
        normal=NormalStats.of(X[(y == 0) & ~pseudo]),
        pseudo_normal=_stats_or_none(X[(y == 0) & pseudo]),
        anomalous=_stats_or_none(X[labelled_anomalies]),
        pseudo_anomalous=_stats_or_none(X[(y == 1) & pseudo]),
        hist_pos=state.hist_pos,
        hist_neg=state.hist_neg,
        hist_normal=state.hist_normal,
        hist_normal_pos=state.hist_normal_pos,
        hist_normal_neg=state.hist_normal_neg,
        hist_disc_pos=state.hist_disc_pos,
        hist_disc_neg=state.hist_disc_neg,
        scored_version=state.scored_version,
        prequential=state.prequential,
        timestamp_ms=now_ms,
        since_ms=state.since_ms,
    )
    if config.personalise and state.personal is not None:
        state.personal.learn(update.normal, update.anomalous)
    state.rounds = version
    state.local_params = result.params
    _reset_scores(state, state.scored_version)
    return update


def _empty_stats() -> NormalStats:
    stats = NormalStats.empty()
    stats.mean.flags.writeable = stats.comoment.flags.writeable = False  # shared by rounds
    return stats


_NO_ROWS = _empty_stats()
"""The statistics of no rows (most rounds see no anomaly): one shared, read-only instance."""


def _stats_or_none(rows: np.ndarray) -> NormalStats:
    return NormalStats.of(rows) if rows.shape[0] else _NO_ROWS


def _remember_positives(state: DeviceState, rows: np.ndarray, memory: int) -> None:
    if memory == 0 or rows.shape[0] == 0:
        return
    kept = rows if state.positives is None else np.vstack((state.positives, rows))
    state.positives = kept[-memory:]


# --------------------------------------------------------------------------------------------
# Anomaly records and the per-message edge loop (what the Flink job calls)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Anomaly:
    """The transport-free form of an ``anomalies`` record: what was flagged, by what, why."""

    device_id: str
    timestamp_ms: int
    value: float  # the reading of the channel with the largest |z|
    z_score: float  # that channel's z against the device's baseline
    severity: str  # "warning" | "critical"
    score: float  # the detector's score (|z| for the rule)
    threshold: float  # the score at and above which the detector flags
    model_version: int  # the global version the device held (0: none yet)
    detector: str  # a Decision's kind
    channels: tuple[str, ...]  # the channels that drove it (|z| above anomaly_z, else the top)
    reason: str


def anomalies(
    device_id: str,
    timestamps_ms: list[int],
    X: np.ndarray,
    channels: tuple[str, ...],
    scored: Scored,
    decision: Decision,
    config: LearnerConfig,
) -> list[Anomaly]:
    """Anomaly records of the flagged readings of a batch."""
    found = []
    for i in decision.flagged.nonzero()[0].tolist():
        z = scored.z[i]
        abs_z = np.abs(z)
        top = int(np.argmax(abs_z))
        driving = [c for c, v in zip(channels, abs_z.tolist(), strict=True) if v > config.anomaly_z]
        names = tuple(driving) or (channels[top],)
        score = float(decision.score[i])
        if decision.kind == "zscore":
            why = f"z-score rule: |z| {abs_z[top]:.2f} > {decision.threshold:g}"
        elif decision.kind == "personal":
            held = f"global v{decision.version}" if decision.version else "no global version"
            why = (
                f"the device's own model (it holds {held}): score {score:.2f} >= "
                f"{decision.threshold:.2f}; largest |z| {abs_z[top]:.2f}"
            )
        else:
            why = (
                f"{decision.kind} model v{decision.version}: score {score:.2f} >= "
                f"{decision.threshold:.2f}; largest |z| {abs_z[top]:.2f}"
            )
        found.append(
            Anomaly(
                device_id=device_id,
                timestamp_ms=int(timestamps_ms[i]),
                value=float(X[i, top]),
                z_score=float(z[top]),
                severity="critical" if abs_z[top] > config.critical_z else "warning",
                score=score,
                threshold=float(decision.threshold),
                model_version=decision.version,
                detector=decision.kind,
                channels=names,
                reason=f"{why} on {', '.join(names)}",
            )
        )
    return found


def observe(
    state: DeviceState,
    device_id: str,
    readings: list,
    detector: Detector,
    config: LearnerConfig,
    trains: bool,
) -> list[Anomaly]:
    """One message's readings of one device (time-ordered ``Reading``s with the device's
    channels): score them with the device's global version, learn from them, return the
    anomalies. Raises :class:`ChannelMismatch` (the state unchanged) for foreign channels."""
    channels = readings[0].channels
    if any(r.channels != channels for r in readings):
        raise ChannelMismatch(f"one message of {device_id!r} mixes channel sets")
    labels = np.fromiter(
        (-1 if r.label is None else r.label for r in readings), np.int64, len(readings)
    )
    return observe_arrays(
        state,
        device_id,
        channels,
        [r.values for r in readings],
        labels,
        [r.timestamp_ms for r in readings],
        detector,
        config,
        trains,
    )


def observe_arrays(
    state: DeviceState,
    device_id: str,
    channels: tuple[str, ...],
    values,
    labels: np.ndarray,
    timestamps_ms,
    detector: Detector,
    config: LearnerConfig,
    trains: bool,
) -> list[Anomaly]:
    """:func:`observe` on columns rather than ``Reading`` objects (the Flink job's form: no
    per-reading objects between its operators): ``values`` n × C in ``channels`` order,
    ``labels`` 1/0, -1 where the stream has none, ``timestamps_ms`` epoch milliseconds."""
    if state.features is None:
        state.since_ms = int(timestamps_ms[0])
    X = readings_matrix(state, channels, values)
    scored = score(state, X, config)
    decision = decide(state, scored, labels, detector, config, trains)
    if trains:
        record(state, scored, labels, detector, config)
    return anomalies(device_id, timestamps_ms, X, channels, scored, decision, config)
