"""The job's capacity in cluster mode beside local mode, measured in the same run on the same
messages, and what one TaskManager slot carries (the input of README's capacity plan).

Every configuration drains a topic filled beforehand (:func:`streaming_throughput.capacity`:
readings/s from the job's first output to the last reading committed, start-up excluded):

- **local**: the job as ``make run`` runs it, a Flink mini-cluster inside one Python process,
  reading from one broker (replication 1);
- **cluster**: the same job file submitted to a standalone session cluster (a JobManager and two
  TaskManagers of two slots, separate processes) reading from three brokers (replication 3,
  ``min.insync.replicas`` 2, producers with ``acks=all``).

Each at parallelism 2 (the default) and 1 (one slot), interleaved over ``--rounds`` so the noise
of a shared machine hits all alike. The brokers and the session cluster are the benchmark's own
(ports of their own, a temporary state folder), started for the run and stopped after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import summarise, write_result
from benchmarks.streaming_throughput import (
    batched_messages,
    capacity,
    clean_env,
    on_cluster,
    session_cluster,
)
from flead import kafka, services
from flead.config import Settings, load_settings, namespaced
from streaming.sources import fleet_readings, synthetic_fleet_arrays

# The local mode's single broker, on a port of its own (the shared one at 9092 serves other
# users of this machine, whose load would blur the comparison): controller on the next port.
LOCAL_BROKER = "127.0.0.1:19288"
PARALLELISMS = (2, 1)
# The capacity plan of README's "Cluster mode": 100,000 devices at 1 reading/s each, with
# headroom to catch up after an outage.
FLEET_DEVICES, READINGS_PER_DEVICE_S, HEADROOM = 100_000, 1.0, 1.5


def local_pipeline(local_base: Settings, state_dir: Path, parallelism: int) -> Settings:
    """A private copy of the pipeline on the local-mode broker, own topics and groups."""
    settings = dataclasses.replace(
        namespaced(local_base, f"bench-local-{uuid.uuid4().hex[:8]}"),
        state_dir=state_dir,
        train_interval_s=3600.0,
        checkpoint_interval_ms=2000,
        flink_parallelism=parallelism,
    )
    kafka.ensure_topics(settings)
    return settings


def capacity_plan(per_slot: float, message_bytes: float, batch: int, replication: int) -> dict:
    """Slots, TaskManagers, partitions and broker traffic for the fleet of the plan, from the
    measured readings/s one slot carries."""
    readings_per_s = FLEET_DEVICES * READINGS_PER_DEVICE_S
    slots = math.ceil(readings_per_s * HEADROOM / per_slot)
    messages_per_s = readings_per_s / batch
    return {
        "devices": FLEET_DEVICES,
        "readings_per_s": readings_per_s,
        "headroom": HEADROOM,
        "per_slot_readings_per_s": per_slot,
        "slots": slots,
        "taskmanagers_of_2_slots": math.ceil(slots / 2),
        # Every slot reads: at least one readings partition per subtask.
        "readings_partitions": slots,
        "messages_per_s": messages_per_s,
        "ingress_mb_per_s": messages_per_s * message_bytes / 1e6,
        "replication_mb_per_s": messages_per_s * message_bytes * (replication - 1) / 1e6,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2407)
    parser.add_argument("--readings-per-device", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50, help="readings per message")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    arrays = synthetic_fleet_arrays(
        num_devices=args.devices, readings_per_device=args.readings_per_device
    )
    messages = batched_messages(list(fleet_readings(arrays)), args.batch)
    per_message = len(arrays) / len(messages)
    message_bytes = sum(len(value) for _, value, _ in messages) / len(messages)
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        local_base = dataclasses.replace(
            load_settings(clean_env()),
            state_dir=state / "local",
            kafka_bootstrap=LOCAL_BROKER,
            kafka_heap="512m",
        )
        # One set of Kafka passwords for every broker and client of the run: each broker is
        # formatted with them, and every private state folder logs in with them.
        kafka.export_credentials(local_base)
        try:
            services.ensure_kafka(local_base)
            with session_cluster(local_base, state) as cluster_base:
                for round_ in range(args.rounds):
                    for parallelism in PARALLELISMS:
                        for mode in ("local", "cluster"):
                            folder = state / f"{mode}-p{parallelism}-{round_}"
                            settings = (
                                local_pipeline(local_base, folder, parallelism)
                                if mode == "local"
                                else on_cluster(cluster_base, folder, flink_parallelism=parallelism)
                            )
                            result = capacity(settings, messages, per_message)
                            print(
                                f"{mode} parallelism {parallelism}: "
                                f"{result['readings_per_s']:,.0f} readings/s",
                                flush=True,
                            )
                            runs.setdefault(f"{mode}_p{parallelism}", []).append(result)
                cluster_shape = {
                    "taskmanagers": cluster_base.flink_taskmanagers,
                    "slots_per_taskmanager": cluster_base.flink_taskmanager_slots,
                    "taskmanager_memory": cluster_base.flink_taskmanager_memory,
                    "brokers": len(services.kafka_endpoints(cluster_base)),
                    "replication": cluster_base.kafka_replication,
                    "min_insync_replicas": cluster_base.kafka_min_insync_replicas,
                }
        finally:
            services.stop_kafka(local_base)
    rates = summarise({name: [r["readings_per_s"] for r in rs] for name, rs in runs.items()})
    median = {name: rates[name]["median"] for name in rates}
    # Per slot, the lower of the two ways to read it (the one-slot job; the two-slot job's
    # share per slot): the plan then errs on the side of more slots.
    per_slot = min(median["cluster_p1"], median["cluster_p2"] / 2)
    result = {
        "readings": len(arrays),
        "messages": len(messages),
        "batch": args.batch,
        "mean_message_bytes": message_bytes,
        "rounds": args.rounds,
        "cluster": cluster_shape,
        "local": {"brokers": 1, "replication": local_base.kafka_replication},
        "rates": rates,
        "startup_seconds": {name: [r["startup_seconds"] for r in rs] for name, rs in runs.items()},
        "ratio_cluster_to_local": median["cluster_p2"] / median["local_p2"],
        "per_slot_readings_per_s": per_slot,
        "capacity_plan": capacity_plan(
            per_slot, message_bytes, args.batch, cluster_shape["replication"]
        ),
    }
    path = write_result("cluster_throughput", result)
    plan = result["capacity_plan"]
    print(
        f"capacity at parallelism 2: local {median['local_p2']:,.0f}, cluster "
        f"{median['cluster_p2']:,.0f} readings/s (ratio {result['ratio_cluster_to_local']:.2f});"
        f" per slot {per_slot:,.0f} readings/s → {plan['slots']} slots for "
        f"{plan['readings_per_s']:,.0f} readings/s × {HEADROOM} → {path}"
    )
    return result


if __name__ == "__main__":
    main()
