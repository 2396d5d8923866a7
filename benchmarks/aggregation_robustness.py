"""F1 of each aggregation rule on a simulated federation with rare anomalies, with and without
model poisoning: the measurement behind :data:`streaming.model.aggregation.DEFAULT_RULE`.

Self-contained (numpy and the aggregation module only), so it does not move with the streaming
tier, and prints tables only (nothing is written to ``benchmarks/results``). What it keeps from
the real system, because that is what broke the old robust rules: bounded scale-free-like
features (|z|-like in [0, 10], log-volatility in [-5, 5]); anomalies ~2 % of readings, in
*episodes* on some devices, so ~12 % of 50-reading rounds hold a new positive; local rounds of
per-sample SGD from the device's copy of the global model (learning rate 0.2, one epoch,
positives weighted to balance the round, as ``sgd_round``); bases lagging 0-2 versions behind
the newest (stale updates); a new version every 20 devices' updates. Optionally (default on, 50)
a positive-example memory: each round also trains on the device's latest earlier positives, and
the rules cap claimed samples at 50 + memory, as the service does. F1 is measured on separate
held-out devices: averaged over the last 10 versions, for the last version, and the swing (std)
over those versions.

Attacks: 20 % of training devices send ``base + 20·delta`` (scaled_x20), ``base - delta``
(sign_flipped), their honest update claiming 2e9 samples (samples_2e9), or all three at once
(``base - 20·delta`` claiming 2e9 samples).

    .venv/bin/python -m benchmarks.aggregation_robustness [--seeds 5] [--jobs 2]
        [--positive-memory 0] [--rules fedavg,median]

About 8 minutes for the default 3 seeds and every rule on one core.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np

from streaming.model import aggregation as agg

N_FEATURES = 10
ROUND = 50  # readings per local round (the service's train_every)
MIN_DEVICES = 20  # devices per global version
ATTACKS = ("none", "scaled_x20", "sign_flipped", "samples_2e9", "all_three")
MAX_LAG = 2  # versions a device's base may lag behind the newest
LAST = 10  # versions averaged for the "mean F1 of the last versions" column


# --- data -----------------------------------------------------------------------------------


def normal_rows(rng: np.random.Generator, n: int, tail: float) -> np.ndarray:
    """Features of normal readings; ``tail`` > 1 makes a noisier device (more false alarms)."""
    z = np.abs(rng.standard_t(df=4, size=n)) * tail
    X = np.column_stack(
        [
            z,  # |z| max over channels
            0.8 * z + 0.2 * np.abs(rng.normal(size=n)),  # |z| mean
            np.abs(rng.normal(0, 1.4 * tail, n)),  # |step|
            np.abs(rng.normal(0, 0.45 * tail, n)),  # |level_5|
            np.abs(rng.normal(0, 0.2 * tail, n)),  # |level_30|
            rng.normal(0, 0.3, n),  # vol_5
            rng.normal(0, 0.15, n),  # vol_30
            np.sqrt(rng.chisquare(2, n)) * tail,  # mahal z
            np.sqrt(rng.chisquare(2, n)) * 0.45 * tail,  # mahal level_5
            np.sqrt(rng.chisquare(2, n)) * 0.2 * tail,  # mahal level_30
        ]
    )
    return X


def shift(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """Feature change of ``n`` anomalous readings of one episode of ``kind``."""
    s = np.zeros((n, N_FEATURES))
    u = rng.uniform
    if kind == "spike":
        a = u(2.0, 6.0, n)
        s[:, [0, 1, 2, 7]] = np.column_stack([a, 0.7 * a, a, a])
    elif kind == "level":
        a = u(0.6, 2.5)
        s[:, [0, 1, 3, 4, 8, 9]] = [a, 0.8 * a, a, 0.7 * a, a, 0.7 * a]
    elif kind == "stuck":
        s[:, [5, 6]] = [-u(1.0, 3.0), -u(0.3, 1.5)]
        s[:, [0, 1, 2]] = -0.5  # a stuck value sits near the mean and does not move
    else:  # noise burst
        a = u(0.7, 2.0)
        s[:, [5, 6, 0, 2]] = [a, 0.4 * a, 0.8 * a, 0.8 * a]
    return s


KINDS = ("spike", "level", "stuck", "noise")
LENGTHS = {"spike": (1, 3), "level": (8, 30), "stuck": (8, 30), "noise": (4, 15)}


def device_data(
    rng: np.random.Generator, readings: int, rate: float
) -> tuple[np.ndarray, np.ndarray]:
    """One device's time-ordered (X, y): episodes of one or two dominant kinds of anomaly."""
    tail = rng.choice([1.0, 1.0, 1.0, 1.3, 1.6])
    X = normal_rows(rng, readings, tail)
    y = np.zeros(readings, dtype=np.int64)
    kinds = rng.choice(KINDS, size=2, replace=True)
    mean_len = np.mean([np.mean(LENGTHS[k]) for k in kinds])
    for _ in range(rng.poisson(rate * readings / mean_len)):
        kind = str(rng.choice(kinds))
        length = int(rng.integers(*LENGTHS[kind], endpoint=True))
        start = int(rng.integers(0, max(1, readings - length)))
        rows = slice(start, start + length)
        X[rows] += shift(rng, kind, len(range(*rows.indices(readings))))
        y[rows] = 1
    X[:, :5] = np.clip(X[:, :5], 0.0, 10.0)
    X[:, 5:7] = np.clip(X[:, 5:7], -5.0, 5.0)
    X[:, 7:] = np.clip(X[:, 7:], 0.0, 10.0)
    return X, y


# --- local learner (the same update as streaming.model's sgd_round, inlined) ----------------


def sgd_round(
    params: np.ndarray, X: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    lr, l2 = 0.2, 1e-4
    positives = int(y.sum())
    pos_w = min((len(y) - positives) / positives, 50.0) if 0 < positives < len(y) else 1.0
    sample_w = np.where(y == 1, pos_w, 1.0)
    step = (lr * sample_w / sample_w.mean()).tolist()
    w, b = params[:-1].tolist(), float(params[-1])
    rows, labels, decay = X.tolist(), y.tolist(), 1.0 - lr * l2
    for i in rng.permutation(len(rows)).tolist():
        row = rows[i]
        s = b + sum(wj * xj for wj, xj in zip(w, row, strict=True))
        p = 1.0 / (1.0 + math.exp(-s)) if s >= 0 else 1.0 - 1.0 / (1.0 + math.exp(s))
        g = step[i] * (p - labels[i])
        w = [wj * decay - g * xj for wj, xj in zip(w, row, strict=True)]
        b -= g
    return np.array([*w, b])


def f1(params: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    pred = (X @ params[:-1] + params[-1]) > 0.0
    tp = int(np.sum(pred & (y == 1)))
    fp, fn = int(np.sum(pred & (y == 0))), int(np.sum(~pred & (y == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


# --- federation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    train: list[tuple[np.ndarray, np.ndarray]]
    offset: np.ndarray  # per device: when its first reading arrives
    attackers: np.ndarray  # bool per training device
    eval_X: np.ndarray
    eval_y: np.ndarray


def make_fleet(seed: int, devices: int, readings: int, rate: float) -> Fleet:
    rng = np.random.default_rng(seed)
    train = [device_data(rng, readings, rate) for _ in range(devices)]
    held = [device_data(rng, readings, rate) for _ in range(max(50, devices // 2))]
    attackers = np.zeros(devices, dtype=bool)
    attackers[rng.choice(devices, size=devices // 5, replace=False)] = True
    return Fleet(
        train,
        offset=rng.uniform(0, ROUND, devices),
        attackers=attackers,
        eval_X=np.vstack([x for x, _ in held]),
        eval_y=np.concatenate([y for _, y in held]),
    )


def poison(
    attack: str, base: np.ndarray, honest: np.ndarray, samples: float
) -> tuple[np.ndarray, float]:
    delta = honest - base
    if attack == "scaled_x20":
        return base + 20.0 * delta, samples
    if attack == "sign_flipped":
        return base - delta, samples
    if attack == "samples_2e9":
        return honest, 2e9
    if attack == "all_three":
        return base - 20.0 * delta, 2e9
    return honest, samples


Aggregate = Callable[[agg.Updates, np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]]


def federate(
    fleet: Fleet, attack: str, aggregate: Aggregate, seed: int, memory: int = 0
) -> list[float]:
    """Run the federation in event-time order; the held-out F1 of every global version."""
    rng = np.random.default_rng(seed + 1)
    rounds = len(fleet.train[0][1]) // ROUND
    events = sorted(
        (fleet.offset[d] + ROUND * (r + 1), d, r)
        for d in range(len(fleet.train))
        for r in range(rounds)
    )
    history = [np.zeros(N_FEATURES + 1)]  # params of every global version so far
    buffer: list[tuple[int, np.ndarray, float, int]] = []  # (device, params, samples, base)
    velocity, scores = None, []
    for _, d, r in events:
        # A device may not have received the newest versions yet: 0..MAX_LAG versions behind.
        base = max(0, len(history) - 1 - int(rng.integers(0, MAX_LAG + 1)))
        X, y = fleet.train[d]
        rows = slice(r * ROUND, (r + 1) * ROUND)
        # The positive-example memory: up to `memory` of the device's latest earlier positives
        # join every round, so a round without a new anomaly still holds some.
        earlier = np.flatnonzero(y[: r * ROUND])[-memory:] if memory else np.array([], int)
        X_round, y_round = np.vstack([X[rows], X[earlier]]), np.concatenate([y[rows], y[earlier]])
        honest = sgd_round(history[base], X_round, y_round, rng)
        params, samples = honest, float(len(y_round))
        if fleet.attackers[d]:
            params, samples = poison(attack, history[base], honest, samples)
        buffer.append((d, params, samples, base))
        if len({b[0] for b in buffer}) < MIN_DEVICES:
            continue
        current = len(history) - 1
        updates = agg.Updates(
            np.array([b[1] for b in buffer]),
            np.array([b[2] for b in buffer]),
            np.array([current - b[3] for b in buffer]),
        )
        new, velocity = aggregate(updates, history[-1], velocity)
        history.append(new)
        scores.append(f1(new, fleet.eval_X, fleet.eval_y))
        buffer = []
    return scores


def aggregator(rule: agg.AggregationRule, momentum: agg.ServerMomentum) -> Aggregate:
    def run(updates: agg.Updates, reference: np.ndarray, velocity: np.ndarray | None):
        return momentum.step(reference, rule.combine(updates, reference), velocity)

    return run


# --- what is compared -----------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    rule: str
    options: dict = field(default_factory=dict)
    beta: float = 0.0  # server momentum
    server_lr: float = 1.0


UNCAPPED = {"max_samples": 2**62, "max_update_norm": 0.0}
CANDIDATES: dict[str, Candidate] = {
    "fedavg_uncapped": Candidate("fedavg", UNCAPPED),
    "fedavg": Candidate("fedavg"),
    "trimmed_mean": Candidate("trimmed_mean"),
    "trimmed_mean_0.3": Candidate("trimmed_mean", {"trim_fraction": 0.3}),
    "median": Candidate("median"),
    "geometric_median": Candidate("geometric_median"),
    "clipped_fedavg": Candidate("clipped_fedavg"),
    "clipped_fedavg_30": Candidate("clipped_fedavg", {"clip_multiple": 30.0}),
    "fedavg_m0.9": Candidate("fedavg", beta=0.9, server_lr=0.1),
    "trimmed_mean_m0.9": Candidate("trimmed_mean", beta=0.9, server_lr=0.1),
    # DEFAULT_RULE with DEFAULT_MOMENTUM:
    "trimmed_mean_0.3_m0.9": Candidate("trimmed_mean", {"trim_fraction": 0.3}, 0.9, 0.1),
}
"""``_m0.9``: server momentum beta 0.9 with server learning rate 0.1 (an exponential average of
the combined deltas: the same long-run step as without momentum, less swing)."""


def run_seed(seed: int, labels: list[str], args: argparse.Namespace) -> dict:
    """label → attack → (F1 of the last version, mean F1 of the last versions, their std)."""
    fleet = make_fleet(seed, args.devices, args.readings_per_device, args.anomaly_rate)
    # What the service configures: a round holds train_every readings plus the memory.
    max_samples = {"max_samples": ROUND + args.positive_memory}
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for label in labels:
        c = CANDIDATES[label]
        rule = agg.make_rule(c.rule, **{**max_samples, **c.options})
        run = aggregator(rule, agg.ServerMomentum(beta=c.beta, server_lr=c.server_lr))
        for attack in ATTACKS:
            scores = federate(fleet, attack, run, seed, args.positive_memory)
            tail = scores[-LAST:]
            out.setdefault(label, {})[attack] = (scores[-1], float(np.mean(tail)), np.std(tail))
    return out


def measure(labels: list[str], args: argparse.Namespace) -> dict:
    """:func:`run_seed` averaged over ``args.seeds`` seeds (in ``args.jobs`` processes)."""
    with ProcessPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(run_seed, range(args.seeds), repeat(labels), repeat(args)))
    return {
        label: {a: tuple(np.mean([r[label][a] for r in runs], axis=0)) for a in ATTACKS}
        for label in labels
    }


def render(results: dict, column: int, title: str) -> str:
    lines = [title, "| rule | " + " | ".join(ATTACKS) + " |", "| --- |" + " ---: |" * len(ATTACKS)]
    for label, by_attack in results.items():
        cells = " | ".join(f"{by_attack[a][column]:.3f}" for a in ATTACKS)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1, help="processes (one seed each)")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--readings-per-device", type=int, default=2000)
    parser.add_argument("--anomaly-rate", type=float, default=0.02)
    parser.add_argument(
        "--positive-memory", type=int, default=50, help="earlier positives added to each round"
    )
    parser.add_argument("--rules", default=",".join(CANDIDATES), help="labels, comma-separated")
    args = parser.parse_args(argv)
    labels = args.rules.split(",")
    unknown = sorted(set(labels) - set(CANDIDATES))
    if unknown:
        parser.error(f"unknown rule labels {unknown}; valid: {', '.join(CANDIDATES)}")
    started = time.perf_counter()
    results = measure(labels, args)
    seconds = time.perf_counter() - started
    print(
        f"{args.devices} devices x {args.readings_per_device} readings, anomaly rate "
        f"{args.anomaly_rate}, positive memory {args.positive_memory}, {args.seeds} seeds"
    )
    print(render(results, 1, f"\nMean held-out F1 of the last {LAST} versions:"))
    print(render(results, 0, "\nHeld-out F1 of the last version:"))
    print(render(results, 2, f"\nSwing: std of F1 over the last {LAST} versions:"))
    print(f"\n({seconds:.0f} s)")
    return results


if __name__ == "__main__":
    main()
