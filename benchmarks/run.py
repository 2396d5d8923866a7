"""`make bench`: run every benchmark (or the ones named) and write results under
benchmarks/results/. Each benchmark measures its candidates side by side in one run."""

from __future__ import annotations

import sys

from benchmarks import (
    cluster_throughput,
    detection_quality,
    evaluation_throughput,
    replay_throughput,
    report,
    streaming_throughput,
)

BENCHMARKS = {
    "replay_throughput": replay_throughput.main,
    "detection_quality": detection_quality.main,
    "streaming_throughput": streaming_throughput.main,
    "evaluation_throughput": evaluation_throughput.main,
    # Starts three brokers and a Flink session cluster of its own beside the shared services.
    "cluster_throughput": cluster_throughput.main,
}


def main(argv: list[str]) -> int:
    unknown = [name for name in argv if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
        return 2
    for name in argv or list(BENCHMARKS):
        print(f"== {name}", flush=True)
        BENCHMARKS[name]([])
    report.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
