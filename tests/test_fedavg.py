"""The FedAvg service against the real Kafka broker and PostgreSQL: encoded local rounds in,
versions out, every round in exactly one version, dead letters, restarts and the time window.

The service runs in a thread of the test process (``FedAvgService.run``); rounds are produced
to one partition so their order, and hence every version, is known here."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest
from confluent_kafka import Producer

from flead import kafka
from flead.config import Settings, load_settings
from flead.secrets import secret
from streaming.fedavg import FedAvgService, Offsets, unstorable
from streaming.federation import Federation, FederationConfig
from streaming.learner import LocalRound
from streaming.messages import InvalidMessage, decode_global_params, encode_local_round
from streaming.model.detectors import LOGIT_EDGES, NORMAL_EDGES, Network, NormalStats
from streaming.model.features import N_FEATURES, N_POOLED
from streaming.model.metrics import Confusion
from tests.streaming_harness import dead_letters, read_topic, scalar, wait_for

HIDDEN = 2
NETWORK = Network(N_POOLED, HIDDEN)
FLEET = ["dev_a", "dev_b", "dev_c", "dev_d", "dev_e"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def local_round(
    device: str,
    number: int,
    base: int,
    *,
    seed: int,
    samples: int = 50,
    scored_version: int = 0,
    prequential: Confusion | None = None,
    calibration: bool = False,
    params: np.ndarray | None = None,
) -> LocalRound:
    rng = np.random.default_rng(seed)
    bins = LOGIT_EDGES.size + 1
    hist = (lambda n: rng.integers(0, 5, n).astype(np.float64)) if calibration else np.zeros
    return LocalRound(
        device_id=device,
        round=number,
        base_version=base,
        params=NETWORK.initial() + rng.normal(0, 0.3, NETWORK.size) if params is None else params,
        samples=samples,
        label_source="ground_truth",
        loss=float(rng.uniform(0.1, 1)),
        accuracy=float(rng.uniform(0.5, 1)),
        normal=NormalStats.of(rng.uniform(0, 3, size=(12, N_FEATURES))),
        hist_pos=hist(bins),
        hist_neg=hist(bins) * 10,
        hist_normal=hist(NORMAL_EDGES.size + 1),
        scored_version=scored_version,
        prequential=prequential or Confusion(0, 0, 0, 0),
        timestamp_ms=now_ms(),
    )


def send(settings: Settings, payloads: list[bytes]) -> None:
    """In this order, to partition 0 (one partition: the service reads them in this order)."""
    producer = Producer(kafka.producer_config(settings, "edge"))  # as the devices
    for payload in payloads:
        producer.produce(settings.topics.local_updates, payload, partition=0)
    assert producer.flush(30) == 0


def send_rounds(settings: Settings, rounds: list[LocalRound]) -> None:
    send(settings, [encode_local_round(r) for r in rounds])


def service_settings(settings: Settings, **overrides) -> Settings:
    base = {
        "hidden_units": HIDDEN,
        "fedavg_min_devices": 20,
        "fedavg_round_window_s": 120.0,
        "fedavg_active_window_s": 300.0,
    }
    return dataclasses.replace(settings, **{**base, **overrides})


@contextlib.contextmanager
def running(settings: Settings) -> Iterator[tuple[FedAvgService, threading.Thread]]:
    service = FedAvgService(settings)
    thread = threading.Thread(target=service.run, name="fedavg", daemon=True)
    thread.start()
    try:
        yield service, thread
    finally:
        service.stop()
        thread.join(60)
        assert not thread.is_alive()


def published(settings: Settings) -> list:
    """The versions on the topic, each verified with the service's signing key."""
    key = secret(settings.state_dir, "model_signing_key")
    return [
        decode_global_params(v, key) for v in read_topic(settings, settings.topics.global_updates)
    ]


def versions(settings: Settings) -> int:
    return scalar(settings, "SELECT count(*) FROM federated_models")


def wait_versions(settings: Settings, n: int, timeout: float = 60) -> None:
    wait_for(lambda: versions(settings) >= n, timeout, f"{n} global versions", every=0.2)
    assert versions(settings) == n


def rows(settings: Settings, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute(sql, params).fetchall()


def stored_rounds(settings: Settings) -> Counter:
    return Counter(rows(settings, "SELECT device_id, model_version FROM local_models"))


def check_fedavg(settings: Settings) -> None:
    """Every version's weights = reference + Σw(p − reference)/Σw over its stored rows."""
    stored = rows(settings, "SELECT global_version, weights FROM federated_models ORDER BY 1")
    assert [v for v, _ in stored] == list(range(1, len(stored) + 1)), "versions with a gap"
    reference = NETWORK.initial()
    for version, weights in stored:
        local = rows(
            settings,
            "SELECT weights, aggregation_weight FROM local_models WHERE aggregated_into = %s",
            (version,),
        )
        p = np.array([r[0] for r in local])
        w = np.array([r[1] for r in local])
        expected = reference + w @ (p - reference) / w.sum()
        np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-12)
        reference = np.asarray(weights)


# --- the service's round, end to end -----------------------------------------------------


@pytest.fixture
def fedavg_settings(settings: Settings) -> Settings:
    return service_settings(
        settings, fedavg_strategy="fedavg", fedavg_server_momentum=0.0, fedavg_max_norm=0.0
    )


def test_a_fleet_gets_versions_with_every_round_in_exactly_one(fedavg_settings: Settings):
    s = fedavg_settings
    a, b, c, d, e = FLEET
    first = [
        local_round(a, 1, 0, seed=1),  # alone: the only device heard of → version 1
        *(local_round(x, 1, 0, seed=i) for i, x in enumerate([b, c, d, e], 2)),
        local_round(b, 2, 0, seed=6, samples=30),  # merged into b's first round
        local_round(a, 2, 1, seed=7),  # the fifth of five active devices → version 2
    ]
    preq = Confusion(2, 1, 40, 3)
    second = [
        local_round(x, 3 if x in (a, b) else 2, 2, seed=10 + i, scored_version=2, prequential=preq)
        for i, x in enumerate(FLEET)
    ]
    with running(s) as (service, thread):
        send_rounds(s, first)
        wait_versions(s, 2)
        send_rounds(s, second[:4])
        time.sleep(3)
        assert versions(s) == 2, "a version before all 5 active devices sent a round"
        send_rounds(s, second[4:])
        wait_versions(s, 3)
        assert thread.is_alive() and service.dead_letters == 0

    sent = first + second
    assert stored_rounds(s) == Counter((r.device_id, r.round) for r in sent)
    membership = dict(
        ((d_, r_), v)
        for d_, r_, v in rows(
            s, "SELECT device_id, model_version, aggregated_into FROM local_models"
        )
    )
    assert membership == {
        (a, 1): 1,
        **{(x, 1): 2 for x in (b, c, d, e)},
        (b, 2): 2,
        (a, 2): 2,
        **{(x, 3 if x in (a, b) else 2): 3 for x in FLEET},
    }
    devices = rows(
        s, "SELECT global_version, num_devices, strategy FROM federated_models ORDER BY 1"
    )
    assert devices == [(1, 1, "fedavg"), (2, 5, "fedavg"), (3, 5, "fedavg")]
    check_fedavg(s)
    assert rows(s, "SELECT model_version, tp, fp, tn, fn FROM prequential_evaluations") == [
        (2, 5 * preq.tp, 5 * preq.fp, 5 * preq.tn, 5 * preq.fn)
    ]
    # Published: versions 1..3, keyed by version; committed: every message.
    assert sorted(g.version for g in published(s)) == [1, 2, 3]  # partitioned by version
    # Signed with the deployment's key: with any other key they are forgeries.
    for payload in read_topic(s, s.topics.global_updates):
        with pytest.raises(InvalidMessage, match="badly signed"):
            decode_global_params(payload, "not the service's key")
    assert kafka.consumer_lag(s, s.consumer_group("fedavg"), s.topics.local_updates) == 0


def test_a_device_whose_state_began_again_is_not_taken_for_a_replay(fedavg_settings: Settings):
    """A device silent past the state TTL (or any device after a fresh job) numbers its rounds
    from 1 again, from a state that began later: those rounds are new, while a second copy of
    a stored round (what a restored job re-sends) is skipped."""
    s = fedavg_settings
    first_life = [
        dataclasses.replace(local_round("dev_a", n, n - 1, seed=n), since_ms=1_000) for n in (1, 2)
    ]
    resent = dataclasses.replace(local_round("dev_a", 2, 1, seed=9), since_ms=1_000)
    second_life = dataclasses.replace(local_round("dev_a", 1, 2, seed=3), since_ms=9_000)
    with running(s) as (service, thread):
        for expected, update in enumerate(first_life, 1):
            send_rounds(s, [update])
            wait_versions(s, expected)
        send_rounds(s, [resent])
        wait_for(lambda: service.skipped == 1, 30, "the copy to be skipped", every=0.2)
        send_rounds(s, [second_life])
        wait_versions(s, 3)
        assert thread.is_alive() and service.dead_letters == 0
    assert Counter(
        rows(
            s, "SELECT device_id, state_since_ms, model_version, aggregated_into FROM local_models"
        )
    ) == Counter({("dev_a", 1_000, 1, 1): 1, ("dev_a", 1_000, 2, 2): 1, ("dev_a", 9_000, 1, 3): 1})
    check_fedavg(s)


def test_invalid_rounds_go_to_the_dead_letter_topic_and_the_service_goes_on(
    fedavg_settings: Settings,
):
    s = fedavg_settings
    good = local_round("dev_a", 1, 0, seed=1)
    wrong_size = dataclasses.replace(
        local_round("dev_b", 1, 0, seed=2), params=np.zeros(NETWORK.size + 1)
    )
    huge = json.loads(encode_local_round(local_round("dev_c", 1, 0, seed=3)))
    huge["weights"] = [1e308] * NETWORK.size
    future = local_round("dev_d", 1, 99, seed=4)
    lying = dataclasses.replace(  # statistics no bounded features can give
        local_round("dev_e", 1, 0, seed=6),
        normal=NormalStats(10.0, np.full(N_FEATURES, 11.0), np.eye(N_FEATURES)),
    )
    with running(s) as (service, thread):
        send_rounds(s, [good])
        wait_versions(s, 1)
        send(
            s,
            [
                encode_local_round(wrong_size),
                json.dumps(huge).encode(),
                b"\x00\xff garbage",
                encode_local_round(future),
                encode_local_round(lying),
            ],
        )
        wait_for(lambda: service.dead_letters == 5, 30, "5 dead letters", every=0.2)
        assert thread.is_alive()
        send_rounds(s, [local_round("dev_a", 2, 1, seed=5)])
        wait_versions(s, 2)
        assert thread.is_alive()
    letters = dead_letters(s)
    assert len(letters) == 5
    assert {x["source_topic"] for x in letters} == {s.topics.local_updates}
    reasons = " | ".join(sorted(x["reason"] for x in letters))
    for why in (
        "parameters, the global network has",
        "weights holds",
        "base version 99",
        "normal statistics: a feature mean beyond ±10",
    ):
        assert why in reasons
    assert stored_rounds(s) == Counter({("dev_a", 1): 1, ("dev_a", 2): 1})
    assert kafka.consumer_lag(s, s.consumer_group("fedavg"), s.topics.local_updates) == 0


def test_a_restart_resumes_from_the_stored_server_state(settings: Settings):
    s = service_settings(settings, fedavg_strategy="trimmed_mean")  # default momentum 0.7
    a, b, c, d = FLEET[:4]

    def rnd(device: str, number: int, base: int, seed: int) -> LocalRound:
        return local_round(
            device,
            number,
            base,
            seed=seed,
            calibration=True,
            scored_version=base,
            prequential=Confusion(1, 2, 30, 1) if base else None,
        )

    before = [rnd(a, 1, 0, 1), rnd(b, 1, 0, 2), rnd(c, 1, 0, 3), rnd(d, 1, 0, 4)]
    before += [rnd(a, 2, 1, 5), rnd(b, 2, 2, 6), rnd(c, 2, 2, 7)]  # v1 {a}, v2 {a2 b1 c1 d1}
    after = [rnd(d, 2, 2, 8), rnd(a, 3, 2, 9)]  # b2, c2 were buffered: → v3
    with running(s):
        send_rounds(s, before)
        wait_versions(s, 2)
        time.sleep(2)  # b2 and c2 buffered, not committed, when the service stops
    assert versions(s) == 2
    with running(s) as (service, _):
        send_rounds(s, after)
        wait_versions(s, 3)
        assert service.skipped == 0

    reference = Federation(FederationConfig.from_settings(s))
    made = []
    for r in before + after:
        reference.add(r)
        if reference.due(r.timestamp_ms):
            made.append(reference.close(r.timestamp_ms))
    assert [v.model.version for v in made] == [1, 2, 3]
    expected = made[-1].model
    (weights, threshold, normal_threshold, detector, label_source, num_devices) = rows(
        s,
        "SELECT weights, threshold, normal_threshold, detector, label_source, num_devices"
        " FROM federated_models WHERE global_version = 3",
    )[0]
    np.testing.assert_array_equal(weights, expected.params)
    assert (threshold, normal_threshold, detector, label_source, num_devices) == (
        expected.threshold,
        expected.normal_threshold,
        expected.detector,
        expected.label_source,
        made[-1].num_devices,
    )
    versions_published = published(s)
    assert sorted(g.version for g in versions_published) == [1, 2, 2, 3]  # v2 again on start
    last = next(g for g in versions_published if g.version == 3)
    np.testing.assert_array_equal(last.normal.comoment, expected.normal.comoment)
    assert stored_rounds(s) == Counter((r.device_id, r.round) for r in before + after)
    preq = rows(s, "SELECT model_version, tp, fp, tn, fn FROM prequential_evaluations ORDER BY 1")
    assert preq == [(1, 1, 2, 30, 1), (2, 4, 8, 120, 4)]


def test_the_time_window_closes_a_round_on_a_quiet_fleet(settings: Settings):
    s = service_settings(settings, fedavg_round_window_s=2.0)
    with running(s):
        send_rounds(s, [local_round("dev_a", 1, 0, seed=1)])
        wait_versions(s, 1)
        late = local_round("dev_b", 1, 0, seed=2)  # dev_a is active: the round waits for it
        send_rounds(s, [late])
        wait_versions(s, 2, timeout=30)
    created, num_devices = rows(
        s, "SELECT created_at, num_devices FROM federated_models WHERE global_version = 2"
    )[0]
    assert num_devices == 1
    assert created.timestamp() * 1000 - late.timestamp_ms >= 2000


def test_rounds_postgresql_would_refuse_are_found_one_by_one(fedavg_settings: Settings):
    """Rounds built in-process (past the decoder, which refuses them too): a NUL in the id and
    a round number beyond PostgreSQL's integer are refused with the reason, the others not;
    nothing is written; a round already stored is a replay, not refused."""
    s = fedavg_settings
    good = local_round("dev_a", 1, 0, seed=1)
    nul = local_round("dev\x00b", 1, 0, seed=2)
    big = local_round("dev_c", 2**31, 0, seed=3)
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        refused = unstorable(conn, [good, nul, big, good])
        assert sorted(refused) == [1, 2]
        assert "PostgreSQL would refuse" in refused[1] and "NUL" in refused[1]
        assert "out of range" in refused[2]
        assert unstorable(conn, [good]) == {}
        assert conn.execute("SELECT count(*) FROM local_models").fetchone()[0] == 0


# --- pure parts ----------------------------------------------------------------------------


class FakeMessage:
    def __init__(self, partition: int, offset: int) -> None:
        self._p, self._o = partition, offset

    def topic(self) -> str:
        return "t"

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


def test_a_refused_message_is_committed_only_after_every_earlier_one_of_its_partition():
    offsets = Offsets()
    buffered = offsets.consumed(FakeMessage(0, 0))
    offsets.consumed(FakeMessage(0, 1), done=True)  # refused after a buffered round
    offsets.consumed(FakeMessage(1, 0), done=True)  # refused, nothing before it
    assert [(tp.partition, tp.offset) for tp in offsets.committable()] == [(1, 1)]
    later = offsets.consumed(FakeMessage(0, 2))  # buffered after the version's rounds
    buffered.done = True
    assert [(tp.partition, tp.offset) for tp in offsets.committable()] == [(0, 2)]
    assert offsets.committable() == []
    later.done = True
    assert [(tp.partition, tp.offset) for tp in offsets.committable()] == [(0, 3)]


def test_settings_reach_the_rule():
    config = FederationConfig.from_settings(
        load_settings(
            {
                "FLEAD_FEDAVG_STRATEGY": "trimmed_mean",
                "FLEAD_FEDAVG_TRIM_FRACTION": "0.3",
                "FLEAD_FEDAVG_MAX_NORM": "5",
                "FLEAD_FEDAVG_STALENESS_ALPHA": "0.25",
            }
        )
    )
    rule = config.make_rule()
    assert (rule.name, rule.trim_fraction, rule.max_update_norm, rule.staleness_alpha) == (
        "trimmed_mean",
        0.3,
        5.0,
        0.25,
    )
    assert config.make_rule().max_samples == 50 + 32
    with pytest.raises(ValueError, match="FLEAD_FEDAVG"):
        FederationConfig.from_settings(load_settings({"FLEAD_FEDAVG_STRATEGY": "mean"}))


def test_the_server_state_keeps_the_discriminant_across_a_restart():
    from streaming.fedavg import state_from_row, state_to_json

    rng = np.random.default_rng(5)
    fed = Federation(FederationConfig(min_devices=1, hidden=HIDDEN))
    round_ = LocalRound(
        device_id="dev_a",
        round=1,
        base_version=0,
        params=NETWORK.initial(),
        samples=40,
        label_source="ground_truth",
        loss=0.5,
        accuracy=0.9,
        normal=NormalStats.of(rng.normal(0, 1, (34, N_FEATURES))),
        hist_pos=np.zeros(LOGIT_EDGES.size + 1),
        hist_neg=np.zeros(LOGIT_EDGES.size + 1),
        hist_normal=np.zeros(NORMAL_EDGES.size + 1),
        scored_version=0,
        prequential=Confusion(0, 0, 0, 0),
        timestamp_ms=0,
        anomalous=NormalStats.of(rng.normal(2, 1, (6, N_FEATURES))),
        hist_disc_pos=np.eye(LOGIT_EDGES.size + 1)[60] * 3,
        pseudo_normal=NormalStats.of(rng.normal(0.5, 1, (10, N_FEATURES))),
        pseudo_anomalous=NormalStats.of(rng.normal(3, 1, (3, N_FEATURES))),
    )
    fed.add(round_)
    model = fed.close(0).model
    assert model.discriminant is not None and model.discriminant_threshold is not None
    fed.state.discriminant_since = 1  # as if its labels had changed with version 1
    saved = json.loads(json.dumps(state_to_json(fed)))  # as jsonb gives it back
    assert "candidates" not in saved
    row = (model.version, model.hidden, model.params.tolist(), model.threshold,
           model.normal_threshold, model.label_source, model.detector, saved)  # fmt: skip
    state, _ = state_from_row(row)
    np.testing.assert_array_equal(state.current.discriminant, model.discriminant)
    assert state.current.discriminant_threshold == model.discriminant_threshold
    assert state.current.discriminant_labels == "ground_truth"
    assert state.anomalous.count == 6 and state.pseudo_normal.count == 10
    assert state.pseudo_anomalous.count == 3 and state.discriminant_since == 1
    np.testing.assert_array_equal(state.pseudo_anomalous.mean, fed.state.pseudo_anomalous.mean)
    np.testing.assert_array_equal(state.anomalous.comoment, fed.state.anomalous.comoment)
    np.testing.assert_array_equal(state.pseudo_normal.comoment, fed.state.pseudo_normal.comoment)
    assert state.current.normal.count == 44  # the label-free model: both kinds of normal rows
    np.testing.assert_allclose(state.current.normal.mean, model.normal.mean, rtol=1e-12)
    np.testing.assert_array_equal(state.hist_disc_pos, fed.state.hist_disc_pos)
    # A state saved while per-detector counts were kept: they are ignored.
    saved["candidates"] = {"supervised": [4.0, 1.0, 40.0, 0.0], "zscore": [1.0, 6.0, 35.0, 3.0]}
    state, _ = state_from_row((*row[:-1], saved))
    np.testing.assert_array_equal(state.current.discriminant, model.discriminant)
    assert state.anomalous.count == 6
    # A state saved before the discriminant existed: none, and empty statistics.
    for key in ("anomalous", "pseudo_normal", "pseudo_anomalous", "discriminant_since",
                "hist_disc_pos", "hist_disc_neg", "discriminant"):  # fmt: skip
        del saved[key]
    state, _ = state_from_row((*row[:-1], saved))
    assert state.current.discriminant is None and state.anomalous.count == 0
    assert state.pseudo_normal.count == state.pseudo_anomalous.count == 0
    assert state.discriminant_since == 0
    assert state.hist_disc_neg.sum() == 0


def test_a_server_state_of_the_18_feature_layout_restarts_the_statistical_models():
    from streaming.fedavg import state_from_row, state_to_json

    rng = np.random.default_rng(6)
    fed = Federation(FederationConfig(min_devices=1, hidden=HIDDEN))
    fed.state.normal = NormalStats.of(rng.normal(0, 1, (30, N_FEATURES)))
    fed.state.hist_normal = np.ones(NORMAL_EDGES.size + 1)
    saved = json.loads(json.dumps(state_to_json(fed)))
    # What a service before the channel slots stored: 18 pooled features' statistics.
    saved["normal"] = {"count": 30.0, "mean": [0.0] * 18, "comoment": [[1.0] * 18] * 18}
    saved["discriminant"] = {"params": [0.5] * 19, "threshold": 1.0}
    weights = NETWORK.initial() + 0.25
    row = (7, HIDDEN, weights.tolist(), 0.5, 2.0, "ground_truth", "discriminant", saved)
    state, _ = state_from_row(row)
    np.testing.assert_array_equal(state.current.params, weights)  # the network goes on
    assert state.current.threshold == 0.5 and state.current.version == 7
    assert state.normal.count == 0 and state.normal.mean.shape == (N_FEATURES,)
    assert state.current.discriminant is None and state.current.normal_threshold is None
    assert state.hist_normal.sum() == 0
    # The next round makes a version of the new layout from the devices' statistics alone.
    next_fed = Federation(FederationConfig(min_devices=1, hidden=HIDDEN), state)
    update = local_round("dev_a", 1, 7, seed=6, samples=12, scored_version=7, params=weights)
    next_fed.add(update)
    assert next_fed.close(0).model.normal.count == 12
