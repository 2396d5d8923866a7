"""End-to-end streaming speed: readings produced → scored → local updates, on the real Flink
job, beside the bare Kafka consume rate of the same topic measured in the same run.

Three measurements, one run, one private copy of the pipeline (own topics, groups, database):

1. capacity: the job drains a topic filled beforehand (batched messages); readings/s from its
   first output to the last reading consumed (so the job's start-up is not counted);
2. sustained: readings are produced at a fixed rate for ``--seconds`` (≥ 120 by default) while
   the consumer lag is sampled; the rate is sustained if the lag does not grow. Latency is the
   time from a reading's scheduled produce time to the moment its anomaly record is read back
   (p50/p99; it includes the time a reading waits for its batch to fill);
3. bare consume: a plain confluent-kafka consumer reads the capacity topic as fast as it can.

``--cluster`` adds the capacity of the same job in cluster mode, in the same run: submitted to a
standalone Flink session cluster (a JobManager, two TaskManagers) reading from three brokers
(replication 3, min.insync.replicas 2), all started for the run on ports of their own and
stopped after it (flead/cluster.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition

from benchmarks.common import write_result
from flead import db, kafka, services
from flead.config import Settings, load_settings, namespaced
from streaming.messages import Reading, encode_reading_batch
from streaming.replay import produce, replay
from streaming.sources import fleet_readings, synthetic_fleet_arrays

BENCH_DATABASE = "flead_bench"


def private_settings(base: Settings, label: str, state_dir: Path) -> Settings:
    # As the administrator: the application role may not create databases.
    db.drop_database(base, BENCH_DATABASE)
    db.create_database(base, BENCH_DATABASE)
    settings = dataclasses.replace(
        namespaced(base, f"bench-{label}-{int(time.time())}"),
        database_url=base.database_url.rsplit("/", 1)[0] + f"/{BENCH_DATABASE}",
        state_dir=state_dir,
        train_interval_s=3600.0,
        checkpoint_interval_ms=2000,
    )
    db.apply_schema(settings.database_url)
    kafka.ensure_topics(settings)
    return settings


# Ports of the benchmark's own cluster: neither the tests' (19192.., 18181) nor `flead up
# --cluster`'s defaults (19092.., 18081).
CLUSTER_PORTS = {
    "kafka_bootstrap": "127.0.0.1:19292,127.0.0.1:19294,127.0.0.1:19296",
    "flink_rest_port": 18281,
    "flink_rpc_port": 16323,
}


def clean_env() -> dict[str, str]:
    """This process's environment without Kafka and Flink settings: a benchmark's cluster is
    its own, whatever the developer's shell points at (Kafka passwords exported by the caller
    stay: every broker the benchmark starts is formatted with them)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLEAD_KAFKA", "FLEAD_FLINK")) or k.endswith("_PASSWORD")
    }


@contextlib.contextmanager
def session_cluster(base: Settings, state: Path) -> Iterator[Settings]:
    """Three brokers and a Flink session cluster (flead/cluster.py, the cluster-mode defaults)
    on :data:`CLUSTER_PORTS`, in ``state/cluster``, for the duration of the block."""
    from flead import cluster

    cluster_base = dataclasses.replace(
        load_settings({**clean_env(), "FLEAD_DEPLOY": "cluster"}),
        state_dir=state / "cluster",
        database_url=base.database_url,
        kafka_heap="512m",
        **CLUSTER_PORTS,
    )
    try:
        services.ensure_kafka(cluster_base)
        cluster.ensure_flink_cluster(cluster_base)
        yield cluster_base
    finally:
        cluster.stop_flink_cluster(cluster_base)
        services.stop_kafka(cluster_base)


def on_cluster(cluster_base: Settings, state_dir: Path, **overrides: Any) -> Settings:
    """A private copy of the pipeline (own topics, groups, state folder) whose job is submitted
    to the running session cluster of ``cluster_base``."""
    settings = dataclasses.replace(
        namespaced(cluster_base, f"bench-cluster-{uuid.uuid4().hex[:8]}"),
        state_dir=state_dir,
        train_interval_s=3600.0,
        checkpoint_interval_ms=2000,
        flink_jobmanager=f"127.0.0.1:{cluster_base.flink_rest_port}",
        **overrides,
    )
    kafka.ensure_topics(settings)
    return settings


def cluster_capacity(base: Settings, state: Path, messages, per_message: float) -> dict:
    """:func:`capacity` of the same messages with the job on a session cluster."""
    with session_cluster(base, state) as cluster_base:
        kafka.export_credentials(cluster_base)  # the private copy's state folder is another
        settings = on_cluster(cluster_base, state / "cluster-capacity")
        result = capacity(settings, messages, per_message)
        result["taskmanagers"] = cluster_base.flink_taskmanagers
        result["slots_per_taskmanager"] = cluster_base.flink_taskmanager_slots
        result["brokers"] = len(services.kafka_endpoints(cluster_base))
        result["replication"] = cluster_base.kafka_replication
        return result


def batched_messages(readings: list[Reading], batch: int) -> list[tuple[bytes, bytes, int]]:
    """(key, value, event time of the batch's last reading) per message, in send order."""
    pending: dict[str, list[Reading]] = {}
    messages = []
    for reading in readings:
        held = pending.setdefault(reading.device_id, [])
        held.append(reading)
        if len(held) == batch:
            messages.append(
                (reading.device_id.encode(), encode_reading_batch(held), reading.timestamp_ms)
            )
            del pending[reading.device_id]
    for held in pending.values():
        messages.append(
            (held[0].device_id.encode(), encode_reading_batch(held), held[-1].timestamp_ms)
        )
    messages.sort(key=lambda m: m[2])
    return messages


def consumed(settings: Settings) -> int:
    """Messages of the readings topic the job has committed (at its checkpoints)."""
    consumer = Consumer(
        kafka.client_config(settings, "admin", **{"group.id": settings.consumer_group("edge")})
    )
    try:
        parts = [
            TopicPartition(settings.topics.readings, p) for p in range(settings.kafka_partitions)
        ]
        return sum(max(tp.offset, 0) for tp in consumer.committed(parts, timeout=10))
    finally:
        consumer.close()


def capacity(settings: Settings, messages, readings_per_message: float) -> dict:
    producer = Producer(kafka.producer_config(settings, "admin"))
    for key, value, ts in messages:
        produce(producer, settings.topics.readings, key.decode(), value, ts)
    producer.flush(120)
    started = time.monotonic()
    services.start_streaming(settings, "flink-job")
    try:
        first_output = wait(lambda: topic_size(settings, settings.topics.anomalies) > 0, 300)
        done = wait(lambda: consumed(settings) >= len(messages), 900)
    finally:
        services.stop_pid(settings, "flink-job", timeout=60)
    readings = len(messages) * readings_per_message
    return {
        "readings": int(readings),
        "messages": len(messages),
        "startup_seconds": first_output - started,
        "readings_per_s": readings / (done - first_output),
        "note": "offsets are committed at checkpoints, so the end is known to within one "
        "checkpoint interval",
    }


def with_linger(
    settings: Settings, readings, rate: float, speedup: float, linger_ms: float, batch: int
) -> dict:
    """``readings`` through the replay producer itself (event time compressed by ``speedup``,
    batches of up to ``batch`` readings or ``linger_ms``), the lag sampled every 5 s and the
    produce → anomaly record latency of every anomaly read back."""
    readings = list(readings)
    services.start_streaming(settings, "flink-job")
    wait(lambda: services.recorded_pid(settings, "flink-job") is not None, 10)
    time.sleep(20)  # let the job start before the clock runs
    latencies: list[float] = []
    stop = threading.Event()
    samples: list[tuple[float, int, int]] = []  # (seconds, messages on the topic, consumed)

    def sample() -> None:
        while not stop.wait(5.0):
            samples.append(
                (
                    time.time() - t0,
                    topic_size(settings, settings.topics.readings),
                    consumed(settings),
                )
            )

    # The replay's clock starts within milliseconds of t0 (its producer's construction).
    t0, e0 = time.time(), readings[0].timestamp_ms
    reader = threading.Thread(
        target=read_anomalies, args=(settings, latencies, stop, t0, e0, speedup)
    )
    sampler = threading.Thread(target=sample)
    reader.start()
    sampler.start()
    result = replay(
        readings,
        kafka.producer_config(settings, "admin", **{"linger.ms": 5}),
        settings.topics.readings,
        speedup=speedup,
        progress=False,
        batch=batch,
        linger_ms=linger_ms,
    )
    time.sleep(10)
    stop.set()
    reader.join()
    sampler.join()
    services.stop_pid(settings, "flink-job", timeout=60)
    per_message = result.readings / result.messages
    lags = [(t, (p - c) * per_message) for t, p, c in samples]
    return {
        "offered_readings_per_s": rate,
        "linger_ms": linger_ms,
        "readings_per_message": per_message,
        "produce_seconds": result.seconds,
        "produced_readings_per_s": result.rate,
        **lag_and_latency(lags, latencies),
    }


def sustained(
    settings: Settings, messages, rate: float, readings_per_message: float, speedup: float
) -> dict:
    """Produce ``messages`` on their event-time schedule compressed by ``speedup``."""
    services.start_streaming(settings, "flink-job")
    wait(lambda: services.recorded_pid(settings, "flink-job") is not None, 10)
    time.sleep(20)  # let the job start before the clock runs
    latencies: list[float] = []
    stop = threading.Event()
    t0 = time.time()
    e0 = messages[0][2]
    reader = threading.Thread(
        target=read_anomalies, args=(settings, latencies, stop, t0, e0, speedup)
    )
    reader.start()
    samples = []
    producer = Producer(kafka.producer_config(settings, "admin", **{"linger.ms": 5}))
    next_sample = time.monotonic()
    for i, (key, value, ts) in enumerate(messages):
        delay = t0 + (ts - e0) / 1000 / speedup - time.time()
        if delay > 0:
            time.sleep(delay)
        produce(producer, settings.topics.readings, key.decode(), value, ts)
        if time.monotonic() >= next_sample:
            samples.append((time.time() - t0, i + 1, consumed(settings)))
            next_sample += 5
    producer.flush(60)
    produced_seconds = time.time() - t0
    time.sleep(10)
    samples.append((time.time() - t0, len(messages), consumed(settings)))
    stop.set()
    reader.join()
    services.stop_pid(settings, "flink-job", timeout=60)
    lags = [(t, (p - c) * readings_per_message) for t, p, c in samples]
    return {
        "offered_readings_per_s": rate,
        "produce_seconds": produced_seconds,
        "consumed_readings_per_s": samples[-2][2] * readings_per_message / samples[-2][0]
        if len(samples) > 1
        else None,
        **lag_and_latency(lags, latencies),
    }


def read_anomalies(settings, latencies, stop, t0, e0, speedup) -> None:
    from streaming.messages import parse_timestamp

    consumer = Consumer(
        kafka.client_config(
            settings,
            "admin",
            **{
                "group.id": f"{settings.consumer_group_prefix}-latency",
                "auto.offset.reset": "earliest",
            },
        )
    )
    consumer.subscribe([settings.topics.anomalies])
    while not stop.is_set():
        for message in consumer.consume(1000, 0.5):
            if message.error() is None:
                event_ms = parse_timestamp(json.loads(message.value())["timestamp"]).timestamp()
                due = t0 + (event_ms * 1000 - e0) / 1000 / speedup
                latencies.append(time.time() - due)
    consumer.close()


def lag_and_latency(lags: list, latencies: list[float]) -> dict:
    """What both sustained runs report: the lag sampled over the run (its two halves' means)
    and the produce → anomaly latencies."""
    half = len(lags) // 2
    return {
        "lag_readings_first_half_mean": statistics.mean(lag for _, lag in lags[:half] or [(0, 0)]),
        "lag_readings_second_half_mean": statistics.mean(lag for _, lag in lags[half:]),
        "lag_samples": lags,
        "anomalies_read": len(latencies),
        "latency_p50_s": float(np.percentile(latencies, 50)) if latencies else None,
        "latency_p99_s": float(np.percentile(latencies, 99)) if latencies else None,
    }


def python_learner(settings: Settings, messages) -> dict:
    """The learner's own Python work on the same messages, in this process, without Flink:
    decode, :func:`streaming.learner.observe` (features, scoring) and
    :func:`streaming.learner.train_round`, as the job's parse step and keyed operator call
    them. The gap to the job's capacity is the cost of running Python inside Flink
    (JVM↔Python hand-over, pickled keyed state, timers)."""
    from streaming import learner
    from streaming.messages import decode_readings

    config = learner.LearnerConfig.from_settings(settings)
    detector = learner.Detector(None, config)  # the job's detector before any global version
    states: dict[str, learner.DeviceState] = {}
    readings = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for _, value, _ in messages:
        batch = decode_readings(value)
        by_device: dict[str, list] = {}
        for reading in batch:  # the job's parse step groups a message by device
            by_device.setdefault(reading.device_id, []).append(reading)
        for device, device_readings in by_device.items():
            state = states.setdefault(device, learner.DeviceState())
            trains = not learner.is_held_out(device, config.holdout_fraction, config.seed)
            learner.observe(state, device, device_readings, detector, config, trains)
            while trains and learner.round_due(state, config):
                learner.train_round(state, device, None, config, int(time.time() * 1000))
        readings += len(batch)
    # CPU time beside wall time: on a shared machine the wall clock also counts the time other
    # processes held the core, the CPU time only what the learner cost.
    return {
        "readings_per_s": readings / (time.perf_counter() - started),
        "readings_per_cpu_s": readings / (time.process_time() - cpu_started),
    }


def bare_consume(settings: Settings, topic: str, messages: int) -> dict:
    consumer = Consumer(
        kafka.client_config(
            settings,
            "admin",
            **{
                "group.id": f"{settings.consumer_group_prefix}-bare",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([topic])
    # The clock starts after the first batch arrives, so group join is not counted; that
    # batch is not counted either.
    seen, count, readings, started = 0, 0, 0, None
    while seen < messages:
        batch = [m for m in consumer.consume(500, 1.0) if m.error() is None]
        seen += len(batch)
        if started is None:
            started = time.monotonic() if batch else None
            continue
        count += len(batch)
        readings += sum(m.value().count(b'"device_id"') for m in batch)
    seconds = time.monotonic() - started
    consumer.close()
    if not count:
        raise ValueError("too few messages to time a bare consumer: fill the topic with more")
    return {"messages_per_s": count / seconds, "readings_per_s": readings / seconds}


def topic_size(settings: Settings, topic: str) -> int:
    return kafka.topic_message_counts(settings, [topic])[topic] or 0


def wait(condition, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.5)
    raise TimeoutError(f"benchmark condition not met within {timeout} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2407)
    parser.add_argument("--capacity-readings-per-device", type=int, default=200)
    parser.add_argument(
        "--rate", type=float, default=10_000, help="readings/s offered for the latency"
    )
    parser.add_argument(
        "--high-rate", type=float, default=50_000, help="readings/s offered for the lag"
    )
    parser.add_argument(
        "--linger-ms", type=float, default=None, help="replay linger (default: the setting)"
    )
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--batch", type=int, default=50, help="readings per message")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="also measure the capacity in cluster mode (Flink session cluster, 3 brokers)",
    )
    parser.add_argument(
        "--no-sustained", action="store_true", help="skip the sustained-rate measurement"
    )
    args = parser.parse_args(argv)
    base = load_settings()
    kafka.export_credentials(base)  # private state folders log in with this broker's users
    with tempfile.TemporaryDirectory() as state:
        settings = private_settings(base, "capacity", Path(state) / "capacity")
        arrays = synthetic_fleet_arrays(
            num_devices=args.devices, readings_per_device=args.capacity_readings_per_device
        )
        messages = batched_messages(list(fleet_readings(arrays)), args.batch)
        per_message = len(arrays) / len(messages)
        result = {
            "batch": args.batch,
            "parallelism": base.flink_parallelism,
            "capacity": capacity(settings, messages, per_message),
        }
        result["bare_consume"] = bare_consume(settings, settings.topics.readings, len(messages))
        result["python_learner_alone"] = python_learner(settings, messages)
        if args.cluster:
            # Last: it exports the cluster's Kafka passwords into this process's environment.
            result["cluster_capacity"] = cluster_capacity(base, Path(state), messages, per_message)
        if args.no_sustained:
            path = write_result(
                "streaming_throughput_cluster" if args.cluster else "streaming_throughput", result
            )
            print(_capacity_line(result) + f" → {path}")
            return result

        interval_s = 10.0  # the synthetic fleet's sampling interval
        # At --high-rate: messages batched by count (as for the capacity), is the lag flat?
        speedup = args.high_rate * interval_s / args.devices
        per_device = int(args.seconds * args.high_rate / args.devices) + 1
        settings = private_settings(base, "high", Path(state) / "high")
        arrays = synthetic_fleet_arrays(
            num_devices=args.devices, readings_per_device=per_device, seed=base.seed + 2
        )
        messages = batched_messages(fleet_readings(arrays), args.batch)
        result["sustained_high"] = sustained(
            settings, messages, args.high_rate, len(arrays) / len(messages), speedup
        )
        del messages, arrays
        # At --rate through the replay producer with its linger: latency and lag.
        speedup = args.rate * interval_s / args.devices
        per_device = int(args.seconds * args.rate / args.devices) + 1
        settings = private_settings(base, "sustained", Path(state) / "sustained")
        arrays = synthetic_fleet_arrays(
            num_devices=args.devices, readings_per_device=per_device, seed=base.seed + 1
        )
        linger = base.replay_linger_ms if args.linger_ms is None else args.linger_ms
        result["sustained"] = with_linger(
            settings, fleet_readings(arrays), args.rate, speedup, linger, args.batch
        )
    result["ratio_capacity_to_bare_consume"] = (
        result["capacity"]["readings_per_s"] / result["bare_consume"]["readings_per_s"]
    )
    result["ratio_capacity_to_learner_alone"] = (
        result["capacity"]["readings_per_s"] / result["python_learner_alone"]["readings_per_s"]
    )
    path = write_result("streaming_throughput", result)
    s = result["sustained"]
    print(
        _capacity_line(result) + "; sustained at "
        f"{s['offered_readings_per_s']:,.0f}/s: lag {s['lag_readings_first_half_mean']:,.0f} → "
        f"{s['lag_readings_second_half_mean']:,.0f} readings, latency p50 "
        f"{s['latency_p50_s']}, p99 {s['latency_p99_s']} s → {path}"
    )
    return result


def _capacity_line(result: dict) -> str:
    line = (
        f"capacity {result['capacity']['readings_per_s']:,.0f} readings/s local mode (bare"
        f" consume {result['bare_consume']['readings_per_s']:,.0f})"
    )
    if "cluster_capacity" in result:
        line += (
            f", {result['cluster_capacity']['readings_per_s']:,.0f} readings/s cluster mode"
            f" (parallelism {result['parallelism']})"
        )
    return line


if __name__ == "__main__":
    main()
