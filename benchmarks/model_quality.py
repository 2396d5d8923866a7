"""Model quality on held-out devices: the federated global model against its baselines.

The federation is replayed in-process with the very functions the streaming tier runs
(:mod:`streaming.edge` for each device's learner, :func:`streaming.fedavg.combine` for the
service), in event-time order, so a device starts each round from the newest global model
published before it. Evaluation data never trained a global model: the readings of the held-out
devices (:func:`streaming.edge.is_held_out`). To compare with local-only models, which need some
of a device's own data to learn from, every method is scored on the *later half* of each held-out
device's readings; local-only models learn from the earlier half.

Compared, on the same rows: the majority class, the plain z-score rule, the federated model on
the scale-free features and on the original ``[mean, std, z]``, local-only models, a centrally
trained model on the same features, and the federation under model poisoning (20 % of training
devices sending scaled or sign-flipped weights) for every aggregation strategy.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import numpy as np

from benchmarks.common import write_result
from flead.config import load_settings
from streaming import edge, model, sources
from streaming.fedavg import FedAvgConfig, combine
from streaming.messages import GlobalUpdate, Reading

ATTACKS = {"none": None, "scaled_x20": 20.0, "sign_flipped": -1.0}


@dataclass
class Split:
    """Training devices' readings in event-time order, and held-out devices' series."""

    training: list[Reading]
    held_out: dict[str, tuple[np.ndarray, np.ndarray]]  # device → (values, labels) in time order


def split(readings: list[Reading], fraction: float, seed: int) -> Split:
    training, held = [], defaultdict(list)
    for reading in readings:
        if edge.is_held_out(reading.device_id, fraction, seed):
            held[reading.device_id].append(reading)
        else:
            training.append(reading)
    series = {
        device: (np.array([r.value for r in rs]), np.array([r.label or 0 for r in rs]))
        for device, rs in held.items()
    }
    return Split(training, series)


def federate(
    training: list[Reading],
    config: edge.EdgeConfig,
    fedavg: FedAvgConfig,
    attackers: frozenset[str] = frozenset(),
    attack_scale: float | None = None,
) -> tuple[GlobalUpdate | None, int]:
    """Run the federation over ``training``; return the newest global model and #versions."""
    states: dict[str, edge.DeviceState] = defaultdict(edge.DeviceState)
    current: GlobalUpdate | None = None
    buffer = []
    now = datetime.now(UTC)
    for reading in training:
        state = states[reading.device_id]
        edge.observe(state, reading, config, trains=True)
        if not edge.round_due(state, config):
            continue
        update = edge.train_round(state, reading.device_id, current, config, now)
        if reading.device_id in attackers and attack_scale is not None:
            update = replace(
                update,
                weights=tuple(attack_scale * w for w in update.weights),
                bias=attack_scale * update.bias,
            )
        buffer.append(update)
        if len({u.device_id for u in buffer}) >= fedavg.min_devices:
            combined, _ = combine(buffer, current, fedavg)
            version = (current.version if current else 0) + 1
            current = GlobalUpdate(
                version,
                version,
                tuple(combined.weights.tolist()),
                float(combined.bias),
                None,
                fedavg.min_devices,
                fedavg.strategy,
                now,
            )
            buffer = []
    return current, (current.version if current else 0)


def later_half(values: np.ndarray, feature_set: str) -> tuple[np.ndarray, slice]:
    """Features of a whole series (history counts) and the slice of its later half."""
    return model.series_features(values, feature_set), slice(len(values) // 2, None)


def evaluate(split_data: Split, predict) -> model.Confusion:
    """Sum of confusions over held-out devices' later halves; ``predict(device, values,
    labels, half) → 0/1 predictions for values[half]``."""
    total = model.Confusion(0, 0, 0, 0)
    for device, (values, labels) in split_data.held_out.items():
        half = slice(len(values) // 2, None)
        total = total + model.confusion(labels[half], predict(device, values, labels, half))
    return total


def global_predictor(update: GlobalUpdate | None, feature_set: str):
    def predict(_device, values, _labels, half):
        if update is None:
            return np.zeros(len(values[half]), dtype=int)
        linear = model.LinearModel(np.asarray(update.weights), update.bias)
        return model.predict(linear, model.series_features(values, feature_set)[half])

    return predict


def zscore_predictor(config: edge.EdgeConfig):
    def predict(_device, values, _labels, half):
        return (np.abs(model.series_z_scores(values)[half]) > config.anomaly_z).astype(int)

    return predict


def local_only_predictor(config: edge.EdgeConfig):
    """Each held-out device learns from its own earlier half only (rounds of train_every)."""

    def predict(device, values, labels, half):
        X = model.series_features(values, config.feature_set)
        start = model.WARMUP
        end = half.start
        local = model.LinearModel.zeros(X.shape[1])
        for round_start in range(start, end, config.train_every):
            rows = slice(round_start, min(round_start + config.train_every, end))
            if rows.stop - rows.start < config.min_round_samples:
                break
            local, _ = model.sgd_round(
                local,
                X[rows],
                labels[rows],
                learning_rate=config.learning_rate,
                epochs=config.epochs,
                positive_weight=config.positive_weight or None,
                seed=round_start,
            )
        return model.predict(local, X[half])

    return predict


def central_model(training: list[Reading], config: edge.EdgeConfig, epochs: int = 3):
    """One model on all training devices' rows pooled: the federated model's upper bound."""
    by_device = defaultdict(list)
    for reading in training:
        by_device[reading.device_id].append(reading)
    X_parts, y_parts = [], []
    for rs in by_device.values():
        values = np.array([r.value for r in rs])
        X_parts.append(model.series_features(values, config.feature_set)[model.WARMUP :])
        z = model.series_z_scores(values)[model.WARMUP :]
        labels = [r.label for r in rs][model.WARMUP :]
        y_parts.append(
            np.array(
                [
                    model.pseudo_label(zi, config.anomaly_z) if lab is None else lab
                    for lab, zi in zip(labels, z, strict=True)
                ]
            )
        )
    X, y = np.vstack(X_parts), np.concatenate(y_parts)
    central, _ = model.sgd_round(
        model.LinearModel.zeros(X.shape[1]),
        X,
        y,
        learning_rate=config.learning_rate,
        epochs=epochs,
        positive_weight=config.positive_weight or None,
        seed=1,
    )
    return GlobalUpdate(
        1,
        1,
        tuple(central.weights.tolist()),
        float(central.bias),
        None,
        1,
        "central",
        datetime.now(UTC),
    )


def row(name: str, confusion: model.Confusion, **extra) -> dict:
    return {"method": name, **confusion.as_dict(), **extra}


def assess(name: str, readings: list[Reading], settings, attacks: bool) -> dict:
    config = edge.EdgeConfig.from_settings(settings)
    fedavg = FedAvgConfig.from_settings(settings)
    data = split(readings, settings.holdout_fraction, settings.seed)
    started = time.perf_counter()
    rows: list[dict] = []
    labels = np.concatenate([lab[len(lab) // 2 :] for _, lab in data.held_out.values()])
    rows.append(row("majority_class", model.majority_baseline(labels)))
    rows.append(row("z_score_rule", evaluate(data, zscore_predictor(config))))
    for feature_set in ("scale_free", "original"):
        fs_config = replace(config, feature_set=feature_set)
        fs_fedavg = replace(fedavg, feature_count=model.feature_count(feature_set))
        newest, versions = federate(data.training, fs_config, fs_fedavg)
        rows.append(
            row(
                f"federated_{feature_set}",
                evaluate(data, global_predictor(newest, feature_set)),
                global_version=versions,
            )
        )
    rows.append(row("local_only", evaluate(data, local_only_predictor(config))))
    rows.append(
        row(
            "central",
            evaluate(
                data, global_predictor(central_model(data.training, config), config.feature_set)
            ),
        )
    )
    poisoning: list[dict] = []
    if attacks:
        devices = sorted({r.device_id for r in data.training})
        rng = np.random.default_rng(settings.seed)
        attackers = frozenset(rng.choice(devices, size=len(devices) // 5, replace=False))
        for attack, scale in ATTACKS.items():
            for strategy in sorted(model.STRATEGIES):
                newest, versions = federate(
                    data.training,
                    config,
                    replace(fedavg, strategy=strategy),
                    attackers if scale else frozenset(),
                    scale,
                )
                result = evaluate(data, global_predictor(newest, config.feature_set))
                poisoning.append(
                    {
                        "attack": attack,
                        "strategy": strategy,
                        "f1": result.f1,
                        "precision": result.precision,
                        "recall": result.recall,
                        "global_version": versions,
                    }
                )
    return {
        "dataset": name,
        "readings": len(readings),
        "training_devices": len({r.device_id for r in data.training}),
        "held_out_devices": len(data.held_out),
        "evaluation_rows": int(labels.size),
        "evaluation_anomaly_share": float(labels.mean()) if labels.size else 0.0,
        "methods": rows,
        "poisoning": poisoning,
        "seconds": time.perf_counter() - started,
    }


def render(results: list[dict]) -> str:
    lines = []
    for result in results:
        lines.append(
            f"## {result['dataset']}: {result['held_out_devices']} held-out devices, "
            f"{result['evaluation_rows']:,} evaluation rows "
            f"({result['evaluation_anomaly_share']:.1%} anomalous)"
        )
        lines.append("| method | accuracy | precision | recall | F1 |")
        lines.append("| --- | --- | --- | --- | --- |")
        for r in result["methods"]:
            lines.append(
                f"| {r['method']} | {r['accuracy']:.3f} | {r['precision']:.3f} | "
                f"{r['recall']:.3f} | {r['f1']:.3f} |"
            )
        if result["poisoning"]:
            lines.append("")
            lines.append("F1 with 20 % of training devices poisoning their weights:")
            strategies = sorted({p["strategy"] for p in result["poisoning"]})
            lines.append("| attack | " + " | ".join(strategies) + " |")
            lines.append("| --- |" + " --- |" * len(strategies))
            for attack in ATTACKS:
                f1 = {p["strategy"]: p["f1"] for p in result["poisoning"] if p["attack"] == attack}
                lines.append(
                    f"| {attack} | " + " | ".join(f"{f1[s]:.3f}" for s in strategies) + " |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2407)
    parser.add_argument("--readings-per-device", type=int, default=200)
    parser.add_argument("--no-skab", action="store_true")
    args = parser.parse_args(argv)
    settings = load_settings()
    results = [
        assess(
            "synthetic",
            list(
                sources.synthetic_fleet(
                    num_devices=args.devices,
                    readings_per_device=args.readings_per_device,
                    anomaly_rate=settings.synthetic_anomaly_rate,
                    seed=settings.seed,
                )
            ),
            settings,
            attacks=True,
        )
    ]
    if not args.no_skab and (sources.SHARED_DATA_DIR / "skab").exists():
        # The legacy model is univariate: one device per (experiment, sensor).
        skab = list(sources.skab_readings(per_sensor=True))
        results.append(assess("skab", skab, settings, attacks=False))
    path = write_result("model_quality", {"results": results})
    table = render(results)
    path.with_suffix(".md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
