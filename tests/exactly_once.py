"""Oracles for exactly-once checks, computed independently of the services under test: what
an in-process run of the learner makes from the messages the job read (anomalies and local
rounds), and what FedAvg's stored rows must add up to. Shared by the fault tests
(``test_streaming``, ``test_chaos``) and the cluster-mode failure tests."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from flead.config import Settings
from streaming import learner
from streaming.learner import LearnerConfig
from streaming.messages import decode_local_round, decode_readings
from streaming.model import aggregation
from streaming.model.detectors import Network
from streaming.model.features import N_POOLED
from tests.streaming_harness import query, read_topic

#: What makes a run's outputs computable in-process: devices score with the z-score rule, so
#: which global version a device held when it scored a reading (a matter of timing) cannot change
#: the verdicts; rounds train every ``train_every`` readings only (no timer); versions close at
#: ``fedavg_min_devices`` distinct devices only, never by the clock, each the full weighted step
#: over its rows (:func:`assert_versions_are_weighted_means`); checkpoints every 2 s.
ORACLE_SETTINGS: dict[str, object] = {
    "detector": "zscore",
    "train_network": True,  # the versions' weights check needs rounds that move them
    # A device's own discriminant is solved by the job's numpy and this process's, whose last
    # bits may differ: a score at its threshold could flip. The rule's decisions cannot.
    "personalise": False,
    "holdout_fraction": 0.0,
    "train_interval_s": 3600.0,
    "checkpoint_interval_ms": 2000,
    "fedavg_strategy": "fedavg",
    "fedavg_server_momentum": 0.0,
    "fedavg_round_window_s": 3600.0,
}


def assert_versions_are_weighted_means(settings: Settings) -> int:
    """From the stored rows alone: versions 1..n, each the weighted FedAvg step from the
    previous version (the network's initial parameters before version 1) over the local rounds
    it was built from. Returns n.

    Needs ``fedavg_strategy=fedavg`` and ``fedavg_server_momentum=0``: then version v is
    ``reference + share · Σ W·clip(p − reference) / Σ W`` over the devices of the round (share:
    the round's devices over min(min_devices, devices heard of so far), at most 1), where a device's
    rounds merged within one version count as their weighted mean ``p`` with the summed
    weight ``W = min(samples, train_every + positive_memory) · (1 + staleness)^-alpha``.
    """
    assert settings.fedavg_strategy == "fedavg" and settings.fedavg_server_momentum == 0
    versions = [
        v
        for (v,) in query(
            settings, "SELECT global_version FROM federated_models ORDER BY global_version"
        )
    ]
    assert versions == list(range(1, len(versions) + 1)), "versions have a gap or repeat"
    stored = dict(query(settings, "SELECT global_version, weights FROM federated_models"))
    rule = aggregation.make_rule("fedavg")
    cap = settings.train_every + settings.positive_memory
    alpha = settings.fedavg_staleness_alpha
    reference = Network(N_POOLED, settings.hidden_units).initial()
    known: set[str] = set()
    for version in versions:
        rows = query(
            settings,
            "SELECT device_id, weights, aggregation_weight, samples_processed, global_version"
            " FROM local_models WHERE aggregated_into = %s",
            (version,),
        )
        assert rows, f"version {version} has no local rounds"
        by_device = defaultdict(list)
        for device, weights, weight, samples, base in rows:
            by_device[device].append((np.asarray(weights), weight, samples, base))
        deltas, totals = [], []
        for device, rounds in by_device.items():
            total = sum(w for _, w, _, _ in rounds)
            staleness = version - 1 - max(base for *_, base in rounds)
            expected = min(sum(s for _, _, s, _ in rounds), cap) * (1 + staleness) ** -alpha
            assert total == pytest.approx(expected, rel=1e-9), (version, device)
            params = sum(w * p for p, w, _, _ in rounds) / total
            delta = params - reference
            norm = float(np.linalg.norm(delta))
            if rule.max_update_norm > 0 and norm > rule.max_update_norm:
                delta = delta * (rule.max_update_norm / norm)
            deltas.append(delta)
            totals.append(total)
        # A round of fewer devices than the fleet's full round takes that share of the step:
        # the fleet is every device heard of so far (all within fleet_memory here).
        known.update(by_device)
        full_round = min(settings.fedavg_min_devices, len(known))
        share = min(1.0, len(by_device) / full_round)
        step = np.average(np.vstack(deltas), axis=0, weights=totals)
        np.testing.assert_allclose(stored[version], reference + share * step, rtol=1e-9, atol=1e-9)
        reference = np.asarray(stored[version])
    return len(versions)


def reference(messages: list[tuple[bytes, bytes, int]], config: LearnerConfig):
    """What the job computes, in-process: each message's readings grouped by device (the job's
    parse step), then :func:`learner.observe` and the local rounds (its keyed operator)."""
    states: dict[str, learner.DeviceState] = defaultdict(learner.DeviceState)
    detector = learner.Detector(None, config)
    anomalies: Counter = Counter()
    rounds: dict[str, int] = defaultdict(int)
    for _, value, _ in messages:
        by_device: dict[str, list] = {}
        for reading in decode_readings(value):
            by_device.setdefault(reading.device_id, []).append(reading)
        for device, readings in by_device.items():
            state = states[device]
            for a in learner.observe(state, device, readings, detector, config, True):
                anomalies[
                    anomaly_key(a.device_id, a.timestamp_ms, a.severity, a.z_score, a.value)
                ] += 1
            while learner.round_due(state, config):
                if learner.train_round(state, device, None, config, 0) is not None:
                    rounds[device] += 1
    return anomalies, dict(rounds)


def anomaly_key(device: str, ms: int, severity: str, z: float, value: float) -> tuple:
    return device, int(ms), severity, round(float(z), 6), round(float(value), 6)


def stored_anomalies(settings: Settings) -> Counter:
    rows = query(
        settings,
        "SELECT device_id, (extract(epoch FROM timestamp) * 1000)::bigint, severity, z_score,"
        " value, detector FROM anomalies",
    )
    assert {row[5] for row in rows} <= {"zscore"}
    return Counter(anomaly_key(*row[:5]) for row in rows)


def assert_exactly_once(
    settings: Settings, expected_anomalies: Counter, expected_rounds: dict[str, int]
) -> None:
    # Every reading scored exactly once: the stored rows are the reference's, as multisets.
    stored = stored_anomalies(settings)
    assert sum(stored.values()) == sum(expected_anomalies.values())
    assert stored == expected_anomalies
    # Re-sent after a restore (at-least-once sinks) is allowed on the topic; anything else not.
    on_topic = Counter(
        (a["device_id"], a["timestamp"])
        for a in map(json.loads, read_topic(settings, settings.topics.anomalies))
    )
    assert len(on_topic) == sum(expected_anomalies.values())
    # Every local round: 1..n per device as the reference makes them, each stored once.
    sent = [decode_local_round(v) for v in read_topic(settings, settings.topics.local_updates)]
    rounds_sent: dict[str, set[int]] = defaultdict(set)
    for update in sent:
        rounds_sent[update.device_id].add(update.round)
    assert {d: sorted(r) for d, r in rounds_sent.items()} == {
        d: list(range(1, n + 1)) for d, n in expected_rounds.items()
    }
    rows = Counter(query(settings, "SELECT device_id, model_version FROM local_models"))
    assert max(rows.values()) == 1, "a local round stored twice"
    expected_keys = {(d, r) for d, n in expected_rounds.items() for r in range(1, n + 1)}
    pending = expected_keys - set(rows)
    assert set(rows) <= expected_keys
    # What no version holds is the open round: fewer than fedavg_min_devices devices.
    assert len({device for device, _ in pending}) < settings.fedavg_min_devices, pending
    aggregated = Counter(v for (v,) in query(settings, "SELECT aggregated_into FROM local_models"))
    assert None not in aggregated, "a stored round in no version"
    versions = assert_versions_are_weighted_means(settings)  # 1..v, no gap, each exact
    assert set(aggregated) == set(range(1, versions + 1))
