"""Held-out evaluation of global model versions: the pandas/numpy core and its PostgreSQL writes.

Spark runs these functions on its executors (``applyInPandas`` per device, ``mapInPandas`` per
batch of versions); the benchmark runs the same functions without Spark. The model math is
``streaming.model``'s, so a version is scored on exactly the features the Flink job trains on.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import psycopg

from streaming import edge, model

SUMMARY_COLUMNS = (
    "model_version",
    "samples",
    "tp",
    "fp",
    "tn",
    "fn",
    "accuracy",
    "precision",
    "recall",
    "f1",
    "baseline_accuracy",
)
SUMMARY_SPARK_SCHEMA = (
    "model_version int, samples long, tp long, fp long, tn long, fn long, accuracy double,"
    " precision double, recall double, f1 double, baseline_accuracy double"
)


def feature_columns(feature_set: str) -> list[str]:
    return list(model.FEATURE_NAMES[feature_set])


def features_spark_schema(feature_set: str) -> str:
    columns = ", ".join(f"{name} double" for name in feature_columns(feature_set))
    return f"device_id string, reading_timestamp timestamp, actual int, {columns}"


@dataclass(frozen=True)
class GlobalModel:
    """One row of ``federated_models``: what a version predicts with."""

    version: int
    weights: tuple[float, ...]
    bias: float

    def linear(self) -> model.LinearModel:
        return model.LinearModel(np.asarray(self.weights, dtype=np.float64), self.bias)


def load_global_models(conn: psycopg.Connection, versions: Sequence[int]) -> list[GlobalModel]:
    rows = conn.execute(
        "SELECT global_version, weights, bias FROM federated_models"
        " WHERE global_version = ANY(%s) ORDER BY global_version",
        (list(versions),),
    ).fetchall()
    return [
        GlobalModel(int(v), tuple(float(w) for w in weights), float(b)) for v, weights, b in rows
    ]


def held_out_mask(device_ids: pd.Series, fraction: float, seed: int) -> pd.Series:
    """``edge.is_held_out`` per row, hashing each distinct device once."""
    flags = {d: edge.is_held_out(d, fraction, seed) for d in device_ids.unique()}
    return device_ids.map(flags).astype(bool)


def device_features(
    readings: pd.DataFrame, feature_set: str, warmup: int = model.WARMUP
) -> pd.DataFrame:
    """One device's readings (``device_id, ts, value, label``, any order) → its rows to score.

    Features are computed over the device's whole time-ordered series (unlabelled readings
    still move the running statistics, as in the Flink job); only labelled readings past the
    warm-up are kept: the first ``warmup`` rows have all-zero features and would only measure
    the bias.
    """
    readings = readings.sort_values("ts", kind="stable")
    features = model.series_features(readings["value"].to_numpy(), feature_set, warmup)
    rows = pd.DataFrame(features, columns=feature_columns(feature_set))
    rows.insert(0, "device_id", readings["device_id"].to_numpy())
    rows.insert(1, "reading_timestamp", readings["ts"].to_numpy())
    rows.insert(2, "actual", readings["label"].to_numpy())
    keep = (np.arange(len(rows)) >= warmup) & rows["actual"].notna().to_numpy()
    rows = rows[keep].reset_index(drop=True)
    rows["actual"] = rows["actual"].astype("int32")
    return rows


def fleet_features(readings: pd.DataFrame, feature_set: str) -> pd.DataFrame:
    """:func:`device_features` of every device in ``readings``: the plain pandas path."""
    parts = [device_features(group, feature_set) for _, group in readings.groupby("device_id")]
    if not parts:
        return device_features(readings.iloc[:0], feature_set)
    return pd.concat(parts, ignore_index=True)


@dataclass(frozen=True)
class Scored:
    """Per-sample rows of one version (the columns of ``model_evaluations``) and its summary."""

    rows: pd.DataFrame
    summary: dict[str, float | int]


def score(features: pd.DataFrame, gm: GlobalModel, feature_set: str, threshold: float) -> Scored:
    linear = gm.linear()
    X = features[feature_columns(feature_set)].to_numpy(dtype=np.float64)
    actual = features["actual"].to_numpy(dtype=np.int64)
    p_anomaly = model.predict_proba(linear, X) if len(X) else np.zeros(0)
    prediction = (p_anomaly > threshold).astype(np.int64)  # model.predict's rule, one pass
    rows = pd.DataFrame(
        {
            "model_version": gm.version,
            "device_id": features["device_id"].to_numpy(),
            "reading_timestamp": features["reading_timestamp"].to_numpy(),
            "prediction": prediction,
            "actual_result": actual,
            "is_correct": prediction == actual,
            # The probability of the class predicted, as the original system's "confidence".
            "confidence": np.where(prediction == 1, p_anomaly, 1.0 - p_anomaly),
        }
    )
    counts = model.confusion(actual, prediction)
    summary = {
        "model_version": gm.version,
        **counts.as_dict(),
        "baseline_accuracy": model.majority_baseline(actual).accuracy,
    }
    return Scored(rows, summary)


_EVALUATION_COLUMNS = (
    "model_version, device_id, reading_timestamp, prediction, actual_result, is_correct, confidence"
)


def _csv(rows: pd.DataFrame) -> str:
    """COPY's CSV form; timestamps are UTC (Spark hands them over naive, in the session's UTC)."""
    ts = pd.to_datetime(rows["reading_timestamp"])
    if ts.dt.tz is None:
        ts = ts.dt.tz_localize("UTC")
    out = rows.assign(
        reading_timestamp=ts.dt.strftime("%Y-%m-%d %H:%M:%S.%f+00"),
        is_correct=np.where(rows["is_correct"], "t", "f"),
    )
    buffer = io.StringIO()
    out.to_csv(buffer, header=False, index=False, float_format="%.17g")
    return buffer.getvalue()


def store(conn: psycopg.Connection, scored: Scored) -> None:
    """Replace one version's per-sample rows and summary in one transaction: running a
    version twice (a retry, a backfill over evaluated versions) leaves exactly one copy."""
    version = int(scored.summary["model_version"])
    columns = ", ".join(SUMMARY_COLUMNS)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in SUMMARY_COLUMNS[1:])
    with conn.transaction():
        conn.execute("DELETE FROM model_evaluations WHERE model_version = %s", (version,))
        with conn.cursor().copy(
            f"COPY model_evaluations ({_EVALUATION_COLUMNS}) FROM STDIN (FORMAT csv)"
        ) as copy:
            copy.write(_csv(scored.rows))
        conn.execute(
            f"INSERT INTO model_evaluation_summaries ({columns}, created_at)"
            f" VALUES ({', '.join(['%s'] * len(SUMMARY_COLUMNS))}, now())"
            f" ON CONFLICT (model_version) DO UPDATE SET {updates}, created_at = now()",
            [scored.summary[c] for c in SUMMARY_COLUMNS],
        )


def score_and_store_batches(
    batches: Iterable[pd.DataFrame],
    features: pd.DataFrame,
    database_url: str,
    feature_set: str,
    threshold: float,
) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` body: each batch holds versions (``model_version, weights, bias``);
    every version is scored on the held-out ``features`` and stored; summaries are yielded."""
    with psycopg.connect(database_url) as conn:
        for batch in batches:
            summaries = []
            for version, weights, bias in batch[["model_version", "weights", "bias"]].itertuples(
                index=False
            ):
                gm = GlobalModel(int(version), tuple(float(w) for w in weights), float(bias))
                scored = score(features, gm, feature_set, threshold)
                store(conn, scored)
                summaries.append(scored.summary)
            yield pd.DataFrame(summaries, columns=list(SUMMARY_COLUMNS))
