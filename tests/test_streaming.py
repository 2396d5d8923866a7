"""The streaming tier end to end: real Kafka, a real Flink mini-cluster, the FedAvg service,
the anomaly sink and PostgreSQL, plus the fault cases (kill -9, restore from checkpoint,
malformed input on every topic)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime

import numpy as np
import pytest
from confluent_kafka import Producer

from flead import kafka, services
from flead.config import Settings
from flead.secrets import secret
from streaming import learner
from streaming.learner import LearnerConfig, LocalRound
from streaming.messages import (
    Reading,
    decode_anomaly,
    decode_local_round,
    encode_global_params,
    encode_local_round,
    encode_reading_batch,
)
from streaming.model.detectors import LOGIT_EDGES, NORMAL_EDGES, Network, NormalStats
from streaming.model.features import N_FEATURES, N_POOLED
from streaming.model.metrics import Confusion
from streaming.replay import replay
from streaming.sources import synthetic_fleet
from tests.conftest import MALFORMED, isolated, table_counts, wait_until_consumed
from tests.exactly_once import assert_versions_are_weighted_means
from tests.streaming_harness import (
    dead_letters,
    group_lag,
    query,
    read_topic,
    scalar,
    settled,
    start,
    stop,
    topic_count,
    wait_for,
)

pytestmark = pytest.mark.integration


def assert_anomaly_rows_are_complete(settings: Settings) -> None:
    """Every stored anomaly says what flagged it and why."""
    assert (
        scalar(
            settings,
            "SELECT count(*) FROM anomalies WHERE score IS NULL OR threshold IS NULL"
            " OR model_version IS NULL OR detector IS NULL OR channels IS NULL"
            " OR cardinality(channels) = 0 OR reason IS NULL OR reason = ''",
        )
        == 0
    )


def test_pipeline_scores_trains_and_federates(pipeline: Settings) -> None:
    anomalies = scalar(pipeline, "SELECT count(*) FROM anomalies")
    assert anomalies > 0
    assert scalar(pipeline, "SELECT count(*) FROM local_models") > 0
    size = Network(N_POOLED, pipeline.hidden_units).size
    assert scalar(pipeline, "SELECT min(cardinality(weights)) FROM local_models") == size
    assert scalar(pipeline, "SELECT max(cardinality(weights)) FROM local_models") == size
    assert scalar(pipeline, "SELECT count(*) FROM federated_models") >= 3
    assert_anomaly_rows_are_complete(pipeline)


def test_devices_adopt_global_models(pipeline: Settings) -> None:
    updates = [
        decode_local_round(v)
        for v in read_topic(pipeline, pipeline.topics.local_updates)
        if b'"weights":[' in v
    ]
    assert max(u.base_version for u in updates) >= 1
    assert scalar(pipeline, "SELECT count(*) FROM local_models WHERE global_version >= 1") > 0


def test_every_global_version_is_the_weighted_mean_of_its_updates(pipeline: Settings) -> None:
    assert assert_versions_are_weighted_means(pipeline) >= 3


def test_held_out_devices_are_scored_but_never_train(pipeline: Settings) -> None:
    trained = {d for (d,) in query(pipeline, "SELECT DISTINCT device_id FROM local_models")}
    scored = {d for (d,) in query(pipeline, "SELECT DISTINCT device_id FROM anomalies")}
    held_out = {
        d for d in scored if learner.is_held_out(d, pipeline.holdout_fraction, pipeline.seed)
    }
    assert held_out, "some held-out devices should have anomalies"
    assert not held_out & trained


def test_anomalies_table_holds_each_anomaly_once(pipeline: Settings) -> None:
    keys = {
        (json.loads(v)["device_id"], json.loads(v)["timestamp"])
        for v in read_topic(pipeline, pipeline.topics.anomalies)
        if b'"z_score"' in v
    }
    assert scalar(pipeline, "SELECT count(*) FROM anomalies") == len(keys)


def test_malformed_input_on_every_topic_is_dead_lettered(pipeline: Settings) -> None:
    records = dead_letters(pipeline)
    by_topic = defaultdict(list)
    for record in records:
        by_topic[record["source_topic"]].append(record["reason"])
    for topic, values in MALFORMED.items():
        name = getattr(pipeline.topics, topic)
        expected = len(values) + (name == pipeline.topics.readings)  # + the channel change
        assert len(by_topic[name]) == expected, f"dead letters from {name}: {by_topic[name]}"
        assert all(by_topic[name])
    # The channel change of device_0002 mid-stream (conftest.CHANNEL_CHANGE), with the reason.
    changed = [r for r in by_topic[pipeline.topics.readings] if "differ from the device's" in r]
    assert len(changed) == 1, by_topic[pipeline.topics.readings]
    assert "['humidity', 'temperature']" in changed[0] and "['value']" in changed[0]
    # ... and the pipeline went on: everything after the bad messages was processed.
    assert scalar(pipeline, "SELECT count(*) FROM federated_models") >= 3


# --- a multichannel fleet: the learner's detectors in the live tier ------------------------

CHANNELS = ("flow", "pressure", "temperature")


def multichannel_fleet(devices: int = 5, readings: int = 600, seed: int = 7) -> list[Reading]:
    """Three channels driven by one slow process per device (strongly correlated), labelled
    anomalies that break the correlation: one channel moves by ~1.5 of its own standard
    deviations (the z-score rule mostly misses it) but by many times the residual noise (the
    multichannel features see it)."""
    rng = np.random.default_rng(seed)
    start_ms = int(datetime(2025, 11, 7, tzinfo=UTC).timestamp() * 1000)
    out = []
    for d in range(devices):
        level = np.zeros(readings)
        for k in range(1, readings):
            level[k] = 0.98 * level[k - 1] + rng.normal(0, 0.2)  # stationary sd ~1
        values = np.column_stack(
            (
                20 + 2 * level + rng.normal(0, 0.2, readings),
                50 - 3 * level + rng.normal(0, 0.3, readings),
                5 + 0.5 * level + rng.normal(0, 0.05, readings),
            )
        )
        labels = np.zeros(readings, dtype=int)
        for at in rng.choice(np.arange(60, readings - 3), size=readings // 50, replace=False):
            channel = int(rng.integers(0, 3))
            scale = (2.0, 3.0, 0.5)[channel] * 1.5 * rng.choice((-1, 1))
            values[at : at + 2, channel] += scale
            labels[at : at + 2] = 1
        offset = d * 1000
        out += [
            Reading(
                f"line{d}-press",
                start_ms + offset + k * 10_000,
                tuple(values[k].tolist()),
                int(labels[k]),
                CHANNELS,
            )
            for k in range(readings)
        ]
    return sorted(out, key=lambda r: r.timestamp_ms)


def version_count(settings: Settings) -> int:
    return scalar(settings, "SELECT count(*) FROM federated_models")


def test_multichannel_fleet_gets_versions_and_model_detections(
    kafka_broker: Settings, database: str, tmp_path
) -> None:
    """Five 3-channel devices, FedAvg with its defaults (a round closes at min(20, active
    devices)): global versions appear, and once devices hold a calibrated version the anomaly
    records come from its detector, each saying which version, detector, score and why."""
    # detector=supervised: the devices score with the version's network once it is calibrated.
    # (With ``auto`` the server picks by a fixed preference, the discriminant, then the
    # label-free model, then the z-score rule: it never picks the network itself.)
    settings = isolated(
        kafka_broker,
        database,
        state_dir=tmp_path,
        train_interval_s=3.0,
        holdout_fraction=0.0,
        detector="supervised",
    )
    readings = multichannel_fleet()
    per_chunk = 5 * 50  # one round's readings per device
    producer = kafka.producer_config(settings, "replay")
    for name in services.STREAMING_SERVICES:
        start(settings, name)
    try:
        for first in range(0, len(readings), per_chunk):
            replay(
                readings[first : first + per_chunk],
                producer,
                settings.topics.readings,
                progress=False,
                batch=settings.replay_batch,
            )
            wait_until_consumed(settings)
            before = version_count(settings)
            # Let the round close, so that the next chunk is scored by the newest version.
            with contextlib.suppress(AssertionError):
                wait_for(lambda b=before: version_count(settings) > b, 10, "a version", every=0.3)
        settled(lambda: table_counts(settings), quiet_s=8, timeout=120, what="the outputs")
    finally:
        for name in services.STREAMING_SERVICES:
            stop(settings, name)

    assert scalar(settings, "SELECT count(*) FROM federated_models") >= 3
    size = Network(N_POOLED, settings.hidden_units).size
    assert scalar(settings, "SELECT min(cardinality(weights)) FROM local_models") == size
    assert scalar(settings, "SELECT count(DISTINCT device_id) FROM local_models") == 5
    assert_anomaly_rows_are_complete(settings)
    by_model = query(
        settings,
        "SELECT detector, min(model_version), count(*) FROM anomalies"
        " WHERE model_version > 0 GROUP BY detector",
    )
    assert by_model, "no anomaly was flagged by a global version's detector"
    assert all(detector != "zscore" for detector, _, _ in by_model), by_model
    channels = {c for (cs,) in query(settings, "SELECT channels FROM anomalies") for c in cs}
    assert channels <= set(CHANNELS)


def test_a_device_the_version_misses_flags_with_its_own_model_live(
    kafka_broker: Settings, database: str, tmp_path
) -> None:
    """The Flink job alone, a signed version whose discriminant never flags in the FedAvg
    service's place, and one device with labelled level shifts: the device's own model takes
    over (``personal`` anomaly records), and the job's records are exactly those of the same
    learner functions run here on the same messages (the personal model in keyed state as
    bytes between messages, rounds folded into it)."""
    s = isolated(
        kafka_broker,
        database,
        state_dir=tmp_path,
        holdout_fraction=0.0,
        train_interval_s=3600.0,  # rounds by count only, as the in-process run makes them
        checkpoint_interval_ms=1000,
    )
    config = LearnerConfig.from_settings(s)
    blind = learner.GlobalParams(
        version=4,
        hidden=s.hidden_units,
        params=Network(N_POOLED, s.hidden_units).initial(),
        threshold=None,
        normal=NormalStats.empty(),
        normal_threshold=None,
        label_source="ground_truth",
        detector="discriminant",
        discriminant=np.r_[np.zeros(N_FEATURES), -1.0],  # scores -1: never >= 0
        discriminant_threshold=0.0,
    )
    rng = np.random.default_rng(11)
    values = rng.normal(size=(800, 2)) * [5.0, 0.3] + [60.0, 21.0]
    labels = np.zeros(800, dtype=int)
    for at in range(50, 800, 100):
        values[at : at + 25, 0] += 12.0
        labels[at : at + 25] = 1
    start_ms = int(datetime(2025, 11, 7, tzinfo=UTC).timestamp() * 1000)
    readings = [
        Reading("pump-7", start_ms + 1000 * k, tuple(values[k]), int(labels[k]), ("flow", "temp"))
        for k in range(800)
    ]
    messages = [readings[k : k + 25] for k in range(0, 800, 25)]

    state, expected = learner.DeviceState(), Counter()
    detector = learner.Detector(blind, config)
    for batch in messages:
        for a in learner.observe(state, "pump-7", batch, detector, config, True):
            expected[(a.timestamp_ms, a.detector, a.model_version)] += 1
        while learner.round_due(state, config):
            learner.train_round(state, "pump-7", blind, config, 0)
    assert expected and {d for _, d, _ in expected} <= {"personal"}, expected

    producer = Producer(kafka.producer_config(s, "admin"))
    key = secret(s.state_dir, "model_signing_key")  # the deployment's: the job reads the same
    start(s, "flink-job")
    try:
        producer.produce(s.topics.global_updates, encode_global_params(blind, start_ms, key=key))
        assert producer.flush(30) == 0
        wait_for(
            lambda: group_lag(s, s.consumer_group("edge-models"), s.topics.global_updates) == 0,
            120,
            "the job to read the version",
        )
        for batch in messages:
            producer.produce(s.topics.readings, encode_reading_batch(batch), key=b"pump-7")
        assert producer.flush(30) == 0
        total = sum(expected.values())
        found = wait_for(
            lambda: (got := read_topic(s, s.topics.anomalies)) and len(got) >= total and got,
            180,
            f"{total} anomaly records",
        )
        alive = services.recorded_pid(s, "flink-job")
    finally:
        stop(s, "flink-job")
    assert alive, "the Flink job died"
    records = [decode_anomaly(v) for v in found]
    assert Counter((a.timestamp_ms, a.detector, a.model_version) for a in records) == expected


# --- fault tests ------------------------------------------------------------------------------


def local_rounds(devices: int, rounds: int, hidden: int, seed: int = 5) -> list[LocalRound]:
    rng = np.random.default_rng(seed)
    network = Network(N_POOLED, hidden)
    now_ms = int(time.time() * 1000)
    empty = np.zeros(LOGIT_EDGES.size + 1, np.int64)
    return [
        LocalRound(
            device_id=f"device_{d:04d}",
            round=r,
            base_version=0,
            params=network.initial() + rng.normal(0, 0.05, network.size),
            samples=int(rng.integers(20, 50)),
            label_source="pseudo",
            loss=0.4,
            accuracy=0.9,
            normal=NormalStats.of(rng.uniform(0, 3, size=(10, N_FEATURES))),
            hist_pos=empty,
            hist_neg=empty,
            hist_normal=np.zeros(NORMAL_EDGES.size + 1, np.int64),
            scored_version=0,
            prequential=Confusion(0, 0, 0, 0),
            timestamp_ms=now_ms,
        )
        for r in range(1, rounds + 1)
        for d in range(devices)
    ]


def test_fedavg_survives_kill_9_with_no_gap_and_no_duplicate(
    kafka_broker: Settings, database: str, tmp_path
) -> None:
    settings = isolated(
        kafka_broker,
        database,
        state_dir=tmp_path,
        fedavg_strategy="fedavg",
        fedavg_server_momentum=0.0,
    )
    updates = local_rounds(devices=100, rounds=3, hidden=settings.hidden_units)

    def produce_slowly() -> None:
        from confluent_kafka import Producer

        producer = Producer(kafka.producer_config(settings, "edge", **{"linger.ms": 0}))
        for update in updates:
            producer.produce(settings.topics.local_updates, encode_local_round(update))
            producer.poll(0)
            time.sleep(0.02)
        producer.flush(30)

    producer = threading.Thread(target=produce_slowly)
    producer.start()
    pid = start(settings, "fedavg")
    wait_for(
        lambda: scalar(settings, "SELECT count(*) FROM federated_models") >= 3,
        60,
        "three versions before the crash",
        every=0.2,
    )
    os.kill(pid, signal.SIGKILL)
    producer.join()
    sent = {(u.device_id, u.round) for u in updates}

    def devices_waiting() -> int:
        stored = set(query(settings, "SELECT device_id, model_version FROM local_models"))
        return len({device for device, _ in sent - stored})

    start(settings, "fedavg")
    try:
        # What no version holds at the end is the buffer: fewer than 20 distinct devices.
        wait_for(lambda: devices_waiting() < 20, 120, "the restarted service to catch up")
        time.sleep(3)  # a duplicate version, if the service made one, would show up now
    finally:
        stop(settings, "fedavg")
    versions = assert_versions_are_weighted_means(settings)
    stored = set(query(settings, "SELECT device_id, model_version FROM local_models"))
    assert stored <= sent
    assert devices_waiting() < 20
    assert versions >= 14


def expected_rounds(readings: list[Reading], config: LearnerConfig) -> dict[str, int]:
    """How many local rounds each device's readings make (the learner, in-process)."""
    states: dict[str, learner.DeviceState] = defaultdict(learner.DeviceState)
    detector = learner.Detector(None, config)
    rounds: dict[str, int] = defaultdict(int)
    for reading in readings:
        state = states[reading.device_id]
        learner.observe(state, reading.device_id, [reading], detector, config, True)
        while learner.round_due(state, config):
            if learner.train_round(state, reading.device_id, None, config, 0) is not None:
                rounds[reading.device_id] += 1
    return dict(rounds)


def test_flink_job_resumes_from_checkpoint_without_counting_a_model_twice(
    kafka_broker: Settings, database: str, tmp_path
) -> None:
    settings = isolated(
        kafka_broker,
        database,
        state_dir=tmp_path,
        holdout_fraction=0.0,
        train_interval_s=600.0,
        checkpoint_interval_ms=2000,
        fedavg_min_devices=1,
        fedavg_strategy="fedavg",
        fedavg_server_momentum=0.0,
    )
    readings = list(synthetic_fleet(num_devices=40, readings_per_device=160, seed=3))
    expected = expected_rounds(readings, LearnerConfig.from_settings(settings))
    assert len(expected) == 40 and min(expected.values()) >= 2
    half = len(readings) * 6 // 10
    producer = kafka.producer_config(settings, "replay")
    replay(readings[:half], producer, settings.topics.readings, progress=False)
    start(settings, "fedavg")
    start(settings, "flink-job")
    try:
        wait_until_consumed(settings)
        first_run = topic_count(settings, settings.topics.local_updates)
        assert first_run >= 40
        stop(settings, "flink-job")
        assert services.latest_flink_checkpoint(settings) is not None
        replay(readings[half:], producer, settings.topics.readings, progress=False)
        start(settings, "flink-job")
        wait_until_consumed(settings)
        settled(lambda: table_counts(settings), quiet_s=8, timeout=120, what="the outputs")
    finally:
        stop(settings, "flink-job")
        stop(settings, "fedavg")

    sent = [decode_local_round(v) for v in read_topic(settings, settings.topics.local_updates)]
    rounds = defaultdict(set)
    for update in sent:
        rounds[update.device_id].add(update.round)
    # Rounds numbered 1..n per device, as the learner makes them in one pass: the state
    # survived the restart (a lost state would start again at 1, a replayed one repeat).
    assert {device: sorted(v) for device, v in rounds.items()} == {
        device: list(range(1, n + 1)) for device, n in expected.items()
    }
    assert scalar(settings, "SELECT count(*) FROM local_models") == sum(expected.values())
    assert_versions_are_weighted_means(settings)


def test_the_sink_writes_one_by_one_when_postgresql_refuses_a_record(database: str) -> None:
    """A record the decoder would refuse but PostgreSQL gets anyway (built in-process: a NUL in
    the id, a version beyond integer) fails the batch's upsert; written one by one, the others
    are stored and exactly the bad ones are reported, with PostgreSQL's reason."""
    import psycopg

    from streaming.anomaly_sink import write_anomalies, write_each
    from streaming.learner import Anomaly

    def anomaly(device: str, version: int = 3) -> Anomaly:
        return Anomaly(
            device,
            1_762_473_601_592,
            1.5,
            3.0,
            "warning",
            3.0,
            2.5,
            version,
            "zscore",
            ("value",),
            "z-score rule",
        )

    records = [anomaly("ok-1"), anomaly("bad\x00id"), anomaly("ok-2"), anomaly("big", 2**31)]
    with psycopg.connect(database, autocommit=True) as conn:
        with pytest.raises(psycopg.DataError):
            write_anomalies(conn, records)
        assert conn.execute("SELECT count(*) FROM anomalies").fetchone()[0] == 0
        refused = write_each(conn, records)
        assert sorted(refused) == [1, 3]
        assert all(r.startswith("PostgreSQL refused the record") for r in refused.values())
        rows = conn.execute("SELECT device_id FROM anomalies ORDER BY 1").fetchall()
    assert rows == [("ok-1",), ("ok-2",)]


def test_keyed_state_of_a_silent_device_expires(
    kafka_broker: Settings, database: str, tmp_path
) -> None:
    """With a TTL of 4 s: a device silent for longer starts a fresh learner (its next round is
    numbered 1 again, from a state that began later), while a device that kept sending
    continues its numbering; FedAvg stores the returning device's rounds as the new rounds they
    are, not as replays. (With the default of 7 days the same happens after a week.)"""
    from confluent_kafka import Producer

    from streaming.messages import encode_reading_batch, single_reading

    settings = isolated(
        kafka_broker,
        database,
        state_dir=tmp_path,
        holdout_fraction=0.0,
        train_every=20,
        train_interval_s=3600.0,
        checkpoint_interval_ms=1000,
        device_state_ttl_s=4.0,
        fedavg_min_devices=1,
    )
    producer = Producer(kafka.producer_config(settings, "replay"))
    sent: dict[str, int] = defaultdict(int)

    def send(device: str, n: int) -> None:
        batch = []
        for _ in range(n):
            sent[device] += 1
            ts = 1_762_473_600_000 + sent[device] * 10_000
            batch.append(single_reading(device, ts, 10.0 + (sent[device] % 7) * 0.3, 0))
        producer.produce(settings.topics.readings, encode_reading_batch(batch), key=device.encode())
        assert producer.flush(30) == 0

    def rounds() -> dict[str, list[int]]:
        out = defaultdict(list)
        for v in read_topic(settings, settings.topics.local_updates):
            update = decode_local_round(v)
            out[update.device_id].append(update.round)
        return {d: sorted(r) for d, r in out.items()}

    start(settings, "fedavg")
    start(settings, "flink-job")
    try:
        send("silent", 30)  # 10 readings of warm-up, then one round
        send("busy", 30)
        wait_for(lambda: sum(map(len, rounds().values())) >= 2, 120, "the first rounds")
        for _ in range(8):  # 8 s: "busy" writes its state every second, "silent" does not
            send("busy", 3)  # 24 readings: round 2, and 4 buffered
            time.sleep(1)
        send("silent", 30)  # a fresh learner: 10 readings of warm-up, then round 1 again
        send("busy", 16)  # round 3
        wait_for(lambda: sum(map(len, rounds().values())) >= 5, 120, "the later rounds")
        time.sleep(3)  # a round too many would show now
        wait_for(
            lambda: scalar(settings, "SELECT count(*) FROM local_models") >= 5,
            60,
            "FedAvg to store the rounds",
        )
    finally:
        stop(settings, "flink-job")
        stop(settings, "fedavg")
    assert rounds() == {"silent": [1, 1], "busy": [1, 2, 3]}
    stored = query(settings, "SELECT device_id, state_since_ms, model_version FROM local_models")
    assert sorted((d, r) for d, _, r in stored) == [
        ("busy", 1),
        ("busy", 2),
        ("busy", 3),
        ("silent", 1),
        ("silent", 1),
    ]
    assert len({since for d, since, _ in stored if d == "busy"}) == 1
    assert len({since for d, since, _ in stored if d == "silent"}) == 2
