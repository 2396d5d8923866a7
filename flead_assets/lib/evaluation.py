"""Held-out evaluation of global versions: the pandas/numpy core and its PostgreSQL writes.

A version is scored on the held-out devices' readings exactly as a device holding it would
score them: per device, readings in event time cut into messages of ``replay_batch`` readings
(what the replay producer sends), features by :func:`streaming.learner.readings_matrix` and
:func:`streaming.learner.score` from a fresh :class:`~streaming.learner.DeviceState`, decisions
by :class:`streaming.learner.Detector` built from the ``federated_models`` row
(:func:`global_params`, the one place that reads a version from the database). Every labelled
reading counts, as in ``flead evaluate``: readings before a device's warm-up are "normal", as
the device says.

Spark runs these functions on its executors (``applyInPandas`` per device, ``mapInPandas`` per
batch of versions); the benchmark runs the same functions without Spark.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import psycopg
from psycopg.rows import dict_row

from streaming import learner
from streaming.federation import label_free_statistics, saved_discriminant
from streaming.learner import Detector, GlobalParams, LearnerConfig
from streaming.model.detectors import Network, NormalStats
from streaming.model.features import FEATURE_NAMES, N_FEATURES, N_POOLED, Scored
from streaming.model.metrics import confusion, majority_baseline

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
    "mcc",
    "baseline_accuracy",
    "detector",
)
SUMMARY_SPARK_SCHEMA = (
    "model_version int, samples long, tp long, fp long, tn long, fn long, accuracy double,"
    " precision double, recall double, f1 double, mcc double, baseline_accuracy double,"
    " detector string"
)
FEATURE_COLUMNS = [f"f_{name}" for name in FEATURE_NAMES]
"""The learner's features, one column each (``f_`` keeps them clear of the other columns)."""
ROW_COLUMNS = ["device_id", "reading_timestamp", "actual", "warm", "max_abs_z", *FEATURE_COLUMNS]
FEATURES_SPARK_SCHEMA = (
    "device_id string, reading_timestamp timestamp, actual int, warm boolean, max_abs_z double, "
    + ", ".join(f"{c} double" for c in FEATURE_COLUMNS)
)


# --- a global version from its federated_models row -------------------------------------------


class NotEvaluable(ValueError):
    """A ``federated_models`` row the detection learner cannot run (e.g. a first-model row)."""


def _normal_stats(obj: object, version: int) -> NormalStats:
    """The label-free model's statistics: ``{"count", "mean" (F), "comoment" (F×F, flat or
    nested)}``, the form of ``global-model-updates``; absent: an empty model."""
    if obj is None:
        return NormalStats.empty()
    if isinstance(obj, str):
        obj = json.loads(obj)
    if not isinstance(obj, Mapping):
        raise NotEvaluable(f"version {version}: normal statistics must be an object")
    try:
        mean = np.asarray(obj["mean"], dtype=np.float64).reshape(N_FEATURES)
        comoment = np.asarray(obj["comoment"], dtype=np.float64).reshape(N_FEATURES, N_FEATURES)
        count = float(obj["count"])
    except (KeyError, TypeError, ValueError) as exc:
        raise NotEvaluable(f"version {version}: malformed normal statistics ({exc})") from None
    return NormalStats(count, mean, comoment)


def global_params(row: Mapping[str, object]) -> GlobalParams:
    """The :class:`GlobalParams` of one ``federated_models`` row (columns of 001 and 005).

    ``weights`` are the network's parameters (``bias`` is appended when ``weights`` is one
    short, the first model's layout); the normal model's statistics come from a ``normal``
    column where one exists, else from ``server_state``'s ``normal`` and ``pseudo_normal``
    blocks. Rows of the first model
    (no ``hidden``) raise :class:`NotEvaluable`.
    """
    version = int(row["global_version"])
    hidden = row.get("hidden")
    if hidden is None:
        raise NotEvaluable(
            f"version {version} has no 'hidden' column value: a first-model row that the"
            " detection learner cannot score"
        )
    size = Network(N_POOLED, int(hidden)).size
    params = np.asarray(row["weights"], dtype=np.float64)
    if params.size == size - 1:
        params = np.append(params, float(row.get("bias") or 0.0))
    if params.size != size:
        raise NotEvaluable(
            f"version {version}: {params.size} weights, a network with {hidden} hidden units"
            f" has {size}"
        )
    state = row.get("server_state")
    if isinstance(state, str):
        state = json.loads(state)
    normal = _normal_stats(row.get("normal"), version)
    if row.get("normal") is None and isinstance(state, Mapping):
        # The label-free model devices score with (the rule's normal rows absent from a
        # version made before they travelled apart).
        normal = label_free_statistics(
            _normal_stats(state.get("normal"), version),
            _normal_stats(state.get("pseudo_normal"), version),
        )
    discriminant, discriminant_threshold, discriminant_labels = _discriminant(state, version)

    def optional(name: str) -> float | None:
        value = row.get(name)
        return None if value is None else float(value)

    return GlobalParams(
        version=version,
        hidden=int(hidden),
        params=params,
        threshold=optional("threshold"),
        normal=normal,
        normal_threshold=optional("normal_threshold"),
        label_source=str(row.get("label_source") or "ground_truth"),
        detector=str(row.get("detector") or "zscore"),
        discriminant=discriminant,
        discriminant_threshold=discriminant_threshold,
        discriminant_labels=discriminant_labels,
    )


def _discriminant(state: object, version: int) -> tuple[np.ndarray | None, float | None, str]:
    """The version's discriminant, threshold and classes' labels from ``server_state``."""
    try:
        params, threshold, labels = saved_discriminant(state)
        if params is not None:
            params = params.reshape(N_FEATURES + 1)
    except ValueError as exc:
        raise NotEvaluable(f"version {version}: discriminant: {exc}") from None
    return params, threshold, labels


def load_global_params(conn: psycopg.Connection, versions: Sequence[int]) -> list[GlobalParams]:
    with conn.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(
            "SELECT * FROM federated_models WHERE global_version = ANY(%s) ORDER BY global_version",
            (list(versions),),
        ).fetchall()
    return [global_params(row) for row in rows]


# --- the held-out rows (version-independent) --------------------------------------------------


def held_out_mask(device_ids: pd.Series, fraction: float, seed: int) -> pd.Series:
    """``learner.is_held_out`` per row, hashing each distinct device once."""
    flags = {d: learner.is_held_out(d, fraction, seed) for d in device_ids.unique()}
    return device_ids.map(flags).astype(bool)


def _empty_rows() -> pd.DataFrame:
    rows = pd.DataFrame({c: pd.Series(dtype="float64") for c in ROW_COLUMNS})
    return rows.astype({"device_id": object, "actual": "int32", "warm": bool}).assign(
        reading_timestamp=pd.Series(dtype="datetime64[ns, UTC]")
    )[ROW_COLUMNS]


def device_rows(readings: pd.DataFrame, config: LearnerConfig, batch: int) -> pd.DataFrame:
    """One device's readings (``device_id, ts, channels, values, label``, any order) → its
    labelled rows to score, with the features a device computes.

    Readings in event time, cut into messages of ``batch``, through the learner's own scoring
    from a fresh state; unlabelled readings move the state but are not scored. Readings whose
    channels differ from the device's first are left out (the stream dead-letters them).
    """
    if readings.empty:
        return _empty_rows()
    readings = readings.sort_values("ts", kind="stable")
    channels = [tuple(c) for c in readings["channels"]]
    first = channels[0]
    keep = np.fromiter((c == first for c in channels), bool, len(channels))
    readings = readings[keep]
    values = np.asarray([list(v) for v in readings["values"]], dtype=np.float64)
    values = values.reshape(len(readings), len(first))
    state = learner.DeviceState()
    parts = []
    for lo in range(0, len(readings), batch):
        X = learner.readings_matrix(state, first, values[lo : lo + batch])
        parts.append(learner.score(state, X, config))
    features = np.vstack([s.features for s in parts])
    rows = pd.DataFrame(features, columns=FEATURE_COLUMNS)
    rows.insert(0, "device_id", readings["device_id"].to_numpy())
    rows.insert(1, "reading_timestamp", readings["ts"].to_numpy())
    rows.insert(2, "actual", readings["label"].to_numpy())
    rows.insert(3, "warm", np.concatenate([s.warm for s in parts]))
    rows.insert(4, "max_abs_z", np.concatenate([np.abs(s.z).max(axis=1) for s in parts]))
    rows = rows[rows["actual"].notna().to_numpy()].reset_index(drop=True)
    rows["actual"] = rows["actual"].astype("int32")
    return rows


def fleet_rows(readings: pd.DataFrame, config: LearnerConfig, batch: int) -> pd.DataFrame:
    """:func:`device_rows` of every device in ``readings``: the plain pandas path."""
    parts = [device_rows(group, config, batch) for _, group in readings.groupby("device_id")]
    return pd.concat(parts, ignore_index=True) if parts else _empty_rows()


# --- scoring and storing one version ----------------------------------------------------------


@dataclass(frozen=True)
class Evaluated:
    """Per-sample rows of one version (the columns of ``model_evaluations``) and its summary."""

    rows: pd.DataFrame
    summary: dict[str, float | int | str]


def evaluate(rows: pd.DataFrame, detector: Detector) -> Evaluated:
    """The version's decisions on the held-out rows. A device's decision on a reading depends
    on that reading's features only, so all rows are decided in one call."""
    warm = rows["warm"].to_numpy(dtype=bool)
    scored = Scored(
        features=rows[FEATURE_COLUMNS].to_numpy(dtype=np.float64).reshape(len(rows), N_FEATURES),
        z=rows["max_abs_z"].to_numpy(dtype=np.float64).reshape(len(rows), 1),
        warm=warm,
    )
    decision = detector.decide(scored)
    actual = rows["actual"].to_numpy(dtype=np.int64)
    prediction = decision.flagged.astype(np.int64)
    score = np.asarray(decision.score, dtype=np.float64)
    # How sure: the distance of the score from the threshold squashed into [0.5, 1); a reading
    # before the device's warm-up was not decided by the detector (0.5).
    margin = np.abs(np.nan_to_num(score - decision.threshold, nan=0.0))
    confidence = np.where(warm, 1.0 / (1.0 + np.exp(-margin)), 0.5)
    version = int(detector.model.version) if detector.model is not None else 0
    out = pd.DataFrame(
        {
            "model_version": version,
            "device_id": rows["device_id"].to_numpy(),
            "reading_timestamp": rows["reading_timestamp"].to_numpy(),
            "prediction": prediction,
            "actual_result": actual,
            "is_correct": prediction == actual,
            "confidence": confidence,
            "score": score,
            "threshold": float(decision.threshold),
        }
    )
    summary = {
        "model_version": version,
        **confusion(actual, prediction).as_dict(),
        "baseline_accuracy": majority_baseline(actual).accuracy,
        "detector": decision.kind,
    }
    return Evaluated(out, {c: summary[c] for c in SUMMARY_COLUMNS})


_EVALUATION_COLUMNS = (
    "model_version",
    "device_id",
    "reading_timestamp",
    "prediction",
    "actual_result",
    "is_correct",
    "confidence",
    "score",
    "threshold",
)


def _csv(rows: pd.DataFrame) -> str:
    """COPY's CSV form; timestamps are UTC (Spark hands them over naive, in the session's UTC)."""
    ts = pd.to_datetime(rows["reading_timestamp"])
    if ts.dt.tz is None:
        ts = ts.dt.tz_localize("UTC")
    out = rows.assign(
        reading_timestamp=ts.dt.strftime("%Y-%m-%d %H:%M:%S.%f+00"),
        is_correct=np.where(rows["is_correct"], "t", "f"),
    )[list(_EVALUATION_COLUMNS)]
    buffer = io.StringIO()
    out.to_csv(buffer, header=False, index=False, float_format="%.17g")
    return buffer.getvalue()


# Serialises the stores of concurrent Spark tasks: each store decides which versions keep their
# per-reading rows from the summaries committed before it, so two stores must not interleave.
_STORE_LOCK = 0x666C656164_01  # pg_advisory_xact_lock key ("flead", 1)


def store(conn: psycopg.Connection, evaluated: Evaluated, keep_versions: int = 0) -> None:
    """Replace one version's per-sample rows and summary in one transaction: running a
    version twice (a retry, a backfill over evaluated versions) leaves exactly one copy.

    ``keep_versions`` > 0 bounds ``model_evaluations`` (issue 8): per-reading rows are kept only
    for the newest ``keep_versions`` evaluated versions (by version number); older versions keep
    their summary. In the same transaction the rows of versions that fell out are deleted, and a
    version older than the newest ``keep_versions`` (a backfill of history) stores only its
    summary. 0 keeps every version's rows.
    """
    version = int(evaluated.summary["model_version"])
    columns = ", ".join(SUMMARY_COLUMNS)
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in SUMMARY_COLUMNS[1:])
    with conn.transaction():
        if keep_versions > 0:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_STORE_LOCK,))
        conn.execute(
            f"INSERT INTO model_evaluation_summaries ({columns}, created_at)"
            f" VALUES ({', '.join(['%s'] * len(SUMMARY_COLUMNS))}, now())"
            f" ON CONFLICT (model_version) DO UPDATE SET {updates}, created_at = now()",
            [_plain(evaluated.summary[c]) for c in SUMMARY_COLUMNS],
        )
        conn.execute("DELETE FROM model_evaluations WHERE model_version = %s", (version,))
        oldest_kept = oldest_kept_version(conn, keep_versions)
        if oldest_kept is None or version >= oldest_kept:
            with conn.cursor().copy(
                f"COPY model_evaluations ({', '.join(_EVALUATION_COLUMNS)}) FROM STDIN (FORMAT csv)"
            ) as copy:
                copy.write(_csv(evaluated.rows))
        if oldest_kept is not None:
            conn.execute("DELETE FROM model_evaluations WHERE model_version < %s", (oldest_kept,))


def oldest_kept_version(conn: psycopg.Connection, keep_versions: int) -> int | None:
    """The oldest version whose per-reading rows are kept: the ``keep_versions``-th newest
    summary; None when every version keeps its rows (``keep_versions`` 0, or fewer summaries)."""
    if keep_versions <= 0:
        return None
    row = conn.execute(
        "SELECT model_version FROM model_evaluation_summaries"
        " ORDER BY model_version DESC OFFSET %s LIMIT 1",
        (keep_versions - 1,),
    ).fetchone()
    if row is None:
        return None
    return row[0]


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def evaluate_and_store_batches(
    batches: Iterable[pd.DataFrame],
    rows: pd.DataFrame,
    database_url: str,
    config: LearnerConfig,
    keep_versions: int = 0,
) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` body: each batch holds versions (``model_version``); every version is
    read from ``federated_models`` (:func:`load_global_params`), scored on the held-out
    ``rows`` and stored (:func:`store`, with the retention ``keep_versions``); the summaries
    are yielded."""
    with psycopg.connect(database_url) as conn:
        for batch in batches:
            versions = [int(v) for v in batch["model_version"]]
            summaries = []
            for params in load_global_params(conn, versions):
                evaluated = evaluate(rows, Detector(params, config))
                store(conn, evaluated, keep_versions)
                summaries.append(evaluated.summary)
            yield pd.DataFrame(summaries, columns=list(SUMMARY_COLUMNS))
