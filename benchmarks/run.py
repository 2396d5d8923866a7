"""`make bench`: run every benchmark and write its results under benchmarks/results/."""

from __future__ import annotations

import sys

from benchmarks import replay_throughput

BENCHMARKS = {"replay_throughput": replay_throughput.main}


def main(argv: list[str]) -> int:
    selected = argv or list(BENCHMARKS)
    for name in selected:
        print(f"== {name}")
        BENCHMARKS[name]([])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
