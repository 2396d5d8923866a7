"""Cluster mode under failure: the same job on a standalone Flink session cluster (a JobManager
and two TaskManagers, separate processes) reading from and writing to three KRaft brokers
(replication 3, min.insync.replicas 2, SASL/SCRAM and ACLs), with the FedAvg service and the
anomaly sink. During a paced replay one TaskManager (then, in a separate run, one broker) is
killed with SIGKILL; afterwards the counts must be exact:

- every reading scored exactly once: the multiset of stored anomaly rows equals the one an
  in-process run of the learner (:mod:`streaming.learner`, fed the same messages the same way
  the job's operators are) produces, and the anomalies topic holds no record the reference
  does not;
- every local round the devices made (rounds 1..n per device, n from the reference) is either
  stored once, in exactly one version, or pending in the open round; versions are 1..v without gaps,
  each the weighted FedAvg of its stored rounds.

Devices score with the z-score rule (``detector=zscore``) so that which global version a device
held when it scored a reading (a matter of timing) cannot change the verdicts; rounds train
every 50 readings only (no timer), for the same reason.

Run with ``make test-cluster`` (they take minutes: three brokers, a Flink cluster).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest
from confluent_kafka import KafkaException, Producer

from benchmarks.streaming_throughput import batched_messages
from flead import cluster, db, kafka, services
from flead.config import Settings, load_settings, namespaced
from streaming.learner import LearnerConfig
from streaming.replay import produce
from streaming.sources import synthetic_fleet
from tests.conftest import fresh_database, table_counts, wait_until_consumed
from tests.exactly_once import ORACLE_SETTINGS, assert_exactly_once, reference, stored_anomalies
from tests.streaming_harness import settled, stop, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

# Ports of their own: neither the shared single broker (9092) nor a `flead up --cluster`
# started with the defaults (19092..) is touched.
BROKERS = "127.0.0.1:19192,127.0.0.1:19194,127.0.0.1:19196"
FLINK_REST, FLINK_RPC = 18181, 16223
FLEET = {"num_devices": 200, "readings_per_device": 150, "seed": 23}
RATE = 500.0  # readings/s: the replay lasts ~60 s, long enough to kill something during it


@pytest.fixture(scope="module")
def cluster_settings(postgres: Settings, tmp_path_factory) -> Iterator[Settings]:
    """Three brokers and a Flink session cluster in a state folder of their own."""
    env = {**os.environ, "FLEAD_DEPLOY": "cluster"}
    for name in list(env):  # this test's cluster, whatever the developer's shell says
        if name.startswith(("FLEAD_KAFKA_", "FLEAD_FLINK_")) or name == "FLEAD_STATE_DIR":
            env.pop(name)
    settings = dataclasses.replace(
        load_settings(env),
        state_dir=tmp_path_factory.mktemp("cluster"),
        kafka_bootstrap=BROKERS,
        kafka_heap="512m",
        flink_rest_port=FLINK_REST,
        flink_rpc_port=FLINK_RPC,
        flink_taskmanager_memory="1280m",
        flink_heartbeat_timeout_ms=6000,
        flink_restart_delay_s=2.0,
        database_url=postgres.database_url,
    )
    assert (settings.kafka_replication, settings.kafka_min_insync_replicas) == (3, 2)
    try:
        services.ensure_kafka(settings)
        cluster.ensure_flink_cluster(settings)
        # Every pipeline below runs in its own state folder and logs in with these users.
        kafka.export_credentials(settings)
        yield settings
    finally:
        cluster.stop_flink_cluster(settings)
        services.stop_kafka(settings)


@pytest.fixture
def pipeline_settings(
    postgres: Settings, cluster_settings: Settings, tmp_path
) -> Iterator[Settings]:
    """A private copy of the pipeline on the cluster: own topics, groups, database and state
    folder (so its checkpoints are its own); the job is submitted to the running cluster."""
    with fresh_database(postgres) as url:  # created by the administrator of the shared state
        db.apply_schema(url)
        settings = dataclasses.replace(
            namespaced(cluster_settings, f"cluster-{uuid.uuid4().hex[:8]}"),
            database_url=url,
            state_dir=tmp_path,
            flink_jobmanager=f"127.0.0.1:{FLINK_REST}",
            # Outputs computable in-process; the rounds of fewer than 20 devices stay pending.
            **ORACLE_SETTINGS,
        )
        kafka.ensure_topics(settings)
        yield settings


def paced_replay(settings: Settings, messages, done: threading.Event) -> None:
    """Produce the messages at ~RATE readings/s as the replay user (acks=all, idempotent)."""
    producer = Producer(kafka.producer_config(settings, "replay", **{"linger.ms": 5}))
    per_message = FLEET["readings_per_device"] * FLEET["num_devices"] / len(messages)
    started = time.monotonic()
    for i, (key, value, ts) in enumerate(messages):
        delay = started + i * per_message / RATE - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        produce(producer, settings.topics.readings, key.decode(), value, ts)
        producer.poll(0)
    assert producer.flush(120) == 0, "the replay could not deliver every message"
    done.set()


def committed_readings(settings: Settings) -> int:
    """Messages of the readings topic the job committed (at its checkpoints); 0 while that
    cannot be read, e.g. while the group's coordinator moves off a killed broker."""
    try:
        offsets = kafka.group_offsets(
            settings, settings.consumer_group("edge"), settings.topics.readings
        )
    except KafkaException:
        return 0
    return 0 if offsets is None else offsets[0]


def job_not_ended(settings: Settings, job_id: str) -> bool:
    """True while the job lives (restarting counts); an ended job fails the wait at once with
    Flink's own reason instead of after the wait's timeout."""
    state = cluster.job_state(settings, job_id)
    if state in cluster.TERMINAL | {None}:
        cause = cluster.rest(settings, f"/jobs/{job_id}/exceptions").get("rootException", "")
        raise AssertionError(f"job {job_id} ended ({state}): {str(cause)[:3000]}")
    return True


def assert_alive(settings: Settings, *names: str) -> None:
    """Each named service of the pipeline still runs; if not, the end of its log says why."""
    for name in names:
        if services.recorded_pid(settings, name) is None:
            log = settings.log_dir / f"{name}.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
            raise AssertionError(f"{name} died during the run; end of {log}:\n{tail}")


def run_with_failure(settings: Settings, kill) -> tuple[Counter, dict[str, int], str]:
    """Replay the fleet through the pipeline, call ``kill()`` once a checkpoint holds progress
    and a fifth of the messages were consumed, finish, and return the reference and the job id."""
    messages = batched_messages(list(synthetic_fleet(**FLEET)), settings.replay_batch)
    expected_anomalies, expected_rounds = reference(messages, LearnerConfig.from_settings(settings))
    assert sum(expected_rounds.values()) >= 2 * FLEET["num_devices"]
    for name in ("fedavg", "anomaly-sink", "flink-job"):
        services.start_streaming(settings, name)
    done = threading.Event()
    replayer = threading.Thread(target=paced_replay, args=(settings, messages, done))
    try:
        job_id = wait_for(
            lambda: cluster.job_id_file(settings).exists()
            and cluster.job_id_file(settings).read_text().strip(),
            300,
            "the job's submission",
        )
        wait_for(lambda: cluster.job_state(settings, job_id) == "RUNNING", 300, "the job to run")
        replayer.start()
        wait_for(
            lambda: job_not_ended(settings, job_id)
            and committed_readings(settings) >= len(messages) // 5,
            300,
            "a checkpoint holding a fifth of the messages",
        )
        assert not done.is_set(), "the replay ended before the failure: slow it down"
        kill()
        replayer.join()
        assert done.is_set()
        wait_for(
            lambda: job_not_ended(settings, job_id)
            and committed_readings(settings) >= len(messages),
            600,
            "the job to consume every message",
            every=2.0,
        )
        wait_until_consumed(settings, timeout=600)
        assert cluster.job_state(settings, job_id) == "RUNNING"
        settled(lambda: table_counts(settings), quiet_s=15, timeout=300, what="the outputs")
        # Nothing here restarts them: a FedAvg service or sink that died on its own would
        # otherwise surface only as rounds missing from the versions, far from its cause.
        assert_alive(settings, "fedavg", "anomaly-sink", "flink-job")
    finally:
        stop(settings, "flink-job")  # cancels the job on the cluster
        for name in ("fedavg", "anomaly-sink"):
            stop(settings, name)
    report_anomaly_difference(settings, expected_anomalies)
    assert_exactly_once(settings, expected_anomalies, expected_rounds)
    return expected_anomalies, expected_rounds, job_id


def report_anomaly_difference(settings: Settings, expected: Counter) -> None:
    """Print (pytest shows it on failure) where the stored anomalies and the reference part:
    the exact comparison follows in assert_exactly_once, whose message is too large to read."""
    stored = stored_anomalies(settings)
    missing, extra = expected - stored, stored - expected
    if missing or extra:
        devices = sorted({key[0] for key in (missing + extra)})
        print(f"anomalies: {len(missing)} expected rows missing, {len(extra)} unexpected rows,")
        print(f"on {len(devices)} devices: {devices[:20]}")
        for key in sorted(missing)[:10]:
            print("  missing", key)
        for key in sorted(extra)[:10]:
            print("  extra  ", key)


def test_job_recovers_from_its_checkpoint_when_a_taskmanager_is_killed(
    cluster_settings: Settings, pipeline_settings: Settings
) -> None:
    victim = cluster.taskmanager_names(cluster_settings)[0]
    pid = services.recorded_pid(cluster_settings, victim)
    assert pid is not None

    def kill() -> None:
        os.kill(pid, signal.SIGKILL)

    try:
        _, _, job_id = run_with_failure(pipeline_settings, kill)
        # The job failed over and resumed from a checkpoint (Flink's own record of it).
        restored = cluster.rest(pipeline_settings, f"/jobs/{job_id}/checkpoints")["latest"][
            "restored"
        ]
        assert restored is not None and restored["id"] >= 1, "the job did not restore"
    finally:
        # The remaining TaskManager carried the job; the next test gets two again.
        cluster.ensure_flink_cluster(cluster_settings)


def test_pipeline_carries_on_when_a_broker_is_killed(
    cluster_settings: Settings, pipeline_settings: Settings
) -> None:
    # Run after the TaskManager test, this job also lands on a TaskManager that already ran
    # Python for another job: what failed before pemja was loaded parent-first (flead/cluster.py).
    victim = services.kafka_node_name(cluster_settings, 1)
    pid = services.recorded_pid(cluster_settings, victim)
    assert pid is not None

    def kill() -> None:
        os.kill(pid, signal.SIGKILL)

    try:
        run_with_failure(pipeline_settings, kill)
    finally:
        services.ensure_kafka(cluster_settings)  # the killed broker rejoins
