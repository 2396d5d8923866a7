"""The Spark jobs behind the assets: hourly analytics and held-out evaluation."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from flead_assets.lib import evaluation
from flead_assets.lib.evaluation import GlobalModel
from flead_assets.lib.readings import KafkaSlice, kafka_messages, parse_readings


@dataclass(frozen=True)
class Read:
    readings: DataFrame
    rejected: DataFrame


def read(spark: SparkSession, source: KafkaSlice) -> Read:
    readings, rejected = parse_readings(kafka_messages(spark, source))
    return Read(readings, rejected)


# --- hourly analytics ------------------------------------------------------------------------


def hourly_device_stats(readings: DataFrame) -> DataFrame:
    """Per device and event-time hour: count, mean, std (sample), min, max, anomaly rate
    (labelled anomalies over labelled readings; null when none of the hour is labelled)."""
    return (
        readings.withColumn("hour", F.date_trunc("hour", "ts"))
        .groupBy("device_id", "hour")
        .agg(
            F.count(F.lit(1)).alias("readings"),
            F.mean("value").alias("mean"),
            F.stddev_samp("value").alias("std"),
            F.min("value").alias("min"),
            F.max("value").alias("max"),
            (F.sum("label") / F.count("label")).alias("anomaly_rate"),
        )
    )


# --- held-out evaluation ---------------------------------------------------------------------


def held_out_udf(fraction: float, seed: int):
    @F.pandas_udf(T.BooleanType())
    def held_out(device_id: pd.Series) -> pd.Series:
        return evaluation.held_out_mask(device_id, fraction, seed)

    return held_out


def held_out_features(
    readings: DataFrame, fraction: float, seed: int, feature_set: str
) -> pd.DataFrame:
    """The held-out devices' labelled readings with their features, on the driver.

    Version-independent, so one run computes it once for however many versions it evaluates
    (with the default fleet: ~45k rows, a few MB).
    """
    held = readings.where(held_out_udf(fraction, seed)(F.col("device_id")))
    features = held.groupBy("device_id").applyInPandas(
        functools.partial(evaluation.device_features, feature_set=feature_set),
        schema=evaluation.features_spark_schema(feature_set),
    )
    return features.toPandas()


def held_out_features_of_topic(spark: SparkSession, settings) -> pd.DataFrame:
    """:func:`held_out_features` of the whole readings topic, with the split and features of
    ``settings`` (a :class:`flead.config.Settings`): what every evaluation scores."""
    source = KafkaSlice(settings.kafka_bootstrap, settings.topics.readings)
    return held_out_features(
        read(spark, source).readings,
        settings.holdout_fraction,
        settings.seed,
        settings.feature_set,
    )


def evaluate_versions(
    spark: SparkSession,
    features: pd.DataFrame,
    models: Sequence[GlobalModel],
    database_url: str,
    feature_set: str,
    threshold: float,
) -> pd.DataFrame:
    """Score and store every version on the executors; return their summaries.

    The features are broadcast and the versions distributed, so each executor scores whole
    versions and writes each one in its own transaction (the idempotent unit); nothing of
    size versions × samples is ever shuffled.
    """
    if not models:
        return pd.DataFrame(columns=list(evaluation.SUMMARY_COLUMNS))
    shared = spark.sparkContext.broadcast(features)
    versions = spark.createDataFrame(
        pd.DataFrame(
            {
                "model_version": [m.version for m in models],
                "weights": [list(m.weights) for m in models],
                "bias": [m.bias for m in models],
            }
        ),
        schema="model_version int, weights array<double>, bias double",
    )
    slots = max(1, min(len(models), spark.sparkContext.defaultParallelism))

    def score_and_store(batches):
        yield from evaluation.score_and_store_batches(
            batches, shared.value, database_url, feature_set, threshold
        )

    summaries = (
        versions.repartition(slots)
        .mapInPandas(score_and_store, schema=evaluation.SUMMARY_SPARK_SCHEMA)
        .toPandas()
    )
    shared.unpersist()
    return summaries.sort_values("model_version").reset_index(drop=True)
