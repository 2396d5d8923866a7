"""The FedAvg service: local model updates in, versioned global models out.

It consumes ``local-model-updates`` in a consumer group, buffers updates until ``min_devices``
distinct devices have sent one, combines their *weights* with the configured strategy
(sample-weighted FedAvg by default, robust rules as options, staleness-aware weights), and then,
in this order:

1. writes the buffered ``local_models`` rows and the new ``federated_models`` row in one
   transaction (natural keys: a replayed update is recognised and skipped);
2. publishes the version on ``global-model-updates`` for the devices to adopt;
3. commits the consumer offsets of exactly the messages that went into it.

A crash anywhere leaves versions 1..n with no gap and no duplicate: uncommitted messages are
read again, those already stored are skipped, and on start the newest stored version is
published again (devices ignore versions they already have).
"""

from __future__ import annotations

import argparse
import logging
import signal
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import psycopg
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from flead.config import Settings, load_settings
from flead.kafka import producer_config
from streaming import model
from streaming.messages import (
    GlobalUpdate,
    InvalidMessage,
    LocalUpdate,
    dead_letter,
    decode_local_update,
    encode_global_update,
)

log = logging.getLogger("flead.fedavg")


@dataclass(frozen=True)
class FedAvgConfig:
    min_devices: int = 20
    strategy: str = "fedavg"
    trim_fraction: float = 0.2
    max_norm: float = 0.0  # 0 = the batch's median update norm
    staleness_alpha: float = 0.5
    feature_count: int = model.feature_count("scale_free")

    @classmethod
    def from_settings(cls, settings: Settings) -> FedAvgConfig:
        if settings.fedavg_strategy not in model.STRATEGIES:
            raise ValueError(
                f"FLEAD_FEDAVG_STRATEGY={settings.fedavg_strategy!r} is not one of "
                f"{', '.join(sorted(model.STRATEGIES))}"
            )
        return cls(
            min_devices=settings.fedavg_min_devices,
            strategy=settings.fedavg_strategy,
            trim_fraction=settings.fedavg_trim_fraction,
            max_norm=settings.fedavg_max_norm,
            staleness_alpha=settings.fedavg_staleness_alpha,
            feature_count=model.feature_count(settings.feature_set),
        )


def aggregation_weight(update: LocalUpdate, current_version: int, alpha: float) -> float:
    """Sample count, discounted for updates built on an older global version."""
    staleness = model.staleness_factor(current_version, update.base_global_version, alpha)
    return update.samples_processed * staleness


def combine(
    updates: list[LocalUpdate], current: GlobalUpdate | None, config: FedAvgConfig
) -> tuple[model.LinearModel, list[float]]:
    """The next global model from ``updates``; with the weight each update was given."""
    version = current.version if current else 0
    weights = [aggregation_weight(u, version, config.staleness_alpha) for u in updates]
    models = [model.LinearModel(np.asarray(u.weights), u.bias) for u in updates]
    options: dict = {}
    if config.strategy == "trimmed_mean":
        options["trim_fraction"] = config.trim_fraction
    if config.strategy == "clipped_fedavg" and config.max_norm > 0:
        options["max_norm"] = config.max_norm
    reference = (
        model.LinearModel(np.asarray(current.weights), current.bias)
        if current
        else model.LinearModel.zeros(config.feature_count)
    )
    combined = model.aggregate(config.strategy, models, weights, reference=reference, **options)
    return combined, weights


@dataclass
class Buffer:
    """Updates waiting for the next version, with the offsets that carried them."""

    updates: list[LocalUpdate] = field(default_factory=list)
    keys: set[tuple[str, int]] = field(default_factory=set)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition) → next

    def add(self, update: LocalUpdate) -> bool:
        key = (update.device_id, update.model_version)
        if key in self.keys:
            return False
        self.keys.add(key)
        self.updates.append(update)
        return True

    def consumed(self, message: Message) -> None:
        self.offsets[(message.topic(), message.partition())] = message.offset() + 1

    def devices(self) -> int:
        return len({u.device_id for u in self.updates})

    def clear(self) -> None:
        self.updates, self.keys, self.offsets = [], set(), {}


# --- storage ---------------------------------------------------------------------------------


def latest_global(conn: psycopg.Connection) -> GlobalUpdate | None:
    row = conn.execute(
        "SELECT global_version, aggregation_round, weights, bias, accuracy, num_devices,"
        " strategy, created_at FROM federated_models ORDER BY global_version DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    return GlobalUpdate(row[0], row[1], tuple(row[2]), row[3], row[4], row[5], row[6], row[7])


def already_stored(conn: psycopg.Connection, updates: list[LocalUpdate]) -> set[tuple[str, int]]:
    if not updates:
        return set()
    rows = conn.execute(
        "SELECT device_id, model_version FROM local_models"
        " WHERE (device_id, model_version) IN (SELECT * FROM unnest(%s::text[], %s::int[]))",
        ([u.device_id for u in updates], [u.model_version for u in updates]),
    ).fetchall()
    return {(device, version) for device, version in rows}


def store_version(
    conn: psycopg.Connection,
    new: GlobalUpdate,
    updates: list[LocalUpdate],
    weights: list[float],
) -> None:
    """The version and the updates it was built from, in one transaction."""
    with conn.transaction():
        conn.execute(
            "INSERT INTO federated_models (global_version, aggregation_round, num_devices,"
            " accuracy, weights, bias, strategy, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (
                new.version,
                new.aggregation_round,
                new.num_devices,
                new.accuracy,
                list(new.weights),
                new.bias,
                new.strategy,
                new.timestamp,
            ),
        )
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO local_models (device_id, model_version, global_version, accuracy,"
                " loss, samples_processed, weights, bias, aggregated_into, aggregation_weight,"
                " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (device_id, model_version) DO NOTHING",
                [
                    (
                        u.device_id,
                        u.model_version,
                        u.base_global_version,
                        u.accuracy,
                        u.loss,
                        u.samples_processed,
                        list(u.weights),
                        u.bias,
                        new.version,
                        weight,
                        u.timestamp,
                    )
                    for u, weight in zip(updates, weights, strict=True)
                ],
            )


# --- the service ---------------------------------------------------------------------------


class FedAvgService:
    def __init__(self, settings: Settings, config: FedAvgConfig | None = None) -> None:
        self.settings = settings
        self.config = config or FedAvgConfig.from_settings(settings)
        self.topics = settings.topics
        self.conn = psycopg.connect(settings.database_url, autocommit=True)
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": settings.consumer_group("fedavg"),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                # A restarted service gets its partitions back after this, not Kafka's 45 s.
                "session.timeout.ms": 10_000,
            }
        )
        self.producer = Producer(producer_config(settings, **{"linger.ms": 5}))
        self.buffer = Buffer()
        self.current = latest_global(self.conn)
        self.dead_letters = 0
        self.running = True

    def run(self, max_versions: int | None = None) -> None:
        self.consumer.subscribe([self.topics.local_updates])
        if self.current is not None:
            log.info("resuming after global version %d", self.current.version)
            self._publish(self.current)
        created = 0
        while self.running and (max_versions is None or created < max_versions):
            messages = self.consumer.consume(1000, timeout=1.0)
            created += self._handle(messages)
        self.close()

    def _handle(self, messages: list[Message]) -> int:
        decoded: list[tuple[Message, LocalUpdate]] = []
        for message in messages:
            if message.error() is not None:
                if message.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", message.error())
                continue
            update = self._validate(message)
            if update is None:
                self.buffer.consumed(message)
                continue
            decoded.append((message, update))
        stored = already_stored(self.conn, [u for _, u in decoded])
        created = 0
        for message, update in decoded:
            if (update.device_id, update.model_version) not in stored:
                self.buffer.add(update)
            self.buffer.consumed(message)
            if self.buffer.devices() >= self.config.min_devices:
                self._new_version()
                created += 1
        return created

    def _validate(self, message: Message) -> LocalUpdate | None:
        try:
            update = decode_local_update(message.value())
            if len(update.weights) != self.config.feature_count:
                raise InvalidMessage(
                    f"{len(update.weights)} weights, the model has {self.config.feature_count}"
                )
            current = self.current.version if self.current else 0
            if update.base_global_version > current:
                raise InvalidMessage(
                    f"base_global_version {update.base_global_version} is newer than the "
                    f"latest global version {current}"
                )
            return update
        except InvalidMessage as exc:
            self.dead_letters += 1
            log.warning("dead letter from %s: %s", message.topic(), exc)
            self.producer.produce(
                self.topics.dead_letter, dead_letter(message.topic(), message.value(), str(exc))
            )
            return None

    def _new_version(self) -> None:
        updates = self.buffer.updates
        combined, weights = combine(updates, self.current, self.config)
        version = (self.current.version if self.current else 0) + 1
        samples = np.asarray([u.samples_processed for u in updates], dtype=np.float64)
        accuracy = float(np.average([u.accuracy for u in updates], weights=samples))
        new = GlobalUpdate(
            version=version,
            aggregation_round=version,
            weights=tuple(float(w) for w in combined.weights),
            bias=float(combined.bias),
            accuracy=accuracy,
            num_devices=self.buffer.devices(),
            strategy=self.config.strategy,
            timestamp=datetime.now(UTC),
        )
        store_version(self.conn, new, updates, weights)
        self._publish(new)
        self.consumer.commit(
            offsets=[TopicPartition(t, p, o) for (t, p), o in self.buffer.offsets.items()],
            asynchronous=False,
        )
        log.info(
            "global version %d from %d updates of %d devices (%s)",
            version,
            len(updates),
            new.num_devices,
            new.strategy,
        )
        self.current = new
        self.buffer.clear()

    def _publish(self, update: GlobalUpdate) -> None:
        self.producer.produce(
            self.topics.global_updates,
            encode_global_update(update),
            key=str(update.version).encode(),
        )
        if self.producer.flush(30):
            raise RuntimeError(f"global version {update.version} was not acknowledged by Kafka")

    def stop(self, *_: object) -> None:
        self.running = False

    def close(self) -> None:
        self.producer.flush(30)
        self.consumer.close()
        self.conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FLEAD's federated averaging service")
    parser.add_argument("--max-versions", type=int, help="exit after creating this many versions")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    service = FedAvgService(load_settings())
    signal.signal(signal.SIGTERM, service.stop)
    signal.signal(signal.SIGINT, service.stop)
    service.run(args.max_versions)


if __name__ == "__main__":
    main()
