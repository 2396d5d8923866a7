"""The Dagster assets with the real Spark, Kafka and PostgreSQL: each asset materialized for a
partition, a multi-version backfill in one run, idempotent re-runs, and the asset checks.

Expected values come straight from the generated fleet (the device learner's functions on the
readings, the versions as the federation made them), never from ``flead_assets``' own code or
the database, so a bug in parsing, ordering, filtering, reading a version back or writing
shows. The fleet has univariate devices and devices with named channels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import psycopg
import pytest
from dagster import DagsterInstance, materialize
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from flead.config import Settings
from flead_assets.assets.analytics import build_hourly_device_analytics
from flead_assets.assets.evaluations import check_results, global_versions, model_evaluations
from flead_assets.assets.reports import accuracy_report
from flead_assets.lib import evaluation
from flead_assets.resources import FleadResource
from flead_assets.resources.spark import pyspark_resource
from tests import dagster_fleet

pytestmark = pytest.mark.integration

METRICS = ["tp", "fp", "tn", "fn", "samples"]
RATIOS = ["accuracy", "precision", "recall", "f1", "mcc", "baseline_accuracy"]


@pytest.fixture
def fleet_env(settings: Settings):
    """Test settings (own topic and database) holding the fleet's readings and 6 versions.

    The readings go in the batched message form (7 per message) plus messages to skip; the
    sensor and daemon tests use the single-reading form.
    """
    test_settings = dagster_fleet.fleet_settings(settings)
    fleet = dagster_fleet.make_fleet()
    assert dagster_fleet.produce(test_settings, fleet, batch=7) == len(fleet)
    dagster_fleet.produce_noise(test_settings, fleet)
    versions = dagster_fleet.make_versions(test_settings, fleet, count=6)
    return test_settings, fleet, versions


def resources(settings: Settings) -> dict:
    return {"flead": FleadResource.for_settings(settings), "pyspark": pyspark_resource(settings)}


def instance_with_versions(keys: list[str]) -> DagsterInstance:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(global_versions.name, keys)
    return instance


def summaries(settings: Settings) -> pd.DataFrame:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            f"SELECT model_version, {', '.join(METRICS + RATIOS)}, detector"
            " FROM model_evaluation_summaries ORDER BY model_version"
        ).fetchall()
    return pd.DataFrame(rows, columns=["model_version", *METRICS, *RATIOS, "detector"])


def count(settings: Settings, sql: str) -> int:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute(sql).fetchone()[0]


def assert_matches(row: pd.Series, expected: dict) -> None:
    for name in METRICS:
        assert int(row[name]) == expected[name], name
    for name in RATIOS:
        assert row[name] == pytest.approx(expected[name], abs=1e-12), name
    assert row["detector"] == expected["detector"]


def test_model_evaluations_one_version(fleet_env) -> None:
    settings, fleet, versions = fleet_env
    instance = instance_with_versions([str(v.version) for v in versions])
    result = materialize(
        [model_evaluations],
        partition_key="3",
        instance=instance,
        resources=resources(settings),
    )
    assert result.success
    stored = summaries(settings)
    assert stored["model_version"].tolist() == [3]
    expected = dagster_fleet.expected_evaluation(settings, fleet, versions[2])
    assert expected["samples"] > 200 and expected["tp"] + expected["fn"] > 0
    assert expected["detector"] == dagster_fleet.DETECTOR  # a calibrated model, not the rule
    assert_matches(stored.iloc[0], expected)
    # Multichannel held-out devices were scored too (one row per labelled reading).
    multi = [d for d in dagster_fleet.held_out_devices(settings, fleet) if d.startswith("multi")]
    assert multi
    assert count(
        settings,
        "SELECT count(DISTINCT device_id) FROM model_evaluations WHERE device_id LIKE 'multi%'",
    ) == len(multi)
    # Per-sample rows: one per scored reading, consistent with the summary.
    assert count(settings, "SELECT count(*) FROM model_evaluations") == expected["samples"]
    assert (
        count(settings, "SELECT count(*) FROM model_evaluations WHERE is_correct")
        == expected["tp"] + expected["tn"]
    )
    assert (
        count(
            settings,
            "SELECT count(*) FROM model_evaluations WHERE confidence < 0.5 OR confidence > 1"
            " OR is_correct <> (prediction = actual_result) OR score IS NULL"
            " OR threshold IS NULL",
        )
        == 0
    )
    checks = result.get_asset_check_evaluations()
    assert {c.check_name for c in checks} == {
        "samples_positive",
        "metrics_in_unit_interval",
        "one_summary_per_version",
    }
    assert all(c.passed for c in checks)
    # No held-out device trained: the evaluated devices and the training devices are disjoint.
    with psycopg.connect(settings.database_url) as conn:
        overlap = conn.execute(
            "SELECT count(*) FROM (SELECT DISTINCT device_id FROM model_evaluations) e"
            " JOIN local_models l USING (device_id)"
        ).fetchone()[0]
    assert overlap == 0


def test_backfill_of_several_versions_is_one_run_and_idempotent(fleet_env) -> None:
    settings, fleet, versions = fleet_env
    keys = [str(v.version) for v in versions]
    instance = instance_with_versions(keys)
    tags = {ASSET_PARTITION_RANGE_START_TAG: "2", ASSET_PARTITION_RANGE_END_TAG: "6"}
    for _ in range(2):  # the second run replaces, never duplicates
        result = materialize(
            [model_evaluations, accuracy_report],
            instance=instance,
            resources=resources(settings),
            tags=tags,
        )
        assert result.success
    runs = instance.get_runs()
    assert len(runs) == 2  # one run per backfill of five versions, not one per version
    materialized = {
        e.materialization.partition
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == "model_evaluation_summaries"
    }
    assert materialized == {"2", "3", "4", "5", "6"}
    stored = summaries(settings)
    assert stored["model_version"].tolist() == [2, 3, 4, 5, 6]
    for version, (_, row) in zip(versions[1:], stored.iterrows(), strict=True):
        assert_matches(row, dagster_fleet.expected_evaluation(settings, fleet, version))
    per_version = count(settings, "SELECT count(*) FROM model_evaluations WHERE model_version = 2")
    assert count(settings, "SELECT count(*) FROM model_evaluations") == 5 * per_version
    # The report in the same run: one row per evaluated version, and the plot in metadata.
    assert count(settings, "SELECT count(*) FROM accuracy_reports") == 5
    report = next(
        e.materialization
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == "accuracy_report"
    )
    assert report.metadata["versions"].value == 5
    assert "data:image/png;base64," in report.metadata["trend"].value


def test_versions_learn_something(fleet_env) -> None:
    """A sanity check on the data the other tests use: the versions decide differently and
    the last one finds anomalies with its calibrated model (otherwise every comparison above
    could pass on an all-"normal" model or on the z-score rule alone)."""
    settings, fleet, versions = fleet_env
    evaluated = [dagster_fleet.expected_evaluation(settings, fleet, v) for v in versions]
    calibrated = [e for e in evaluated if e["detector"] == dagster_fleet.DETECTOR]
    assert len(calibrated) >= 2
    first, last = calibrated[0], calibrated[-1]
    assert last["tp"] > 0 and last["f1"] > first["f1"]
    assert last["mcc"] > 0.3, last
    assert len({(e["tp"], e["fp"]) for e in evaluated}) >= 3


def test_hourly_device_analytics_partition(fleet_env) -> None:
    settings, fleet, _ = fleet_env
    hourly = build_hourly_device_analytics(settings)
    for _ in range(2):  # idempotent: the second run replaces the hour
        result = materialize(
            [hourly], partition_key=dagster_fleet.FIRST_HOUR, resources=resources(settings)
        )
        assert result.success
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT device_id, channel, hour, readings, mean, std, min, max, anomaly_rate"
            " FROM hourly_device_analytics ORDER BY device_id, channel, hour"
        ).fetchall()
    columns = ["device_id", "channel", "hour", "readings", "mean", "std", "min", "max"]
    stored = pd.DataFrame(rows, columns=[*columns, "anomaly_rate"])
    expected = dagster_fleet.expected_hourly(fleet).sort_values(["device_id", "channel", "hour"])
    channels = len(dagster_fleet.CHANNELS)
    assert (
        len(stored)
        == len(expected)
        == dagster_fleet.FLEET["num_devices"] + channels * dagster_fleet.MULTICHANNEL
    )
    assert stored["device_id"].tolist() == expected["device_id"].tolist()
    assert stored["channel"].tolist() == expected["channel"].tolist()
    assert set(stored["channel"]) == {"value", *dagster_fleet.CHANNELS}
    assert (stored["readings"].to_numpy() == expected["readings"].to_numpy()).all()
    for column in ("mean", "std", "min", "max", "anomaly_rate"):
        np.testing.assert_allclose(
            stored[column].astype(float), expected[column].astype(float), rtol=1e-9, err_msg=column
        )
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["readings"].value == fleet.channel_readings()


def test_hourly_partition_without_data_writes_nothing(fleet_env) -> None:
    settings, _, _ = fleet_env
    hourly = build_hourly_device_analytics(settings)
    result = materialize([hourly], partition_key="2025-11-07-05:00", resources=resources(settings))
    assert result.success
    assert count(settings, "SELECT count(*) FROM hourly_device_analytics") == 0


def test_checks_fail_on_broken_summaries(settings: Settings) -> None:
    """The asset checks read the tables: a missing summary, a metric outside [0, 1], a sample
    count that disagrees with the per-sample rows, and no samples at all are all caught."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        for version, samples, accuracy, mcc in (
            (1, 2, 0.5, 0.0),
            (2, 2, 1.5, 0.0),
            (3, 5, 0.5, 0.0),
            (4, 0, 0.0, 0.0),
            (6, 2, 0.5, -1.5),
        ):
            conn.execute(
                "INSERT INTO model_evaluation_summaries (model_version, samples, tp, fp, tn, fn,"
                " accuracy, precision, recall, f1, mcc, baseline_accuracy)"
                " VALUES (%s, %s, 0, 0, %s, 0, %s, 0, 0, 0, %s, 1)",
                (version, samples, samples, accuracy, mcc),
            )
        for version in (1, 2, 3, 6):
            for second in (1, 2):
                conn.execute(
                    "INSERT INTO model_evaluations (model_version, device_id, reading_timestamp,"
                    " prediction, actual_result, is_correct, confidence)"
                    " VALUES (%s, 'd', %s, 0, 0, true, 0.9)",
                    (version, f"2025-11-07T00:00:0{second}Z"),
                )
    results = {
        r.check_name: r
        for r in check_results(FleadResource.for_settings(settings), [1, 2, 3, 4, 5, 6])
    }
    assert not any(r.passed for r in results.values())
    assert results["samples_positive"].metadata["failing_versions"].value == "[4, 5]"
    assert results["metrics_in_unit_interval"].metadata["failing_versions"].value == "[2, 6]"
    assert results["one_summary_per_version"].metadata["failing_versions"].value == "[3, 5]"
    ok = list(check_results(FleadResource.for_settings(settings), [1]))
    assert all(r.passed for r in ok)


# --- bounded growth: per-reading rows only for the newest versions (issue 8) -----------------


def _evaluated(version: int, readings: int) -> evaluation.Evaluated:
    """One version's per-reading rows (``readings`` of device ``d``) and summary, built by hand:
    the retention is about which rows stay, not how they were scored."""
    rows = pd.DataFrame(
        {
            "model_version": version,
            "device_id": "d",
            "reading_timestamp": pd.date_range("2025-11-07", periods=readings, freq="10s"),
            "prediction": 0,
            "actual_result": 0,
            "is_correct": True,
            "confidence": 0.9,
            "score": 0.1,
            "threshold": 0.5,
        }
    )
    summary = {c: 0 for c in evaluation.SUMMARY_COLUMNS}
    summary.update(model_version=version, samples=readings, tn=readings, detector="zscore")
    return evaluation.Evaluated(rows, summary)


def _rows_per_version(url: str) -> dict[int, int]:
    with psycopg.connect(url) as conn:
        return dict(
            conn.execute(
                "SELECT model_version, count(*) FROM model_evaluations GROUP BY 1 ORDER BY 1"
            ).fetchall()
        )


def _summary_versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT model_version FROM model_evaluation_summaries ORDER BY 1")
        return [v for (v,) in rows]


def test_store_keeps_rows_of_the_newest_versions_only(database: str) -> None:
    """keep_versions=3: after versions 1..7 the rows of 5, 6, 7 remain and all 7 summaries;
    re-evaluating an old version (a backfill) stores its summary but no rows; a version newer
    than all pushes the oldest kept one out; keep_versions=0 keeps everything."""
    with psycopg.connect(database) as conn:
        for version in range(1, 8):
            evaluation.store(conn, _evaluated(version, 10 + version), keep_versions=3)
    assert _rows_per_version(database) == {5: 15, 6: 16, 7: 17}
    assert _summary_versions(database) == [1, 2, 3, 4, 5, 6, 7]
    with psycopg.connect(database) as conn:
        evaluation.store(conn, _evaluated(2, 40), keep_versions=3)
        assert conn.execute(
            "SELECT samples FROM model_evaluation_summaries WHERE model_version = 2"
        ).fetchone() == (40,)
    assert _rows_per_version(database) == {5: 15, 6: 16, 7: 17}
    with psycopg.connect(database) as conn:
        evaluation.store(conn, _evaluated(9, 5), keep_versions=3)
    assert _rows_per_version(database) == {6: 16, 7: 17, 9: 5}
    assert _summary_versions(database) == [1, 2, 3, 4, 5, 6, 7, 9]
    with psycopg.connect(database) as conn:
        evaluation.store(conn, _evaluated(3, 7), keep_versions=0)  # 0: no retention
    assert _rows_per_version(database) == {3: 7, 6: 16, 7: 17, 9: 5}


def test_backfill_beyond_retention_keeps_rows_of_the_newest_versions(fleet_env) -> None:
    """Six versions evaluated in one Spark run with evaluation_keep_versions=2: every version
    has its summary (checked against the fleet), per-reading rows remain for versions 5 and 6
    only, exactly their sample counts, and the asset checks pass for the pruned versions."""
    settings, fleet, versions = fleet_env
    settings = dataclasses.replace(settings, evaluation_keep_versions=2)
    instance = instance_with_versions([str(v.version) for v in versions])
    tags = {ASSET_PARTITION_RANGE_START_TAG: "1", ASSET_PARTITION_RANGE_END_TAG: "6"}
    result = materialize(
        [model_evaluations], instance=instance, resources=resources(settings), tags=tags
    )
    assert result.success
    stored = summaries(settings)
    assert stored["model_version"].tolist() == [1, 2, 3, 4, 5, 6]
    expected = {v.version: dagster_fleet.expected_evaluation(settings, fleet, v) for v in versions}
    for _, row in stored.iterrows():
        assert_matches(row, expected[int(row["model_version"])])
    assert _rows_per_version(settings.database_url) == {
        5: expected[5]["samples"],
        6: expected[6]["samples"],
    }
    checks = list(check_results(FleadResource.for_settings(settings), range(1, 7)))
    assert checks and all(c.passed for c in checks), [c.metadata for c in checks]


def test_a_stored_version_brings_its_discriminant_to_the_evaluation() -> None:
    from streaming.model.detectors import Network
    from streaming.model.features import N_FEATURES, N_POOLED

    w = np.arange(N_FEATURES + 1, dtype=np.float64) / 10
    normal = {"count": 0.0, "mean": [0.0] * N_FEATURES, "comoment": [0.0] * N_FEATURES**2}
    row = {
        "global_version": 4,
        "hidden": 0,
        "weights": [0.0] * Network(N_POOLED, 0).size,
        "threshold": None,
        "normal_threshold": None,
        "label_source": "ground_truth",
        "detector": "discriminant",
        "server_state": {
            "normal": normal,
            "discriminant": {"params": w.tolist(), "threshold": 1.5},
        },
    }
    model = evaluation.global_params(row)
    np.testing.assert_array_equal(model.discriminant, w)
    assert model.discriminant_threshold == 1.5 and model.detector == "discriminant"
    assert model.discriminant_labels == "ground_truth"  # stored before the rule's classes
    row["server_state"]["discriminant"]["labels"] = "pseudo"
    assert evaluation.global_params(row).discriminant_labels == "pseudo"
    row["server_state"] = {"normal": normal}  # made before the discriminant existed
    assert evaluation.global_params(row).discriminant is None
    row["server_state"] = {"normal": normal, "discriminant": {"params": [1.0]}}
    with pytest.raises(evaluation.NotEvaluable, match="discriminant"):
        evaluation.global_params(row)


def test_the_label_free_model_of_a_stored_version_counts_both_kinds_of_normal_rows() -> None:
    from streaming.model.detectors import Network
    from streaming.model.features import N_FEATURES, N_POOLED

    rng = np.random.default_rng(3)
    labelled, pseudo = rng.normal(0, 1, (30, N_FEATURES)), rng.normal(2, 1, (12, N_FEATURES))

    def block(rows: np.ndarray) -> dict:
        centred = rows - rows.mean(0)
        return {
            "count": float(len(rows)),
            "mean": rows.mean(0).tolist(),
            "comoment": (centred.T @ centred).ravel().tolist(),
        }

    row = {
        "global_version": 9,
        "hidden": 0,
        "weights": [0.0] * Network(N_POOLED, 0).size,
        "threshold": None,
        "normal_threshold": 1.2,
        "label_source": "pseudo",
        "detector": "label_free",
        "server_state": {"normal": block(labelled), "pseudo_normal": block(pseudo)},
    }
    normal = evaluation.global_params(row).normal
    every = np.vstack([labelled, pseudo])
    assert normal.count == 42
    np.testing.assert_allclose(normal.mean, every.mean(0), rtol=1e-12)
    np.testing.assert_allclose(normal.comoment, np.cov(every.T, ddof=0) * 42, rtol=1e-9, atol=1e-9)
    del row["server_state"]["pseudo_normal"]  # a version made before they travelled apart
    assert evaluation.global_params(row).normal.count == 30
