"""The Spark jobs behind the assets: hourly analytics and held-out evaluation."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from flead import kafka
from flead_assets.lib import evaluation
from flead_assets.lib.readings import KafkaSlice, channel_values, kafka_messages, parse_readings
from streaming.learner import LearnerConfig


@dataclass(frozen=True)
class Read:
    readings: DataFrame
    rejected: DataFrame


def read(spark: SparkSession, source: KafkaSlice) -> Read:
    readings, rejected = parse_readings(kafka_messages(spark, source))
    return Read(readings, rejected)


# --- hourly analytics ------------------------------------------------------------------------


def hourly_device_stats(readings: DataFrame) -> DataFrame:
    """Per device, channel and event-time hour: count, mean, std (sample), min, max, anomaly
    rate (labelled anomalies over labelled readings of the device in the hour, the same for
    each of its channels; null when none of the hour is labelled). A univariate reading is the
    channel ``value``."""
    return (
        channel_values(readings)
        .withColumn("hour", F.date_trunc("hour", "ts"))
        .groupBy("device_id", "channel", "hour")
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


def held_out_rows(
    readings: DataFrame, fraction: float, seed: int, config: LearnerConfig, batch: int
) -> pd.DataFrame:
    """The held-out devices' labelled readings with the features a device computes, on the
    driver (:func:`evaluation.device_rows` per device on the executors).

    Version-independent, so one run computes it once for however many versions it evaluates
    (with the default fleet: ~45k rows, a few MB).
    """
    held = readings.where(held_out_udf(fraction, seed)(F.col("device_id")))
    rows = held.groupBy("device_id").applyInPandas(
        functools.partial(evaluation.device_rows, config=config, batch=batch),
        schema=evaluation.FEATURES_SPARK_SCHEMA,
    )
    return rows.toPandas()


def held_out_rows_of_topic(spark: SparkSession, settings) -> pd.DataFrame:
    """:func:`held_out_rows` of the whole readings topic, with the split, the learner's
    configuration and the message size of ``settings`` (a :class:`flead.config.Settings`):
    what every evaluation scores."""
    source = KafkaSlice(
        settings.kafka_bootstrap,
        settings.topics.readings,
        client=tuple(kafka.java_client_properties(settings, "dagster").items()),
    )
    return held_out_rows(
        read(spark, source).readings,
        settings.holdout_fraction,
        settings.seed,
        LearnerConfig.from_settings(settings),
        settings.replay_batch,
    )


def evaluate_versions(
    spark: SparkSession,
    rows: pd.DataFrame,
    versions: Sequence[int],
    database_url: str,
    config: LearnerConfig,
    keep_versions: int = 0,
) -> pd.DataFrame:
    """Score and store every version on the executors; return their summaries.
    ``keep_versions``: the retention of per-reading rows (:func:`evaluation.store`).

    The held-out rows are broadcast and the version numbers distributed; each executor reads
    its versions from ``federated_models``, scores whole versions and writes each one in its
    own transaction (the idempotent unit); nothing of size versions × samples is shuffled.
    """
    if not versions:
        return pd.DataFrame(columns=list(evaluation.SUMMARY_COLUMNS))
    shared = spark.sparkContext.broadcast(rows)
    frame = spark.createDataFrame(
        pd.DataFrame({"model_version": [int(v) for v in versions]}), schema="model_version int"
    )
    slots = max(1, min(len(versions), spark.sparkContext.defaultParallelism))

    def evaluate_and_store(batches):
        yield from evaluation.evaluate_and_store_batches(
            batches, shared.value, database_url, config, keep_versions
        )

    summaries = (
        frame.repartition(slots)
        .mapInPandas(evaluate_and_store, schema=evaluation.SUMMARY_SPARK_SCHEMA)
        .toPandas()
    )
    shared.unpersist()
    return summaries.sort_values("model_version").reset_index(drop=True)
