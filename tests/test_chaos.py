"""Chaos: one run of the streaming tier (the Flink job, FedAvg, the anomaly sink and the replay,
each a real process on a real broker and database) during which 20 ``kill -9``s land at random
moments, each victim started again at once, the way a supervisor would:

- the Flink job (its whole process group, the JVM with it) while the readings topic has lag,
  after it has checkpointed progress since its last start, so that its restart restores state
  and replays input;
- FedAvg at random moments and once at the fault-injection point between its database commit
  and its offset commit (``flead.faults``), where a random kill almost never lands;
- the anomaly sink at random moments;
- the replay (``flead replay --resume``), which then adds exactly what the topic lacks.

Afterwards, multisets, not sets: the readings topic holds every reading of the fleet exactly
once; the stored anomaly rows equal an in-process run of the learner over the messages the job
read; every local round (1..n per device) is stored once, in exactly one version, or pending;
versions are 1..v without gaps or duplicates, each the weighted mean of its rounds.

The run uses ``tests.exactly_once.ORACLE_SETTINGS``, so that timing cannot change what the
oracle predicts.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from flead import faults, kafka, services
from flead.config import Settings, to_env
from streaming.learner import LearnerConfig
from streaming.messages import decode_local_round, decode_readings
from streaming.sources import synthetic_fleet
from tests.conftest import isolated, table_counts, wait_until_consumed
from tests.exactly_once import ORACLE_SETTINGS, assert_exactly_once, reference
from tests.streaming_harness import (
    committed_offsets,
    group_lag,
    query,
    read_records,
    read_topic,
    settled,
    start,
    stop,
    wait_for,
)

pytestmark = pytest.mark.integration

FLEET = {"num_devices": 60, "readings_per_device": 400}
RATE = 100.0  # readings/s: the replay outlasts the first half of the kills
KILLS = {"flink-job": 5, "fedavg": 5, "fedavg-fault": 1, "anomaly-sink": 5, "replay": 4}
SERVICES = ("fedavg", "anomaly-sink", "flink-job")


@pytest.fixture
def chaos_settings(kafka_broker: Settings, database: str, tmp_path: Path) -> Settings:
    return isolated(
        kafka_broker, database, state_dir=tmp_path, fault_injection=True, **ORACLE_SETTINGS
    )


class Replay:
    """``flead replay --resume`` as a process of its own, restarted after each kill."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.argv = [
            sys.executable,
            "-m",
            "flead.cli",
            "replay",
            "--source=synthetic",
            f"--devices={FLEET['num_devices']}",
            f"--readings-per-device={FLEET['readings_per_device']}",
            f"--rate={RATE}",
            "--resume",
            "--quiet",
        ]
        self.log = settings.log_dir / "replay.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None
        self.failures: list[int] = []

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=os.environ | to_env(self.settings),
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.running(), "the replay ended before its kill: slow it down"
        services.kill_group(self.process.pid)
        self.process.wait(30)
        self.start()

    def finish(self, timeout: float) -> None:
        assert self.process is not None
        returncode = self.process.wait(timeout)
        assert returncode == 0, self.log.read_text()[-2000:]


def schedule(rng: random.Random) -> list[str]:
    """The 20 victims in a random order, the replay's among the first half (it must be
    running to be killed)."""
    others = [name for name, n in KILLS.items() if name != "replay" for _ in range(n)]
    rng.shuffle(others)
    for position in sorted(rng.sample(range(len(others) // 2), KILLS["replay"]), reverse=True):
        others.insert(position, "replay")
    return others


def committed(settings: Settings) -> int:
    offsets = kafka.group_offsets(
        settings, settings.consumer_group("edge"), settings.topics.readings
    )
    return 0 if offsets is None else offsets[0]


def versions(settings: Settings) -> int:
    return query(settings, "SELECT count(*) FROM federated_models")[0][0]


def kill_service(settings: Settings, name: str) -> None:
    pid = services.recorded_pid(settings, name)
    assert pid is not None, f"{name} died before its kill"
    services.kill_group(pid)  # the whole group: the PyFlink job's JVM dies with it
    wait_for(lambda: not services.pid_alive(pid), 30, f"{name} to die", every=0.1)


class Chaos:
    def __init__(self, settings: Settings, replay: Replay) -> None:
        self.settings, self.replay = settings, replay
        self.killed: Counter[str] = Counter()
        self.flink_lag_at_kill: list[int] = []
        self.flink_progress = committed(settings)
        self.fault_version = (0, 0)

    def kill(self, victim: str) -> None:
        if victim == "replay":
            self.replay.kill()
        elif victim == "fedavg-fault":
            self.kill_fedavg_between_commits()
        elif victim == "flink-job":
            self.kill_flink_job()
        else:
            kill_service(self.settings, victim)
            start(self.settings, victim)
        self.killed[victim] += 1

    def kill_fedavg_between_commits(self) -> None:
        # Past the first versions (made of the few devices heard of so far): a version of a
        # full round of devices.
        wait_for(lambda: versions(self.settings) >= 3, 300, "three versions")
        pid = services.recorded_pid(self.settings, "fedavg")
        assert pid is not None
        armed = faults.arm(self.settings, faults.FEDAVG_AFTER_DB_COMMIT)
        # It dies by its own SIGKILL at its next version, after the version's rows committed.
        wait_for(lambda: not services.pid_alive(pid), 300, "FedAvg to reach its fault point")
        assert not armed.exists()
        self.fault_version = fault_point_version(self.settings)
        start(self.settings, "fedavg")

    def kill_flink_job(self) -> None:
        # A kill that hurts: progress checkpointed since the job's last start (so the restart
        # restores state), readings waiting beyond it (so input is replayed).
        before = self.flink_progress
        wait_for(lambda: committed(self.settings) > before, 300, "a checkpoint with progress")
        lag = group_lag(
            self.settings, self.settings.consumer_group("edge"), self.settings.topics.readings
        )
        kill_service(self.settings, "flink-job")
        self.flink_lag_at_kill.append(lag or 0)
        self.flink_progress = committed(self.settings)
        start(self.settings, "flink-job")


def fault_point_version(settings: Settings) -> tuple[int, int]:
    """(rounds of the newest stored version, how many of them have a copy on the topic at or
    after FedAvg's committed offset of its partition, i.e. not yet committed): equal when the
    kill landed between the database commit and the offset commit. (A round the Flink job sent
    twice may have its other copy, skipped, committed already in another partition.)"""
    committed = committed_offsets(
        settings, settings.consumer_group("fedavg"), settings.topics.local_updates
    )
    newest = query(settings, "SELECT max(global_version) FROM federated_models")[0][0]
    in_version = set(
        query(
            settings,
            "SELECT device_id, state_since_ms, model_version FROM local_models"
            " WHERE aggregated_into = %s",
            (newest,),
        )
    )
    positions: dict[tuple[str, int, int], list[tuple[int, int]]] = {}
    for partition, offset, value in read_records(settings, settings.topics.local_updates):
        update = decode_local_round(value)
        key = (update.device_id, update.since_ms, update.round)
        positions.setdefault(key, []).append((partition, offset))
    uncommitted = sum(
        any(offset >= committed[partition] for partition, offset in positions[key])
        for key in in_version
    )
    return len(in_version), uncommitted


@pytest.fixture
def running(chaos_settings: Settings) -> Iterator[Settings]:
    for name in SERVICES:
        start(chaos_settings, name)
    try:
        yield chaos_settings
    finally:
        for name in SERVICES:
            stop(chaos_settings, name)


def reading_key(reading) -> tuple:
    return reading.device_id, reading.timestamp_ms, reading.values, reading.label


def test_twenty_kills_lose_and_double_nothing(running: Settings) -> None:
    settings = running
    rng = random.Random(20261128)
    replay = Replay(settings)
    chaos = Chaos(settings, replay)
    victims = schedule(rng)
    assert len(victims) == 20
    replay.start()
    try:
        for victim in victims:
            time.sleep(rng.uniform(1.0, 5.0))
            chaos.kill(victim)
        replay.finish(timeout=900)
    finally:
        if replay.running():
            services.kill_group(replay.process.pid)
    assert chaos.killed == Counter(KILLS)
    assert max(chaos.flink_lag_at_kill) > 0, "no Flink kill landed with readings waiting"

    # Exactly the fleet in the topic, each reading once, whatever the replay's kills cut.
    messages = read_topic(settings, settings.topics.readings)
    in_topic = Counter(reading_key(r) for value in messages for r in decode_readings(value))
    fleet = synthetic_fleet(
        **FLEET, anomaly_rate=settings.synthetic_anomaly_rate, seed=settings.seed
    )
    assert in_topic == Counter(reading_key(r) for r in fleet)

    wait_until_consumed(settings, timeout=600)
    settled(lambda: table_counts(settings), quiet_s=10, timeout=300, what="the outputs")
    for name in SERVICES:
        assert services.recorded_pid(settings, name) is not None, f"{name} is not running"
    # The fault point's kill landed where it hurts: rounds of a version in the database whose
    # offsets Kafka did not have yet (the restarted service read them again and skipped them).
    in_version, uncommitted = chaos.fault_version
    assert in_version > 1 and uncommitted == in_version, chaos.fault_version

    expected_anomalies, expected_rounds = reference(
        [(b"", value, 0) for value in messages], LearnerConfig.from_settings(settings)
    )
    assert sum(expected_anomalies.values()) > 0 and sum(expected_rounds.values()) > 0
    assert_exactly_once(settings, expected_anomalies, expected_rounds)
    stored = query(settings, "SELECT count(*) FROM local_models")[0][0]
    print(  # the figures README's Guarantees section quotes
        f"\nchaos: {sum(chaos.killed.values())} kills {dict(chaos.killed)};"
        f" Flink lag at its kills {chaos.flink_lag_at_kill};"
        f" at the fault point {chaos.fault_version[1]} of {chaos.fault_version[0]} rounds of a"
        " stored version not committed in Kafka;"
        f" {sum(in_topic.values())} readings, {sum(expected_anomalies.values())} anomalies,"
        f" {sum(expected_rounds.values())} local rounds ({stored} in {versions(settings)} versions,"
        " the rest pending); lost 0, duplicated 0"
    )
