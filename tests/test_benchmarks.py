"""The benchmarks run (their figures are measured by `make bench`, never asserted here)."""

import subprocess

import pytest

from benchmarks import replay_throughput, streaming_throughput

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


def test_detection_quality_benchmark_runs(monkeypatch) -> None:
    from benchmarks import detection_quality

    # The synthetic fleet only: SKAB and WSN take minutes (make bench runs them).
    monkeypatch.setattr(
        detection_quality, "data_sets", lambda devices: {"synthetic": {"num_devices": devices}}
    )
    # make run's fleet, smaller: 60 devices of 200 readings (12,000, more than the 5,000 the
    # newest versions are pooled back to).
    monkeypatch.setenv("FLEAD_SYNTHETIC_DEVICES", "60")
    result = detection_quality.main(
        [
            "--devices",
            "40",
            "--attack-devices",
            "20",
            "--speed-devices",
            "20",
            "--fold-seeds",
            "5,6",
        ]
    )
    synthetic = result["data_sets"]["synthetic"]
    assert set(result["poisoning"]["fedavg"]) == {
        "none",
        "scaled_x20",
        "sign_flipped",
        "inflated_samples",
        "all",
    }
    assert {"majority", "zscore", "federated", "local_only", "central"} <= set(synthetic["methods"])
    assert synthetic["devices"] == 40
    seeds = result["fold_seeds"]
    assert seeds["data_set"] == "synthetic" and list(seeds["by_seed"]) == ["5", "6"]
    for method, mean in seeds["mean"].items():
        f1 = [row[method]["f1"] for row in seeds["by_seed"].values()]
        assert mean["f1"] == pytest.approx(sum(f1) / 2)
    fleet = result["make_run_fleet"]
    assert fleet["devices"] == 60 and 0 < fleet["training_devices"] < 60
    assert fleet["readings"] == 60 * 200 and fleet["versions"] > 1
    newest = fleet["newest_prequential"]
    # Whole versions are pooled: at least 5,000 readings, fewer than all the prequential ones.
    assert 5_000 <= newest["samples"] < fleet["prequential"]["samples"]
    assert newest["last_version"] <= fleet["versions"]
    alone = result["learner_alone"]
    assert alone["messages"] == 20 * 200 // 50 and alone["readings_per_s"] == max(alone["passes"])
    network = alone["network"]  # passes that train the network too, alternating with those
    assert len(network["passes"]) == len(alone["passes"]) == 3
    assert network["readings_per_cpu_s"] == max(network["cpu_passes"])


def test_streaming_benchmark_runs(kafka_broker, postgres) -> None:
    result = streaming_throughput.main(
        [
            *("--devices", "50", "--capacity-readings-per-device", "60"),
            *("--rate", "500", "--seconds", "5", "--batch", "2"),
        ]
    )
    assert result["capacity"]["readings_per_s"] > 0
    assert result["sustained"]["lag_samples"]


def test_learner_against_another_revision_runs_both_trees() -> None:
    from benchmarks import detection_quality

    result = detection_quality.learner_against("HEAD", devices=10, rounds=2)
    assert len(result["readings_per_cpu_s"]) == len(result["revision_readings_per_cpu_s"]) == 2
    this, other = result["readings_per_cpu_s"], result["revision_readings_per_cpu_s"]
    expected = [a / b for a, b in zip(this, other, strict=True)]
    assert result["ratios"] == pytest.approx(expected)
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert result["revision"] == head and result["devices"] == 10
    # The revision's tree was a temporary worktree: none is left behind.
    worktrees = subprocess.run(
        ["git", "worktree", "list", "--porcelain"], check=True, capture_output=True, text=True
    ).stdout
    assert head not in {line.rsplit("/", 1)[-1] for line in worktrees.splitlines()}
