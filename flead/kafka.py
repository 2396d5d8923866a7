"""Kafka administration with confluent-kafka: topics, their message counts, client configs."""

from __future__ import annotations

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from flead.config import Settings


def admin(settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap})


def producer_config(settings: Settings, **overrides: object) -> dict[str, object]:
    """An idempotent producer (acks=all, ordered retries) tuned for throughput."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 20,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500_000,
        "queue.buffering.max.kbytes": 1_048_576,
        **overrides,
    }


def ensure_topics(
    settings: Settings, names: list[str] | None = None, timeout: float = 30.0
) -> list[str]:
    """Create the missing topics (all of FLEAD's by default); return the ones created."""
    client = admin(settings)
    wanted = names if names is not None else settings.topics.all()
    existing = set(client.list_topics(timeout=timeout).topics)
    new = [
        NewTopic(
            name,
            num_partitions=settings.kafka_partitions,
            replication_factor=settings.kafka_replication,
            config={"retention.ms": str(settings.kafka_retention_ms)},
        )
        for name in wanted
        if name not in existing
    ]
    if not new:
        return []
    for future in client.create_topics(new, request_timeout=timeout).values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
    return [t.topic for t in new]


def topic_message_counts(
    settings: Settings, names: list[str] | None = None, timeout: float = 10.0
) -> dict[str, int | None]:
    """Messages held per topic (high minus low watermark over partitions); None if missing."""
    wanted = names if names is not None else settings.topics.all()
    metadata = admin(settings).list_topics(timeout=timeout)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": "flead-status",
            "enable.auto.commit": False,
        }
    )
    try:
        counts: dict[str, int | None] = {}
        for name in wanted:
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None:
                counts[name] = None
                continue
            total = 0
            for partition in topic.partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(name, partition), timeout=timeout
                )
                total += high - low
            counts[name] = total
        return counts
    finally:
        consumer.close()


def consumer_lag(settings: Settings, group: str, topic: str, timeout: float = 10.0) -> int | None:
    """Messages of ``topic`` that ``group`` has not committed yet; None before its first
    commit on a partition that holds messages."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return None
        partitions = [TopicPartition(topic, p) for p in metadata.partitions]
        lag = 0
        for tp in consumer.committed(partitions, timeout=timeout):
            _, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            if tp.offset < 0:
                if high > 0:
                    return None
                continue
            lag += high - tp.offset
        return lag
    finally:
        consumer.close()
