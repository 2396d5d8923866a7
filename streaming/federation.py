"""One federation round, free of Kafka: buffer local rounds → combine → the next global version.

The FedAvg service wraps this in a Kafka consumer and a database transaction; ``flead
evaluate`` and the benchmarks drive it in-process with the same learner functions, so the
numbers they report are the service's.

A round closes when the buffer holds updates from ``min(min_devices, active devices)``
distinct devices (active: sent an update within ``active_window_ms`` by the updates' own
clocks), or when ``round_window_ms`` has passed since its first update: a fleet of any size
gets versions, and a silent device cannot hold one up. A version made by fewer devices than a
full round of the fleet (``min(min_devices, devices heard of within fleet_memory_ms)``) takes
that share of the combined step only: when the rest of a small fleet falls silent, the one
device still sending would otherwise swing the fleet's model to its own data in a few versions
(measured on WSN's tail, where one mote reports alone for the last dozen versions).

A device sends at most one update per version: a second one is merged into its first
(sample-weighted), so nothing is lost and no device counts twice.

A round's statistics are checked before they are summed (:func:`check_statistics`: what
bounded features cannot give is refused, and the service dead-letters it) and its claimed
counts scaled to one round's (:func:`bounded`): the summed statistics are the default
detector, and one device claiming 2·10⁹ rows would otherwise own it.

What a version carries beyond the averaged network parameters, all computed from what the
devices sent and never from their raw readings:

- the supervised decision threshold: the edge of the devices' score histograms with the best
  Matthews correlation (positives and negatives of fresh readings scored by their current
  version), summed with those of earlier versions faded by ``calibration_decay``;
- the discriminant: from the sums of the statistics of the rows the stream labelled normal and
  anomalous (the rule's pseudo-labels stay out of it) once the fleet has labelled anomalies,
  before that from the rule's classes of the unlabelled rows; and its threshold;
- the label-free model: the sum of the devices' normal-row statistics, the rule's normal rows
  of unlabelled readings included (faded the same way), and its threshold, the score that
  flags ``contamination`` of the fleet's readings;
- the prequential confusion counts each device reported for the version it was using.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from streaming.learner import HISTOGRAMS, STATISTICS, GlobalParams, LocalRound
from streaming.model import aggregation, detectors
from streaming.model.detectors import LOGIT_EDGES, NORMAL_EDGES, Network, NormalStats
from streaming.model.features import CAP, N_FEATURES, N_POOLED
from streaming.model.metrics import Confusion


@dataclass(frozen=True)
class FederationConfig:
    min_devices: int = 20
    round_window_ms: int = 60_000
    active_window_ms: int = 300_000
    rule: str = "fedavg"
    rule_options: tuple[tuple[str, float], ...] = ()
    max_samples: int = 100  # a round holds train_every rows plus remembered anomalies
    server_momentum: float = 0.7
    server_lr: float = 1.0
    calibration_decay: float = 0.99
    normal_decay: float = 1.0
    contamination: float = 0.02
    hidden: int = 16
    fleet_memory_ms: int = 86_400_000  # devices seen within this count as the fleet

    def __post_init__(self) -> None:
        if self.min_devices < 1:
            raise ValueError("min_devices must be >= 1")
        if not 0.0 < self.contamination < 0.5:
            raise ValueError("contamination must be in (0, 0.5)")
        for name in ("calibration_decay", "normal_decay"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1]")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError("server_momentum must be in [0, 1)")

    def momentum(self) -> aggregation.ServerMomentum:
        return aggregation.ServerMomentum(beta=self.server_momentum, server_lr=self.server_lr)

    def make_rule(self) -> aggregation.AggregationRule:
        return aggregation.make_rule(
            self.rule, max_samples=self.max_samples, **dict(self.rule_options)
        )

    @classmethod
    def from_settings(cls, settings) -> FederationConfig:
        options = {
            "staleness_alpha": settings.fedavg_staleness_alpha,
            "max_update_norm": settings.fedavg_max_norm,
            "bucket_size": settings.fedavg_bucket_size,
        }
        if settings.fedavg_strategy == "trimmed_mean":
            options["trim_fraction"] = settings.fedavg_trim_fraction
        config = cls(
            min_devices=settings.fedavg_min_devices,
            round_window_ms=int(settings.fedavg_round_window_s * 1000),
            active_window_ms=int(settings.fedavg_active_window_s * 1000),
            fleet_memory_ms=int(settings.fedavg_fleet_memory_s * 1000),
            rule=settings.fedavg_strategy,
            rule_options=tuple(sorted(options.items())),
            max_samples=settings.train_every + settings.positive_memory,
            server_momentum=settings.fedavg_server_momentum,
            calibration_decay=settings.fedavg_calibration_decay,
            contamination=settings.contamination,
            hidden=settings.hidden_units,
        )
        try:
            config.make_rule()
        except ValueError as exc:
            raise ValueError(f"FLEAD_FEDAVG_* settings: {exc}") from exc
        return config


@dataclass
class ServerState:
    """What the server carries from version to version (rebuilt from storage on restart)."""

    current: GlobalParams | None = None
    velocity: np.ndarray | None = None
    hist_pos: np.ndarray = field(default_factory=lambda: np.zeros(LOGIT_EDGES.size + 1))
    hist_neg: np.ndarray = field(default_factory=lambda: np.zeros(LOGIT_EDGES.size + 1))
    hist_normal: np.ndarray = field(default_factory=lambda: np.zeros(NORMAL_EDGES.size + 1))
    hist_normal_pos: np.ndarray = field(default_factory=lambda: np.zeros(NORMAL_EDGES.size + 1))
    hist_normal_neg: np.ndarray = field(default_factory=lambda: np.zeros(NORMAL_EDGES.size + 1))
    normal: NormalStats = field(default_factory=NormalStats.empty)
    anomalous: NormalStats = field(default_factory=NormalStats.empty)
    # Normal rows only the z-score rule labelled: the label-free model's, not the discriminant's.
    pseudo_normal: NormalStats = field(default_factory=NormalStats.empty)
    # Unlabelled rows the rule flagged: with pseudo_normal, the classes of an unlabelled fleet.
    pseudo_anomalous: NormalStats = field(default_factory=NormalStats.empty)
    hist_disc_pos: np.ndarray = field(default_factory=lambda: np.zeros(LOGIT_EDGES.size + 1))
    hist_disc_neg: np.ndarray = field(default_factory=lambda: np.zeros(LOGIT_EDGES.size + 1))
    # The first version whose discriminant has today's classes (the stream's labels or the
    # rule's): the discriminant's histograms count only scores of it and later versions.
    discriminant_since: int = 0


DISCRIMINANT_HISTOGRAMS = ("hist_disc_pos", "hist_disc_neg")


@dataclass(frozen=True)
class Version:
    """A closed round: the new global version and how it was made."""

    model: GlobalParams
    updates: tuple[LocalRound, ...]  # one per device (merged)
    weights: tuple[float, ...]  # the aggregation weight of each
    prequential: dict[int, Confusion]  # reported counts per version they belong to
    num_devices: int
    accuracy: float  # sample-weighted training accuracy of the updates (not quality)


def merge(a: LocalRound, b: LocalRound) -> LocalRound:
    """Two updates of one device within one version as one (sample-weighted parameters,
    summed counts); the later round's identity and base version."""
    total = a.samples + b.samples
    params = (a.params * a.samples + b.params * b.samples) / total
    same_scores = a.scored_version == b.scored_version
    # Histograms and counts of another version than the later round's are left behind: they
    # calibrate a version the server has moved on from.
    scores = {
        name: getattr(a, name) + getattr(b, name) if same_scores else getattr(b, name)
        for name in (*HISTOGRAMS, "prequential")
    }
    return replace(
        b,
        params=params,
        samples=total,
        loss=(a.loss * a.samples + b.loss * b.samples) / total,
        accuracy=(a.accuracy * a.samples + b.accuracy * b.samples) / total,
        **{name: getattr(a, name) + getattr(b, name) for name in STATISTICS},
        **scores,
    )


def check_statistics(update: LocalRound) -> None:
    """Refuse a round whose statistics no device could have computed: features are bounded
    (:data:`~streaming.model.features.CAP`), so a block's mean lies within ±CAP and each
    feature's co-moment within ``[0, count·CAP²]``. What a lying device can still send within
    those bounds weighs no more than one round (:func:`bounded`)."""
    for name in STATISTICS:
        stats: NormalStats = getattr(update, name)
        if not (math.isfinite(stats.count) and stats.count >= 0):
            raise ValueError(f"{name} statistics: count {stats.count} is not a count")
        if stats.count == 0:
            continue
        if not (np.isfinite(stats.mean).all() and np.isfinite(stats.comoment).all()):
            raise ValueError(f"{name} statistics are not finite")
        if np.abs(stats.mean).max() > CAP * (1 + 1e-9):
            raise ValueError(f"{name} statistics: a feature mean beyond ±{CAP:g}")
        spread = np.diag(stats.comoment)
        if spread.min() < -1e-6 * stats.count or spread.max() > stats.count * CAP * CAP * 1.000001:
            raise ValueError(f"{name} statistics: a feature's spread beyond what ±{CAP:g} allows")
    for name in HISTOGRAMS:
        counts = getattr(update, name)
        if not (np.isfinite(counts).all() and counts.min(initial=0) >= 0):
            raise ValueError(f"{name}: counts must be finite and non-negative")


def bounded(update: LocalRound, cap: int) -> LocalRound:
    """The round with the counts it claims scaled down to what one round can hold: its
    statistics to ``cap`` rows (a round's rows, like its capped aggregation weight), its score
    histograms to ``2·cap`` readings (the readings a device scored since its previous round:
    under a round's rows plus one message's). A device claiming 2·10⁹ rows then counts for one
    round, not for the fleet; an honest round is taken as sent."""
    rows = sum(getattr(update, name).count for name in STATISTICS)
    scored = max(float(getattr(update, name).sum()) for name in HISTOGRAMS)
    changes: dict = {}
    if rows > cap:
        changes.update({name: getattr(update, name).scaled(cap / rows) for name in STATISTICS})
    if scored > 2 * cap:
        changes.update({name: getattr(update, name) * (2 * cap / scored) for name in HISTOGRAMS})
    return replace(update, **changes) if changes else update


def label_free_statistics(normal: NormalStats, pseudo_normal: NormalStats) -> NormalStats:
    """The label-free model's statistics: every normal row, those the stream labelled and those
    only the z-score rule called normal (the discriminant takes the first only)."""
    return normal + pseudo_normal


COMMON_ANOMALIES = 5.0
"""An unlabelled fleet's anomalies count as common where the z-score rule flags more than this
many times ``contamination`` of its readings (see :func:`choose_detector`)."""


def choose_detector(
    *,
    discriminant: bool,
    label_free: bool,
    discriminant_labels: str = "ground_truth",
    anomalies_common: bool = False,
) -> str:
    """The detector ``auto`` devices use next, in a fixed order of preference measured on
    held-out devices (README, *Detection*): the discriminant once the fleet has labelled
    anomalies, else the label-free model once calibrated, else the z-score rule.

    A fleet without labelled anomalies has two label-free detectors: the Gaussian model of
    normal rows and the discriminant of the rule's classes. The Gaussian model assumes that
    anomalies are rare (its threshold flags ``contamination`` of the readings); where the rule
    flags far more (``anomalies_common``: SKAB, 34 % against WSN's 5 % and the synthetic
    fleet's 2 %), its "normal" rows hold most anomalies and the rule's classes carry more, so
    the discriminant of those goes first.

    Not by the devices' prequential counts per detector: a supervised model scores each
    kind of anomaly before it has learnt it, so where anomalies come in bursts those
    counts rank it last (WSN: MCC 0.08 on the training devices' fresh readings, 0.81 on
    held-out devices)."""
    if discriminant and (discriminant_labels == "ground_truth" or anomalies_common):
        return "discriminant"
    if label_free:
        return "label_free"
    return "discriminant" if discriminant else "zscore"


def rule_flag_share(state: ServerState) -> float:
    """The share of the fleet's unlabelled rows that the z-score rule flagged (0 without any)."""
    flagged, normal = state.pseudo_anomalous.count, state.pseudo_normal.count
    return flagged / (flagged + normal) if flagged + normal > 0 else 0.0


class Federation:
    """The server's round: :meth:`add` updates, :meth:`due` says when, :meth:`close` makes
    the next version. Deterministic: the same updates in the same order give the same
    versions."""

    def __init__(self, config: FederationConfig, state: ServerState | None = None) -> None:
        self.config = config
        self.state = state or ServerState()
        self.rule = config.make_rule()
        self.momentum = config.momentum()
        self.network = Network(N_POOLED, config.hidden)
        self.buffer: dict[str, LocalRound] = {}
        self.merged: dict[str, list[LocalRound]] = {}
        self.opened_ms: int | None = None
        self.last_seen: dict[str, int] = {}

    @property
    def version(self) -> int:
        return self.state.current.version if self.state.current else 0

    def add(self, update: LocalRound) -> None:
        if update.params.shape != (self.network.size,):
            raise ValueError(
                f"{update.params.size} parameters, the global network has {self.network.size}"
            )
        if update.base_version > self.version:
            raise ValueError(
                f"base version {update.base_version} is newer than the latest {self.version}"
            )
        check_statistics(update)
        update = bounded(update, self.config.max_samples)
        self.last_seen[update.device_id] = max(
            update.timestamp_ms, self.last_seen.get(update.device_id, update.timestamp_ms)
        )
        if self.opened_ms is None:
            self.opened_ms = update.timestamp_ms
        previous = self.buffer.get(update.device_id)
        self.buffer[update.device_id] = update if previous is None else merge(previous, update)
        self.merged.setdefault(update.device_id, []).append(update)

    def active_devices(self, now_ms: int) -> int:
        horizon = now_ms - self.config.active_window_ms
        return sum(1 for seen in self.last_seen.values() if seen >= horizon)

    def due(self, now_ms: int) -> bool:
        if not self.buffer:
            return False
        wanted = min(self.config.min_devices, max(self.active_devices(now_ms), 1))
        if len(self.buffer) >= wanted:
            return True
        return now_ms - (self.opened_ms or now_ms) >= self.config.round_window_ms

    def close(self, now_ms: int) -> Version:
        if not self.buffer:
            raise ValueError("no update to make a version from")
        updates = tuple(self.buffer[d] for d in sorted(self.buffer))
        state = self.state
        reference = state.current.params if state.current else self.network.initial()
        batch = aggregation.Updates(
            params=np.vstack([u.params for u in updates]),
            samples=np.array([u.samples for u in updates], dtype=np.float64),
            staleness=np.array([self.version - u.base_version for u in updates]),
        )
        proposal = self.rule.combine(batch, reference)
        share = self._participation(len(updates), now_ms)
        combined, state.velocity = self.momentum.step(
            reference, reference + share * (proposal - reference), state.velocity
        )
        weights = tuple(float(w) for w in self.rule.weights(batch))
        self._calibrate(updates)
        prequential: dict[int, Confusion] = {}
        for u in updates:
            if u.scored_version:
                prequential[u.scored_version] = (
                    prequential.get(u.scored_version, Confusion(0, 0, 0, 0)) + u.prequential
                )
        samples = np.array([u.samples for u in updates], dtype=np.float64)
        ground_truth = samples[[u.label_source == "ground_truth" for u in updates]].sum()
        threshold = self._supervised_threshold()
        normal_threshold = self._label_free_threshold()
        labels, classes = self._discriminant_classes()
        discriminant = detectors.discriminant(*classes)
        discriminant_threshold = self._discriminant_threshold(classes)
        new = GlobalParams(
            version=self.version + 1,
            hidden=self.config.hidden,
            params=combined,
            threshold=threshold,
            normal=label_free_statistics(state.normal, state.pseudo_normal),
            normal_threshold=normal_threshold,
            label_source="ground_truth" if ground_truth * 2 >= samples.sum() else "pseudo",
            detector=choose_detector(
                discriminant=discriminant is not None and discriminant_threshold is not None,
                label_free=normal_threshold is not None,
                discriminant_labels=labels,
                anomalies_common=rule_flag_share(state)
                > COMMON_ANOMALIES * self.config.contamination,
            ),
            discriminant=discriminant,
            discriminant_threshold=discriminant_threshold,
            discriminant_labels=labels,
        )
        version = Version(
            model=new,
            updates=updates,
            weights=weights,
            prequential=prequential,
            num_devices=len(updates),
            accuracy=float(np.average([u.accuracy for u in updates], weights=samples)),
        )
        state.current = new
        self.buffer, self.merged, self.opened_ms = {}, {}, None
        return version

    def _participation(self, devices: int, now_ms: int) -> float:
        """The share of an expected round that this one is: a version made by fewer devices
        than usually take part (the fleet's others silent for now) moves the model that much
        less, so that one device's data cannot swing a fleet's model on its own."""
        horizon = now_ms - self.config.fleet_memory_ms
        known = sum(1 for seen in self.last_seen.values() if seen >= horizon)
        expected = min(self.config.min_devices, max(known, 1))
        return min(1.0, devices / expected)

    def _calibrate(self, updates: tuple[LocalRound, ...]) -> None:
        s, c = self.state, self.config
        for name in HISTOGRAMS:
            counted = updates
            if name in DISCRIMINANT_HISTOGRAMS:  # scores of a discriminant of other classes
                counted = [u for u in updates if u.scored_version >= s.discriminant_since]
            fresh = sum((getattr(u, name) for u in counted), np.zeros_like(getattr(s, name)))
            setattr(s, name, getattr(s, name) * c.calibration_decay + fresh)
        for name in STATISTICS:
            fresh = NormalStats.empty(N_FEATURES)
            for u in updates:
                fresh = fresh + getattr(u, name)
            setattr(s, name, getattr(s, name).scaled(c.normal_decay) + fresh)

    def _label_free_threshold(self) -> float | None:
        """Where the devices' readings carry labels, the edge with the best Matthews correlation
        on them; else the score that flags ``contamination`` of all readings (an unlabelled
        fleet has nothing better than an assumed anomaly share)."""
        s = self.state
        labelled = detectors.best_mcc_threshold(s.hist_normal_pos, s.hist_normal_neg, NORMAL_EDGES)
        if labelled is not None:
            return labelled
        if not s.hist_normal.sum():
            return None
        return detectors.quantile_threshold(s.hist_normal, NORMAL_EDGES, self.config.contamination)

    def _discriminant_classes(self) -> tuple[str, tuple[NormalStats, NormalStats]]:
        """Which labels the next discriminant separates, and their classes' statistics: the
        stream's once the fleet has labelled anomalies; before that (an unlabelled fleet: for
        ever) the z-score rule's classes of every normal and flagged row. Fisher's direction
        between the rule's classes is the rule made multivariate: it weighs every feature of
        the rule's anomalies against the fleet's covariance, where the rule looks at one |z|.

        When the labels change, the discriminant's faded histograms (scores counted by the
        other labels) are dropped, and only scores of the new versions count from then on."""
        s = self.state
        if s.anomalous.count >= detectors.MIN_CLASS_ROWS:
            labels, classes = "ground_truth", (s.normal, s.anomalous)
        else:
            normal = label_free_statistics(s.normal, s.pseudo_normal)
            labels, classes = "pseudo", (normal, s.pseudo_anomalous)
        previous = s.current.discriminant_labels if s.current else labels
        if labels != previous:
            for name in DISCRIMINANT_HISTOGRAMS:
                setattr(s, name, np.zeros_like(getattr(s, name)))
            s.discriminant_since = self.version + 1
        return labels, classes

    def _discriminant_threshold(self, classes: tuple[NormalStats, NormalStats]) -> float | None:
        """The MCC-best edge of the discriminant's fresh scores; until devices have reported
        any, the classes' Bayes boundary (None before the first discriminant)."""
        s = self.state
        found = detectors.best_mcc_threshold(s.hist_disc_pos, s.hist_disc_neg, LOGIT_EDGES)
        if found is not None:
            return found
        return detectors.discriminant_boundary(*classes)

    def _supervised_threshold(self) -> float | None:
        found = detectors.best_mcc_threshold(self.state.hist_pos, self.state.hist_neg, LOGIT_EDGES)
        if found is not None:
            return found
        return self.state.current.threshold if self.state.current else None


# --- the version's discriminant as the service stores it (server_state -> 'discriminant') -----


def discriminant_json(model: GlobalParams | None) -> dict[str, Any] | None:
    """The discriminant block of ``federated_models.server_state``: what the service reads back
    on restart and the Spark evaluation scores held-out devices with."""
    if model is None or model.discriminant is None:
        return None
    return {
        "params": model.discriminant.tolist(),
        "threshold": model.discriminant_threshold,
        "labels": model.discriminant_labels,
    }


def saved_discriminant(saved: Any) -> tuple[np.ndarray | None, float | None, str]:
    """The discriminant, its threshold and its classes' labels from a saved state (absent
    before the discriminant existed: none; labels absent before the rule's classes could make
    one: the stream's). ValueError for a malformed block."""
    found = saved.get("discriminant") if isinstance(saved, Mapping) else None
    if not found:
        return None, None, "ground_truth"
    try:
        params = np.asarray(found["params"], dtype=np.float64)
        threshold = found.get("threshold")
        labels = str(found.get("labels", "ground_truth"))
        return params, None if threshold is None else float(threshold), labels
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"malformed discriminant ({exc})") from None
