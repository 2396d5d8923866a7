"""The benchmarks run (their figures are measured by `make bench`, never asserted here)."""

import pytest

from benchmarks import model_quality, replay_throughput, streaming_throughput

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def results_in_tmp(tmp_path, monkeypatch):
    """Small test runs must not overwrite the figures `make bench` measured."""
    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)


def test_replay_benchmark_runs(kafka_broker) -> None:
    result = replay_throughput.main(
        ["--devices", "20", "--readings-per-device", "20", "--rounds", "1"]
    )
    assert result["rates"]["flead_replay"]["median"] > 0


def test_model_quality_benchmark_runs() -> None:
    [synthetic] = model_quality.main(
        ["--devices", "150", "--readings-per-device", "120", "--no-skab"]
    )
    methods = {row["method"] for row in synthetic["methods"]}
    assert {
        "majority_class",
        "z_score_rule",
        "federated_scale_free",
        "federated_original",
        "local_only",
        "central",
    } <= methods
    assert {p["strategy"] for p in synthetic["poisoning"]} == {
        "fedavg",
        "trimmed_mean",
        "median",
        "clipped_fedavg",
    }


def test_streaming_benchmark_runs(kafka_broker, postgres) -> None:
    result = streaming_throughput.main(
        [
            *("--devices", "50", "--capacity-readings-per-device", "60"),
            *("--rate", "500", "--seconds", "5", "--batch", "2"),
        ]
    )
    assert result["capacity"]["readings_per_s"] > 0
    assert result["sustained"]["lag_samples"]
