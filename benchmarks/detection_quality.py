"""Detection quality of the learner and federation, through ``flead evaluate``'s own code.

Every method of :mod:`streaming.evaluate` (majority class, z-score rule, the federated default,
each model family, local-only, central; prequential beside them) on the data sets at hand,
measured side by side in one run with the same settings: the embedded synthetic fleet
(``--devices`` of it, default 600), SKAB (one 8-channel device per experiment) and the WSN
motes (4 devices, 2 channels). Then model poisoning: every aggregation rule, with and without
20 % of the synthetic fleet's training devices attacking (``streaming.evaluate.ATTACKS``).
Results: ``benchmarks/results/detection_quality.json``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from benchmarks.common import write_result
from flead.config import load_settings
from streaming import evaluate, sources
from streaming.federation import FederationConfig
from streaming.learner import LearnerConfig
from streaming.model import aggregation


def data_sets(devices: int) -> dict[str, dict]:
    found = {"synthetic": {"num_devices": devices}}
    if (sources.SHARED_DATA_DIR / "skab").is_dir():
        found["skab"] = {}
    if (sources.SHARED_DATA_DIR / "wsn").is_dir():
        found["wsn"] = {}
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=600, help="synthetic fleet size")
    parser.add_argument(
        "--attack-devices", type=int, default=300, help="synthetic fleet size of the attack runs"
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    config = LearnerConfig.from_settings(settings)
    fed_config = FederationConfig.from_settings(settings)
    results = {}
    for name, options in data_sets(args.devices).items():
        report = evaluate.evaluate(
            sources.open_source(name, **options),
            source=name,
            config=config,
            fed_config=fed_config,
            batch=settings.replay_batch,
        )
        print(report.table(), flush=True)
        results[name] = report.as_dict()
    payload = {
        "learner": vars(config),
        "federation": vars(fed_config),
        "data_sets": results,
        "poisoning": poisoning(config, fed_config, args.attack_devices),
    }
    path = write_result("detection_quality", payload)
    print(f"wrote {path}")
    return payload


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
