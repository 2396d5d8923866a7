"""Binary-classification metrics (positive = anomaly): what every report and table shows.

Accuracy is never shown alone: precision, recall, F1 and Matthews correlation stand beside it,
with the majority-class baseline, because with rare anomalies "always normal" is ~98 % accurate
and with anomaly-heavy data "always anomalous" has a high F1. Only MCC is low for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Confusion:
    """Binary confusion matrix (positive = anomaly) and the metrics DESIGN §4 reports.

    Undefined ratios (no predicted positives, no actual positives, no samples) are 0.0, never
    NaN, so they can be stored and plotted. Confusions add up (``a + b``), e.g. over partitions.
    """

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def samples(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        return _div(self.tp + self.tn, self.samples)

    @property
    def precision(self) -> float:
        return _div(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _div(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _div(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def mcc(self) -> float:
        """Matthews correlation: 0 for any constant predictor (all normal, all anomalous),
        which F1 on anomaly-heavy data is not."""
        tp, fp, tn, fn = (float(v) for v in (self.tp, self.fp, self.tn, self.fn))
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return (tp * tn - fp * fn) / den if den else 0.0

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(
            self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn
        )

    def as_dict(self) -> dict[str, int | float]:
        """Counts and metrics, named as the per-version summary table's columns."""
        return {
            "tp": self.tp,
            "fp": self.fp,
            "tn": self.tn,
            "fn": self.fn,
            "samples": self.samples,
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "mcc": self.mcc,
        }


def _div(num: float, den: float) -> float:
    return float(num) / den if den else 0.0


def _binary(values: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {a.shape}")
    if not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{what} must contain only 0 and 1")
    return a == 1


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> Confusion:
    """Confusion matrix of 0/1 labels ``y_true`` against 0/1 predictions ``y_pred``."""
    t, p = _binary(y_true, "y_true"), _binary(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    return Confusion(
        tp=int(np.count_nonzero(t & p)),
        fp=int(np.count_nonzero(~t & p)),
        tn=int(np.count_nonzero(~t & ~p)),
        fn=int(np.count_nonzero(t & ~p)),
    )


def majority_baseline(y_true: np.ndarray) -> Confusion:
    """What predicting the majority class for every sample scores (ties: "normal").

    With ~2 % anomalies this is ~98 % accuracy and 0 F1: the number any model's accuracy must be
    read against.
    """
    t = _binary(y_true, "y_true")
    majority = 1 if np.count_nonzero(t) > t.size / 2 else 0
    return confusion(t.astype(np.int64), np.full(t.size, majority, dtype=np.int64))


RECENT_READINGS = 5_000
"""Readings the newest versions' pooled prequential figure counts (:func:`newest_pooled`)."""


def newest_pooled(
    by_version: dict[int, Confusion], readings: int = RECENT_READINGS
) -> tuple[int, int, Confusion] | None:
    """``(first, last, counts)``: the prequential counts of the newest versions added up, from
    the newest back to the version that brings the count to ``readings`` (one version's
    readings are often too few for a figure that holds still); None without versions.
    ``flead status`` shows it for the live pipeline, the detection benchmark for the same
    fleet replayed in process."""
    pooled, first = Confusion(0, 0, 0, 0), None
    for version in sorted(by_version, reverse=True):
        if pooled.samples >= readings:
            break
        pooled, first = pooled + by_version[version], version
    if first is None:
        return None
    return first, max(by_version), pooled
