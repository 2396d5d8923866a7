"""FLEAD's model math, one package that the edge learner, the federation round, the FedAvg
service, the Spark evaluation and the benchmarks all import (DESIGN §4):

- :mod:`~streaming.model.features`: per-device bounded state and scale-free, channel-count-free
  features (gated baseline, short/long windows, cross-channel Mahalanobis);
- :mod:`~streaming.model.detectors`: the supervised MLP, the label-free normal model and the
  histogram calibration of their thresholds;
- :mod:`~streaming.model.metrics`: confusion matrix, F1, Matthews correlation;
- :mod:`~streaming.model.aggregation`: the aggregation rules.

numpy and the standard library only: the PyFlink job runs in its own environment.
"""
