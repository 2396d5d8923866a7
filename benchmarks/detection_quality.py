"""Detection quality of the learner and federation, through ``flead evaluate``'s own code.

Every method of :mod:`streaming.evaluate` (majority class, z-score rule, the federated default,
each model family, local-only, central; prequential beside them) on the data sets at hand,
measured side by side in one run with the same settings: the embedded synthetic fleet
(``--devices`` of it, default 600), SKAB (one 8-channel device per experiment, and one
device per experiment and sensor) and the WSN motes (4 devices, 2 channels). SKAB's 5 device
folds are then drawn again with ``--fold-seeds`` (its figure moves by a few hundredths with the
split alone). Then model poisoning: every
aggregation rule, with and without 20 % of the synthetic fleet's training devices attacking
(``streaming.evaluate.ATTACKS``). Then what ``make run`` should show: the embedded fleet as
``flead replay`` sends it, replayed in process with the job's held-out split; its newest
versions' prequential figure is the one ``flead status`` prints for the live pipeline.
Last, the learner alone: decode, score and train in this process, no Flink and no broker, on
``--speed-devices`` synthetic devices' messages of ``replay_batch`` readings (the issue's
80,000 readings/s floor is for this figure). Results: ``benchmarks/results/detection_quality.json``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from datetime import UTC, datetime

from benchmarks.common import RESULTS_DIR, write_result
from flead.config import load_settings
from streaming import evaluate, sources
from streaming.federation import FederationConfig
from streaming.learner import LearnerConfig, is_held_out
from streaming.model import aggregation
from streaming.model.metrics import RECENT_READINGS, newest_pooled


def data_sets(devices: int) -> dict[str, dict]:
    """Name → the loader's options (``source``: the loader, when it is not the name)."""
    found = {"synthetic": {"num_devices": devices}}
    if (sources.SHARED_DATA_DIR / "skab").is_dir():
        found["skab"] = {}
        # One device per (experiment, sensor): a fleet of one-channel devices whose labels are
        # the experiment's, so many devices never move during their "anomaly".
        found["skab_per_sensor"] = {"source": "skab", "per_sensor": True}
    if (sources.SHARED_DATA_DIR / "wsn").is_dir():
        found["wsn"] = {}
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=600, help="synthetic fleet size")
    parser.add_argument(
        "--attack-devices", type=int, default=300, help="synthetic fleet size of the attack runs"
    )
    parser.add_argument(
        "--speed-devices", type=int, default=400, help="synthetic fleet size of the speed run"
    )
    parser.add_argument(
        "--fold-seeds",
        default="42,1,2,3,4",
        help="comma-separated seeds of SKAB's device folds (the first is the settings' default)",
    )
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="measure only the learner alone and update it in the existing results file",
    )
    parser.add_argument(
        "--against",
        metavar="REVISION",
        help="with --speed-only: also measure the learner of this git revision, alternating"
        " fresh processes of both trees, and report the ratio (shared machines drift)",
    )
    parser.add_argument(
        "--live-only",
        action="store_true",
        help="replay only make run's fleet in process and update it in the existing results file",
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    if args.speed_only:
        if args.against:
            return _updated("learner_against", learner_against(args.against, args.speed_devices))
        return update_learner_alone(settings, args.speed_devices)
    config = LearnerConfig.from_settings(settings)
    fed_config = FederationConfig.from_settings(settings)
    if args.live_only:
        return _updated("make_run_fleet", make_run_fleet(settings, config, fed_config))
    results = {}
    for name, options in data_sets(args.devices).items():
        options = dict(options)
        report = evaluate.evaluate(
            sources.open_source(options.pop("source", name), **options),
            source=name,
            config=config,
            fed_config=fed_config,
            batch=settings.replay_batch,
        )
        print(report.table(), flush=True)
        results[name] = report.as_dict()
    seeds = [int(x) for x in args.fold_seeds.split(",") if x.strip()]
    payload = {
        "learner": vars(config),
        "federation": vars(fed_config),
        "data_sets": results,
        "fold_seeds": fold_seeds(
            config, fed_config, settings.replay_batch, seeds, data_sets(args.devices)
        ),
        "poisoning": poisoning(config, fed_config, args.attack_devices),
        "make_run_fleet": make_run_fleet(settings, config, fed_config),
        "learner_alone": learner_alone(settings, args.speed_devices, network=True),
    }
    path = write_result("detection_quality", payload)
    print(f"wrote {path}")
    return payload


SEED_METHODS = ("zscore", "federated", "global", "central", "central_discriminant")


def fold_seeds(
    config: LearnerConfig,
    fed_config: FederationConfig,
    batch: int,
    seeds: list[int],
    found: dict[str, dict],
) -> dict:
    """SKAB's figures (the synthetic fleet's without SKAB) for other draws of its device folds:
    how much of a difference between methods, or from a target, is the split's."""
    name = "skab" if "skab" in found else "synthetic"
    if not seeds or name not in found:
        return {}
    readings = list(sources.open_source(name, **found[name]))
    by_seed = {}
    for seed in seeds:
        report = evaluate.evaluate(
            readings,
            source=name,
            config=replace(config, seed=seed),
            fed_config=fed_config,
            batch=batch,
            methods=SEED_METHODS,
        )
        by_seed[str(seed)] = {m: {"f1": c.f1, "mcc": c.mcc} for m, c in report.methods.items()}
        cells = ", ".join(f"{m} {c.f1:.3f}" for m, c in report.methods.items())
        print(f"{name} folds seed {seed}: {cells}", flush=True)
    mean = {
        m: {k: sum(r[m][k] for r in by_seed.values()) / len(by_seed) for k in ("f1", "mcc")}
        for m in SEED_METHODS
    }
    return {"data_set": name, "by_seed": by_seed, "mean": mean}


def update_learner_alone(settings, devices: int) -> dict:
    """The speed figure again, the detection figures (deterministic) kept as they are."""
    return _updated("learner_alone", learner_alone(settings, devices, network=True))


_ONE_PASS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import streaming
assert streaming.__file__.startswith(sys.argv[1]), streaming.__file__
from benchmarks.detection_quality import learner_alone
from flead.config import load_settings
print(json.dumps(learner_alone(load_settings(), int(sys.argv[2]), repeats=1)))
"""


def learner_against(revision: str, devices: int, rounds: int = 3) -> dict:
    """The learner alone of this tree and of git ``revision`` side by side: ``rounds`` times a
    fresh process of each in turn (one pass each, CPU seconds), so both see the same machine.
    The absolute figure moves with whoever else shares the cores; the ratio much less."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "-C", str(here), "rev-parse", "--short", revision],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as scratch:
        other = Path(scratch) / commit
        subprocess.run(
            ["git", "-C", str(here), "worktree", "add", "--detach", str(other), commit],
            check=True,
            capture_output=True,
        )
        try:
            trees = {"this tree": here, commit: other}
            passes: dict[str, list[float]] = {name: [] for name in trees}
            for round_ in range(rounds):
                for name, tree in trees.items():
                    done = subprocess.run(
                        [sys.executable, "-c", _ONE_PASS, str(tree), str(devices)],
                        cwd=tree,
                        check=True,
                        capture_output=True,
                        text=True,
                    )
                    rate = json.loads(done.stdout.strip().splitlines()[-1])["readings_per_cpu_s"]
                    passes[name].append(rate)
                    print(f"round {round_ + 1}: {name} {rate:,.0f} readings per CPU second")
        finally:
            subprocess.run(
                ["git", "-C", str(here), "worktree", "remove", "--force", str(other)],
                check=False,
                capture_output=True,
            )
    ratios = [a / b for a, b in zip(passes["this tree"], passes[commit], strict=True)]
    print(f"this tree / {commit}: " + ", ".join(f"{r:.3f}" for r in ratios), flush=True)
    return {
        "revision": commit,
        "devices": devices,
        "readings_per_cpu_s": passes["this tree"],
        "revision_readings_per_cpu_s": passes[commit],
        "ratios": ratios,
    }


def _updated(key: str, figures: dict) -> dict:
    """The results file with ``key`` measured again (stamped with the time), the rest kept."""
    path = RESULTS_DIR / "detection_quality.json"
    payload = json.loads(path.read_text())
    payload[key] = {**figures, "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"updated {path}")
    return payload


def make_run_fleet(settings, config: LearnerConfig, fed_config: FederationConfig) -> dict:
    """The fleet ``make run`` replays (the settings' synthetic defaults), federated in process
    with the live job's split: the hashed held-out devices never train. Its newest versions'
    prequential counts, pooled back to :data:`RECENT_READINGS` readings, are the figure
    ``flead status`` prints for the live pipeline: the same data, learner and server round,
    without Kafka, Flink and wall-clock round windows."""
    readings = sources.synthetic_fleet(**settings.synthetic_options())
    fleet = evaluate.collect(readings, settings.replay_batch)
    evaluate.featurize(fleet, config)
    training = [
        series
        for device_id, series in fleet.devices.items()
        if not is_held_out(device_id, config.holdout_fraction, config.seed)
    ]
    run = evaluate.federate(training, config, fed_config)
    first, last, pooled = newest_pooled(run.prequential_by_version)
    print(
        f"make run's fleet in process: {run.versions} versions; prequential v{first}-v{last}"
        f" ({pooled.samples:,} readings) F1 {pooled.f1:.3f}, MCC {pooled.mcc:.3f}; all versions"
        f" ({run.prequential.samples:,}) F1 {run.prequential.f1:.3f}",
        flush=True,
    )
    return {
        "devices": len(fleet.devices),
        "training_devices": len(training),
        "readings": fleet.readings,
        "versions": run.versions,
        "newest_prequential": {
            "first_version": first,
            "last_version": last,
            "pooled_readings": RECENT_READINGS,
            **pooled.as_dict(),
        },
        "prequential": run.prequential.as_dict(),
    }


def learner_alone(settings, devices: int, repeats: int = 3, network: bool = False) -> dict:
    """Readings per second of the learner's own loop (the streaming benchmark's
    ``python_learner``) on messages made here: the best of ``repeats`` passes, each from fresh
    device states, so a noisy neighbour on a shared machine does not set the figure.

    ``network``: each pass is followed by one whose rounds also train the supervised network
    (``train_network``, what ``detector=supervised`` devices do), reported under ``network``
    beside the default's figures: what that family costs, measured side by side."""
    from benchmarks.streaming_throughput import python_learner
    from streaming.messages import encode_reading_batch

    readings = sorted(
        sources.synthetic_fleet(num_devices=devices, seed=settings.seed),
        key=lambda r: (r.timestamp_ms, r.device_id),
    )
    pending: dict[str, list] = {}
    messages = []
    for reading in readings:
        batch = pending.setdefault(reading.device_id, [])
        batch.append(reading)
        if len(batch) == settings.replay_batch:
            messages.append((None, encode_reading_batch(pending.pop(reading.device_id)), None))
    variants = {"default": settings}
    if network:
        variants["network"] = replace(settings, train_network=True)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, variant in variants.items():
            runs[name].append(python_learner(variant, messages))
    figures = {name: _best(found) for name, found in runs.items()}
    for name, found in figures.items():
        print(
            f"learner alone ({name}): {found['readings_per_s']:,.0f} readings/s of wall time,"
            f" {found['readings_per_cpu_s']:,.0f} per CPU second (best of {repeats})",
            flush=True,
        )
    result = {
        **figures["default"],
        "devices": devices,
        "messages": len(messages),
        "readings_per_message": settings.replay_batch,
    }
    if network:
        result["network"] = figures["network"]
    return result


def _best(runs: list[dict]) -> dict:
    passes = [run["readings_per_s"] for run in runs]
    cpu_passes = [run["readings_per_cpu_s"] for run in runs]
    return {
        "readings_per_s": max(passes),
        "readings_per_cpu_s": max(cpu_passes),
        "passes": passes,
        "cpu_passes": cpu_passes,
    }


def poisoning(config: LearnerConfig, fed_config: FederationConfig, devices: int) -> dict:
    """F1/MCC of the federated default and of the supervised family per rule and attack."""
    readings = list(sources.open_source("synthetic", num_devices=devices))
    table: dict[str, dict] = {}
    for rule in sorted(aggregation.RULES):
        table[rule] = {}
        for attack in (None, *evaluate.ATTACKS):
            report = evaluate.evaluate(
                readings,
                source="synthetic",
                config=config,
                fed_config=replace(fed_config, rule=rule),
                methods=("federated", "supervised"),
                attack=attack,
            )
            table[rule][attack or "none"] = {
                m: {"f1": c.f1, "mcc": c.mcc} for m, c in report.methods.items()
            }
            sup = report.methods["supervised"]
            print(f"{rule:<18} {attack or 'none':<17} supervised F1 {sup.f1:.3f}", flush=True)
    return table


if __name__ == "__main__":
    main()
