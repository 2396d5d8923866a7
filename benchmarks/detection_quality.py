"""Detection quality of the learner and federation, through ``flead evaluate``'s own code.

Every method of :mod:`streaming.evaluate` (majority class, z-score rule, the federated default,
each model family, local-only, central; prequential beside them) on the data sets at hand,
measured side by side in one run with the same settings: the embedded synthetic fleet
(``--devices`` of it, default 600), SKAB (one 8-channel device per experiment) and the WSN
motes (4 devices, 2 channels). Results: ``benchmarks/results/detection_quality.json``.
"""

from __future__ import annotations

import argparse

from benchmarks.common import write_result
from flead.config import load_settings
from streaming import evaluate, sources
from streaming.federation import FederationConfig
from streaming.learner import LearnerConfig


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
    payload = {"learner": vars(config), "federation": vars(fed_config), "data_sets": results}
    path = write_result("detection_quality", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
