"""FLEAD's model math, one package that the edge learner, the federation round, the FedAvg
service, the Spark evaluation and the benchmarks all import (DESIGN §4):

- :mod:`~streaming.model.features`: per-device bounded state and scale-free, channel-count-free
  features (gated baseline, short/long windows, cross-channel Mahalanobis);
- :mod:`~streaming.model.detectors`: the supervised MLP, the label-free normal model and the
  histogram calibration of their thresholds;
- :mod:`~streaming.model.metrics`: confusion matrix, F1, Matthews correlation;
- :mod:`~streaming.model.aggregation`: the aggregation rules;
- :mod:`~streaming.model.legacy`: the first model (univariate z features, 4-weight logistic
  regression), still run by the streaming tier until it moves to the learner.

numpy and the standard library only: the PyFlink job runs in its own environment.
"""

from streaming.model.legacy import *  # noqa: F403  (the streaming tier's current model)
from streaming.model.legacy import _series_ratio  # noqa: F401
