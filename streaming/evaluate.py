"""``flead evaluate``: how well would FLEAD detect anomalies on *this* labelled data set?

The federation is replayed in-process with the functions the streaming tier runs — the device
learner (:mod:`streaming.learner`) and the server's round (:mod:`streaming.federation`) — in
event-time order of messages of ``batch`` consecutive readings of a device, as the replay
producer sends them. Devices are split into folds (every device held out once; by default
leave-one-device-out below 20 devices, else 5 folds): each fold's federation runs on the other
devices, and its newest global version scores the held-out devices' readings it never saw.

Methods, all scored on the same rows, every reading of the held-out devices:

- ``majority``: the majority class of all those rows; ``zscore``: the plain rule |z| > 2.5;
- ``federated``: what a device running the defaults does: the version's default detector
  (``auto``: the one the server chose), or, where the device's own labelled readings have
  shown its own discriminant to be better, that (``personalise``; test-then-train on the
  held-out device's labels, as ``local_only``); ``global``: the version's default detector
  alone;
- ``supervised`` / ``linear`` / ``discriminant``: each model family of the federation
  (``linear`` is its own federation with no hidden layer);
- ``label_free``: a federation of the same devices with their labels stripped, scored by its
  default detector: what an unlabelled fleet would get; ``label_free_gaussian`` and
  ``label_free_discriminant``: the same federation's two label-free detectors, the Gaussian
  model of normal rows and the discriminant of the z-score rule's classes;
- ``local_only``: each held-out device learns alone from its own labelled stream,
  test-then-train (each reading scored before the device trains on it);
- ``central``: one network trained on all training devices' rows pooled (what federation
  approximates without moving data); ``central_discriminant``: the discriminant of those pooled
  rows, its threshold MCC-best on them: what the federated default would be if the rows
  were moved, so the two side by side are what federation itself costs.

``prequential`` is reported beside them, on other rows: every training device's readings as
scored by the version the device held before it trained on them (test-then-train).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from streaming import learner
from streaming.federation import Federation, FederationConfig
from streaming.learner import Detector, GlobalParams, LearnerConfig
from streaming.model import detectors
from streaming.model.detectors import LOGIT_EDGES, NormalStats
from streaming.model.features import Scored
from streaming.model.metrics import Confusion, confusion, majority_baseline

METHODS = (
    "majority",
    "zscore",
    "federated",
    "global",
    "supervised",
    "linear",
    "discriminant",
    "label_free",
    "label_free_gaussian",
    "label_free_discriminant",
    "local_only",
    "central",
    "central_discriminant",
)


@dataclass
class DeviceSeries:
    """One device's readings in event time, cut into the messages the replay would send."""

    device_id: str
    channels: tuple[str, ...]
    timestamps: np.ndarray  # int64 ms
    values: np.ndarray  # (n, C)
    labels: np.ndarray  # int64: 1, 0, or -1 for unlabelled
    scored: list[Scored] = field(default_factory=list)  # per message
    bounds: list[tuple[int, int]] = field(default_factory=list)  # message row ranges

    def __len__(self) -> int:
        return len(self.timestamps)


@dataclass
class Fleet:
    devices: dict[str, DeviceSeries]
    skipped: dict[str, int]  # reason → readings left out

    @property
    def readings(self) -> int:
        return sum(len(d) for d in self.devices.values())


def collect(readings: Iterable, batch: int = 50) -> Fleet:
    """Group readings by device; a reading whose channels differ from its device's first is
    left out and counted (the stream would dead-letter it)."""
    rows: dict[str, tuple[tuple[str, ...], list, list, list]] = {}
    skipped: dict[str, int] = {}
    for r in readings:
        entry = rows.get(r.device_id)
        if entry is None:
            entry = rows[r.device_id] = (r.channels, [], [], [])
        if r.channels != entry[0]:
            skipped["channels differ from the device's first reading"] = (
                skipped.get("channels differ from the device's first reading", 0) + 1
            )
            continue
        entry[1].append(r.timestamp_ms)
        entry[2].append(r.values)
        entry[3].append(-1 if r.label is None else r.label)
    devices = {}
    for device_id, (channels, ts, values, labels) in rows.items():
        n = len(ts)
        series = DeviceSeries(
            device_id,
            channels,
            np.asarray(ts, dtype=np.int64),
            np.asarray(values, dtype=np.float64).reshape(n, len(channels)),
            np.asarray(labels, dtype=np.int64),
        )
        series.bounds = [(i, min(i + batch, n)) for i in range(0, n, batch)]
        devices[device_id] = series
    return Fleet(devices, skipped)


def featurize(fleet: Fleet, config: LearnerConfig) -> None:
    """Each device's features, message by message, with the learner's own scoring function
    (they do not depend on the fold: a device's features are its own history's)."""
    for series in fleet.devices.values():
        state = learner.DeviceState()
        series.scored = []
        for lo, hi in series.bounds:
            X = learner.readings_matrix(state, series.channels, series.values[lo:hi])
            series.scored.append(learner.score(state, X, config))


def _messages(devices: list[DeviceSeries]) -> list[tuple[int, str, int]]:
    """(time of the message's last reading, device, message index), in event-time order."""
    order = [
        (int(d.timestamps[hi - 1]), d.device_id, k)
        for d in devices
        for k, (_, hi) in enumerate(d.bounds)
    ]
    order.sort()
    return order


ATTACKS = ("scaled_x20", "sign_flipped", "inflated_samples", "all")
"""Poisoning by a share of the training devices, of the network and of the statistics alike:
the round's change from the server's model ×20 (a statistics block's mean moved ×20 away from
the server's, its spread ×20), or reversed; or every count it claims (samples, statistics,
score histograms) inflated to 2·10⁹; ``all``: reversed ×20 with 2·10⁹."""

INFLATED = 2_000_000_000


def poisoned(update: learner.LocalRound, federation: Federation, attack: str) -> learner.LocalRound:
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; valid: {', '.join(ATTACKS)}")
    current = federation.state.current
    start = current.params if current is not None else federation.network.initial()
    step = {"scaled_x20": 20.0, "sign_flipped": -1.0, "all": -20.0}.get(attack)
    if step is not None:
        server = federation.state
        update = replace(
            update,
            params=start + step * (update.params - start),
            **{
                name: _moved(getattr(update, name), getattr(server, name).mean, step)
                for name in learner.STATISTICS
            },
        )
    if attack in ("inflated_samples", "all"):
        update = _inflated(update, INFLATED / max(update.samples, 1))
    return update


def _moved(stats: NormalStats, reference: np.ndarray, step: float) -> NormalStats:
    if stats.count == 0:
        return stats
    mean = reference + step * (stats.mean - reference)
    return NormalStats(stats.count, mean, stats.comoment * step * step)


def _inflated(update: learner.LocalRound, factor: float) -> learner.LocalRound:
    return replace(
        update,
        samples=INFLATED,
        **{name: getattr(update, name).scaled(factor) for name in learner.STATISTICS},
        **{name: getattr(update, name) * factor for name in learner.HISTOGRAMS},
    )


@dataclass
class FederationRun:
    model: GlobalParams | None
    versions: int
    prequential_by_version: dict[int, Confusion]  # the counts per version that scored them
    training_rows: tuple[np.ndarray, np.ndarray]  # pooled warm (features, labels) for central
    update_bytes: int
    model_bytes: int
    flags: dict[str, np.ndarray]  # per device, the decisions it made as the stream went

    @property
    def prequential(self) -> Confusion:
        """Every version's prequential counts together."""
        return sum(self.prequential_by_version.values(), Confusion(0, 0, 0, 0))


def federate(
    devices: list[DeviceSeries],
    config: LearnerConfig,
    fed_config: FederationConfig,
    strip_labels: bool = False,
    encode_sizes: bool = False,
    collect_flags: bool = False,
    attack: str | None = None,
    attack_fraction: float = 0.2,
) -> FederationRun:
    """Replay the training devices' messages through the learner and the server's round.

    ``attack`` (one of :data:`ATTACKS`) makes an ``attack_fraction`` of the devices (chosen by
    hash) send poisoned rounds, to measure what the aggregation rule withstands."""
    from streaming.messages import encode_global_params, encode_local_round

    by_id = {d.device_id: d for d in devices}
    states = {d.device_id: learner.DeviceState() for d in devices}
    federation = Federation(fed_config)
    detector = Detector(None, config)
    by_version: dict[int, Confusion] = {}
    update_bytes = model_bytes = 0
    pooled_X, pooled_y = [], []
    flags: dict[str, list[np.ndarray]] = {d.device_id: [] for d in devices}
    for ts, device_id, k in _messages(devices):
        series = by_id[device_id]
        lo, hi = series.bounds[k]
        labels = series.labels[lo:hi]
        if strip_labels:
            labels = np.full(hi - lo, -1, dtype=np.int64)
        state = states[device_id]
        scored = series.scored[k]
        if collect_flags:
            flags[device_id].append(detector.decide(scored).flagged)
        learner.record(state, scored, labels, detector, config)
        while learner.round_due(state, config):
            update = learner.train_round(state, device_id, federation.state.current, config, ts)
            if attack and learner.is_held_out(device_id, attack_fraction, seed=7):
                update = poisoned(update, federation, attack)
            if encode_sizes:
                update_bytes += len(encode_local_round(update))
            try:
                federation.add(update)
            except ValueError:
                if not attack:
                    raise  # an honest device's round is never refused
                # refused, as the service dead-letters it
            if federation.due(ts):
                version = federation.close(ts)
                for scored_by, counts in version.prequential.items():
                    earlier = by_version.get(scored_by, Confusion(0, 0, 0, 0))
                    by_version[scored_by] = earlier + counts
                sent = learner.as_sent(version.model, config.detector)
                detector = Detector(sent, config)
                if encode_sizes:
                    # A fixed key: only the signature's size matters here.
                    signed = encode_global_params(sent, ts, key=b"wire-size")
                    model_bytes += len(signed) * len(devices)
        if not strip_labels:
            warm = scored.warm & (labels >= 0)
            pooled_X.append(scored.features[warm])
            pooled_y.append(labels[warm])
    X = np.vstack(pooled_X) if pooled_X else np.zeros((0, 0))
    y = np.concatenate(pooled_y) if pooled_y else np.zeros(0, dtype=np.int64)
    return FederationRun(
        federation.state.current,
        federation.version,
        by_version,
        (X, y),
        update_bytes,
        model_bytes,
        {d: np.concatenate(f) if f else np.zeros(0, bool) for d, f in flags.items()},
    )


def _decisions(series: DeviceSeries, detector: Detector) -> np.ndarray:
    return np.concatenate([detector.decide(s).flagged for s in series.scored])


def _personalised(series: DeviceSeries, detector: Detector, config: LearnerConfig) -> np.ndarray:
    """The device's decisions as it goes: the global version's, or its own model's where that
    has proven better on the labelled readings before (``learner.decide``)."""
    state = learner.DeviceState()
    flags = []
    for scored, (lo, hi) in zip(series.scored, series.bounds, strict=True):
        labels = series.labels[lo:hi]
        flags.append(learner.decide(state, scored, labels, detector, config, False).flagged)
    return np.concatenate(flags)


def _zscore(series: DeviceSeries, config: LearnerConfig) -> np.ndarray:
    rows = []
    for s in series.scored:
        rows.append(s.warm & (np.abs(s.z).max(axis=1) > config.anomaly_z))
    return np.concatenate(rows)


def _features(series: DeviceSeries) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.vstack([s.features for s in series.scored]),
        np.concatenate([s.warm for s in series.scored]),
    )


def _fit(
    config: LearnerConfig, X: np.ndarray, y: np.ndarray, epochs: int, seed: int
) -> GlobalParams | None:
    """A network trained on rows in one place, with its MCC-best threshold on those rows."""
    if X.shape[0] == 0 or not (y == 1).any():
        return None
    network = config.network
    result = detectors.train(
        network,
        network.initial(),
        X,
        y,
        learning_rate=config.learning_rate,
        epochs=epochs,
        batch_size=config.batch_size,
        seed=seed,
    )
    threshold = _in_sample_threshold(network.logits(result.params, X), y)
    return GlobalParams(
        0, config.hidden, result.params, threshold, _NO_NORMAL, None, "ground_truth"
    )


def _in_sample_threshold(scores: np.ndarray, y: np.ndarray) -> float | None:
    """The MCC-best edge of scores of the very rows a central model was made from."""
    return detectors.best_mcc_threshold(
        detectors.histogram(scores[y == 1], LOGIT_EDGES),
        detectors.histogram(scores[y == 0], LOGIT_EDGES),
        LOGIT_EDGES,
    )


_NO_NORMAL = detectors.NormalStats.empty()


def _local_only(
    series: DeviceSeries, config: LearnerConfig, fed_config: FederationConfig
) -> np.ndarray:
    """The device federating with itself alone: every round is its own next model."""
    alone = replace(fed_config, min_devices=1)
    return federate([series], config, alone, collect_flags=True).flags[series.device_id]


def folds_of(device_ids: list[str], folds: int | None, seed: int) -> list[list[str]]:
    """Devices split into folds: every device in exactly one. ``None``: leave-one-device-out
    below 20 devices, else 5 folds."""
    ids = sorted(device_ids)
    if folds is None:
        folds = len(ids) if len(ids) < 20 else 5
    folds = max(2, min(folds, len(ids)))
    order = np.random.default_rng(seed).permutation(len(ids))
    return [[ids[i] for i in order[k::folds]] for k in range(folds)]


@dataclass
class Report:
    source: str
    devices: int
    readings: int
    channels: int
    labelled_share: float
    anomaly_share: float
    folds: int
    methods: dict[str, Confusion]
    prequential: Confusion
    versions: list[int]
    seconds: float
    wire: dict[str, float]
    skipped: dict[str, int]

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "devices": self.devices,
            "readings": self.readings,
            "channels": self.channels,
            "labelled_share": self.labelled_share,
            "anomaly_share": self.anomaly_share,
            "folds": self.folds,
            "evaluated_rows": "every labelled reading of each held-out device",
            "methods": {name: c.as_dict() for name, c in self.methods.items()},
            "prequential": self.prequential.as_dict(),
            "global_versions_per_fold": self.versions,
            "wire": self.wire,
            "skipped_readings": self.skipped,
            "seconds": round(self.seconds, 2),
        }

    def table(self) -> str:
        width = max(len(name) for name in (*self.methods, "prequential"))
        head = (
            f"{'method':<{width}} {'rows':>8} {'acc':>6} {'prec':>6} {'recall':>6} {'F1':>6} "
            f"{'MCC':>6}"
        )
        lines = [
            f"{self.source}: {self.devices} devices, {self.readings} readings, "
            f"{self.channels} channel(s), {self.anomaly_share:.1%} anomalous, "
            f"{self.folds} folds ({self.seconds:.0f} s)",
            head,
            "-" * len(head),
        ]
        rows = [*self.methods.items(), ("prequential", self.prequential)]
        for name, c in rows:
            lines.append(
                f"{name:<{width}} {c.samples:>8} {c.accuracy:>6.3f} {c.precision:>6.3f} "
                f"{c.recall:>6.3f} {c.f1:>6.3f} {c.mcc:>6.3f}"
            )
        w = self.wire
        lines.append(
            f"wire: local updates {w['update_bytes']:,} B + global models {w['model_bytes']:,} B"
            f" vs raw readings {w['raw_bytes']:,} B ({w['ratio']:.2f} of raw)"
        )
        lines.append(f"global versions per fold: {self.versions}")
        return "\n".join(lines)


def evaluate(
    readings: Iterable,
    *,
    source: str = "",
    folds: int | None = None,
    config: LearnerConfig | None = None,
    fed_config: FederationConfig | None = None,
    batch: int = 50,
    methods: tuple[str, ...] = METHODS,
    progress: bool = False,
    attack: str | None = None,
) -> Report:
    """Run the whole evaluation (see the module doc) and return its report."""
    from streaming.messages import encode_reading

    started = time.monotonic()
    config = config or LearnerConfig()
    fed_config = fed_config or FederationConfig(hidden=config.hidden)
    readings = list(readings)
    raw_bytes = sum(len(encode_reading(r)) for r in readings)
    fleet = collect(readings, batch)
    del readings
    if len(fleet.devices) < 2:
        raise ValueError(f"need at least 2 devices to hold one out, got {len(fleet.devices)}")
    if not any((d.labels >= 0).any() for d in fleet.devices.values()):
        raise ValueError(
            "no labelled reading: every method is scored against labels (0 normal, 1 anomaly; "
            "a CSV's 'label' column)"
        )
    featurize(fleet, config)
    splits = folds_of(list(fleet.devices), folds, config.seed)
    totals = {m: Confusion(0, 0, 0, 0) for m in methods}
    prequential = Confusion(0, 0, 0, 0)
    versions, wire = [], {"update_bytes": 0, "model_bytes": 0}
    evaluated: list[np.ndarray] = []
    for k, held in enumerate(splits):
        if progress:
            print(f"fold {k + 1}/{len(splits)}: holding out {len(held)} device(s)", flush=True)
        train = [d for i, d in fleet.devices.items() if i not in set(held)]
        runs = _fold_runs(train, config, fed_config, methods, attack)
        versions.append(runs["federated"].versions)
        prequential = prequential + runs["federated"].prequential
        wire["update_bytes"] += runs["federated"].update_bytes
        wire["model_bytes"] += runs["federated"].model_bytes
        detectors_by_method = _detectors(runs, config)
        for device_id in held:
            series = fleet.devices[device_id]
            labelled = series.labels >= 0
            y = series.labels[labelled]
            evaluated.append(y)
            for m in methods:
                if m == "majority":
                    continue
                if m == "zscore":
                    flagged = _zscore(series, config)
                elif m == "local_only":
                    flagged = _local_only(series, config, fed_config)
                elif m == "federated":
                    flagged = _personalised(series, detectors_by_method[m], config)
                else:
                    flagged = _decisions(series, detectors_by_method[m])
                totals[m] = totals[m] + confusion(y, flagged[labelled].astype(np.int64))
    if "majority" in methods:
        totals["majority"] = majority_baseline(np.concatenate(evaluated))
    labels = np.concatenate([d.labels for d in fleet.devices.values()])
    wire["raw_bytes"] = raw_bytes
    wire["ratio"] = (wire["update_bytes"] + wire["model_bytes"]) / len(splits) / max(raw_bytes, 1)
    return Report(
        source=source,
        devices=len(fleet.devices),
        readings=fleet.readings,
        channels=max(len(d.channels) for d in fleet.devices.values()),
        labelled_share=float(np.mean(labels >= 0)),
        anomaly_share=float(np.mean(labels[labels >= 0] == 1)) if (labels >= 0).any() else 0.0,
        folds=len(splits),
        methods=totals,
        prequential=prequential,
        versions=versions,
        seconds=time.monotonic() - started,
        wire=wire,
        skipped=fleet.skipped,
    )


def _fold_runs(
    train: list[DeviceSeries],
    config: LearnerConfig,
    fed_config: FederationConfig,
    methods: tuple[str, ...],
    attack: str | None = None,
) -> dict[str, FederationRun]:
    # The network family is reported from the default federation's versions: its devices
    # train the network as well (the default detector's figures do not depend on it).
    main = replace(config, train_network=True) if "supervised" in methods else config
    runs = {"federated": federate(train, main, fed_config, encode_sizes=True, attack=attack)}
    if "linear" in methods:
        linear = replace(config, hidden=0, train_network=True)
        runs["linear"] = federate(train, linear, replace(fed_config, hidden=0))
    if {"label_free", "label_free_gaussian", "label_free_discriminant"} & set(methods):
        runs["label_free"] = federate(train, config, fed_config, strip_labels=True)
    return runs


def _detectors(runs: dict[str, FederationRun], config: LearnerConfig) -> dict[str, Detector]:
    main = runs["federated"]
    found = {
        "federated": Detector(main.model, config),
        "global": Detector(main.model, config),
        "supervised": Detector(main.model, replace(config, detector="supervised")),
        "discriminant": Detector(main.model, replace(config, detector="discriminant")),
    }
    if "linear" in runs:
        found["linear"] = Detector(
            runs["linear"].model, replace(config, hidden=0, detector="supervised")
        )
    if "label_free" in runs:
        unlabelled = runs["label_free"].model
        found["label_free"] = Detector(unlabelled, replace(config, detector="auto"))
        found["label_free_gaussian"] = Detector(unlabelled, replace(config, detector="label_free"))
        found["label_free_discriminant"] = Detector(
            unlabelled, replace(config, detector="discriminant")
        )
    X, y = main.training_rows
    central = _fit(config, X, y, epochs=max(config.epochs * 5, 10), seed=11) if X.size else None
    found["central"] = Detector(central, replace(config, detector="supervised"))
    found["central_discriminant"] = Detector(
        _pooled_discriminant(X, y), replace(config, detector="discriminant")
    )
    return found


def _pooled_discriminant(X: np.ndarray, y: np.ndarray) -> GlobalParams | None:
    """The discriminant of rows in one place, with its MCC-best threshold on those rows."""
    if X.size == 0:
        return None
    params = detectors.discriminant(NormalStats.of(X[y == 0]), NormalStats.of(X[y == 1]))
    if params is None:
        return None
    threshold = _in_sample_threshold(detectors.discriminant_scores(params, X), y)
    return GlobalParams(
        0, 0, np.zeros(0), None, _NO_NORMAL, None, "ground_truth", "discriminant", params, threshold
    )


def report_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2)


def iter_with_progress(items: Iterable, every: int = 100_000) -> Iterator:
    for i, item in enumerate(items, 1):
        if i % every == 0:
            print(f"read {i:,} readings", flush=True)
        yield item
