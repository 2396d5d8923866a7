"""``model_evaluations``: every global version scored on held-out labelled readings (Spark).

One dynamic partition per global version (key = the version number as text). A run over
several versions (a sensor tick with many new versions, a backfill: ``BackfillPolicy.single_run``)
starts Spark once, reads the held-out readings once and computes their features once; then
each version is scored and written in its own transaction, so every version stays
individually idempotent.
"""

from collections.abc import Iterator, Sequence

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    BackfillPolicy,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)
from dagster_pyspark import LazyPySparkResource

from flead_assets.assets.external import EDGE_IIOT_STREAM, FEDERATED_MODELS
from flead_assets.lib import evaluation, spark_jobs
from flead_assets.resources.settings import FleadResource
from flead_assets.resources.spark import session
from streaming.learner import LearnerConfig

GROUP = "evaluation"
MODEL_EVALUATIONS = AssetKey("model_evaluations")
MODEL_EVALUATION_SUMMARIES = AssetKey("model_evaluation_summaries")

global_versions = DynamicPartitionsDefinition(name="global_versions")
"""One partition per row of ``federated_models``; the sensor adds them as versions appear."""

CHECKS = [
    AssetCheckSpec(
        "samples_positive",
        asset=MODEL_EVALUATION_SUMMARIES,
        description="Every evaluated version was scored on at least one held-out reading.",
    ),
    AssetCheckSpec(
        "metrics_in_unit_interval",
        asset=MODEL_EVALUATION_SUMMARIES,
        description="accuracy, precision, recall, F1 and the baseline are all within [0, 1],"
        " MCC within [-1, 1].",
    ),
    AssetCheckSpec(
        "one_summary_per_version",
        asset=MODEL_EVALUATION_SUMMARIES,
        description="Exactly one summary row per evaluated version, and its sample count"
        " equals the version's per-sample rows (none for versions older than the newest"
        " evaluation_keep_versions, whose rows are pruned).",
    ),
]


def versions_of(context: AssetExecutionContext) -> list[int]:
    return sorted(int(key) for key in context.partition_keys)


def run_evaluation(
    spark, flead: FleadResource, versions: Sequence[int]
) -> tuple[pd.DataFrame, int]:
    """Evaluate ``versions``; their summaries and the held-out samples each was scored on."""
    settings = flead.settings
    with flead.connect() as conn:
        try:
            found = {p.version for p in evaluation.load_global_params(conn, versions)}
        except evaluation.NotEvaluable as exc:
            raise Failure(str(exc)) from exc
    missing = sorted(set(versions) - found)
    if missing:
        raise Failure(f"global versions not in federated_models: {missing[:20]}")
    rows = spark_jobs.held_out_rows_of_topic(spark, settings)
    summaries = spark_jobs.evaluate_versions(
        spark,
        rows,
        sorted(found),
        settings.database_url,
        LearnerConfig.from_settings(settings),
        settings.evaluation_keep_versions,
    )
    return summaries, len(rows)


def check_results(flead: FleadResource, versions: Sequence[int]) -> Iterator[AssetCheckResult]:
    """The checks read what was stored, not what was computed: they guard the tables. A
    version older than the retention (``evaluation_keep_versions``) must have no per-sample
    rows left; a newer one exactly its summary's sample count."""
    with flead.connect() as conn:
        oldest_kept = evaluation.oldest_kept_version(conn, flead.settings.evaluation_keep_versions)
        rows = conn.execute(
            "SELECT v, count(s.model_version), min(s.samples),"
            " bool_and(s.accuracy BETWEEN 0 AND 1 AND s.precision BETWEEN 0 AND 1"
            "          AND s.recall BETWEEN 0 AND 1 AND s.f1 BETWEEN 0 AND 1"
            "          AND coalesce(s.mcc BETWEEN -1 AND 1, true)"
            "          AND s.baseline_accuracy BETWEEN 0 AND 1),"
            " (SELECT count(*) FROM model_evaluations e WHERE e.model_version = v)"
            " FROM unnest(%s::int[]) AS v"
            " LEFT JOIN model_evaluation_summaries s ON s.model_version = v GROUP BY v ORDER BY v",
            (list(versions),),
        ).fetchall()
    no_samples = [v for v, _, samples, _, _ in rows if not samples]
    out_of_range = [v for v, _, _, in_range, _ in rows if in_range is False]

    def expected_rows(version: int, samples: int | None) -> int | None:
        return 0 if oldest_kept is not None and version < oldest_kept else samples

    not_one = [
        v for v, n, samples, _, stored in rows if n != 1 or stored != expected_rows(v, samples)
    ]
    for name, bad in (
        ("samples_positive", no_samples),
        ("metrics_in_unit_interval", out_of_range),
        ("one_summary_per_version", not_one),
    ):
        yield AssetCheckResult(
            asset_key=MODEL_EVALUATION_SUMMARIES,
            check_name=name,
            passed=not bad,
            severity=AssetCheckSeverity.ERROR,
            metadata={"versions_checked": len(rows), "failing_versions": str(bad[:50])},
        )


def _summary_metadata(summaries: pd.DataFrame, samples: int) -> dict[str, object]:
    latest = summaries.iloc[-1]
    table = summaries[
        ["model_version", "detector", "samples", "accuracy", "precision", "recall", "f1", "mcc"]
    ]
    return {
        "versions": len(summaries),
        "first_version": int(summaries["model_version"].min()),
        "last_version": int(summaries["model_version"].max()),
        "held_out_samples": samples,
        "latest_f1": float(latest["f1"]),
        "latest_mcc": float(latest["mcc"]),
        "latest_detector": str(latest["detector"]),
        "latest_accuracy": float(latest["accuracy"]),
        "baseline_accuracy": float(latest["baseline_accuracy"]),
        "summaries": MetadataValue.md(table.tail(20).to_markdown(index=False, floatfmt=".4f")),
    }


@multi_asset(
    specs=[
        AssetSpec(
            MODEL_EVALUATIONS,
            description="Per-sample decisions of each global version on the held-out devices'"
            " labelled readings, scored as a device holding the version would (prediction,"
            " actual, is_correct, confidence, the detector's score and threshold).",
            deps=[FEDERATED_MODELS, EDGE_IIOT_STREAM],
            kinds={"spark", "postgres"},
            metadata={"dagster/table_name": "public.model_evaluations"},
        ),
        AssetSpec(
            MODEL_EVALUATION_SUMMARIES,
            description="One row per global version: TP, FP, TN, FN, accuracy, precision,"
            " recall, F1, MCC, samples, the detector it decided with and the majority-class"
            " baseline.",
            deps=[FEDERATED_MODELS, EDGE_IIOT_STREAM],
            kinds={"spark", "postgres"},
            metadata={"dagster/table_name": "public.model_evaluation_summaries"},
        ),
    ],
    check_specs=CHECKS,
    partitions_def=global_versions,
    backfill_policy=BackfillPolicy.single_run(),
    group_name=GROUP,
    pool="spark",
)
def model_evaluations(
    context: AssetExecutionContext, flead: FleadResource, pyspark: LazyPySparkResource
):
    versions = versions_of(context)
    context.log.info("evaluating %d versions: %s … %s", len(versions), versions[0], versions[-1])
    summaries, samples = run_evaluation(session(pyspark), flead, versions)
    metadata = _summary_metadata(summaries, samples)
    yield MaterializeResult(
        asset_key=MODEL_EVALUATIONS,
        metadata={**metadata, "dagster/row_count": int(summaries["samples"].sum())},
    )
    yield MaterializeResult(
        asset_key=MODEL_EVALUATION_SUMMARIES,
        metadata={**metadata, "dagster/row_count": len(summaries)},
    )
    yield from check_results(flead, versions)
