"""Run FLEAD's streaming processes for tests: the real Flink job, FedAvg service and anomaly
sink as subprocesses, each with a test's own settings, topics, database and state folder."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition

from flead import kafka, services
from flead.config import Settings


def start(settings: Settings, name: str) -> int:
    return services.start_streaming(settings, name)


def stop(settings: Settings, name: str) -> None:
    services.stop_pid(settings, name, timeout=60)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def query(settings: Settings, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute(sql, params).fetchall()


def scalar(settings: Settings, sql: str, params: tuple = ()) -> Any:
    return query(settings, sql, params)[0][0]


def topic_count(settings: Settings, topic: str) -> int:
    return kafka.topic_message_counts(settings, [topic])[topic] or 0


def group_lag(settings: Settings, group: str, topic: str) -> int | None:
    return kafka.consumer_lag(settings, group, topic)


def read_records(settings: Settings, topic: str) -> list[tuple[int, int, bytes]]:
    """Every message now in ``topic`` as (partition, offset, value), each partition in order."""
    expected = topic_count(settings, topic)
    consumer = Consumer(
        kafka.client_config(
            settings,
            "admin",
            **{
                "group.id": f"reader-{time.monotonic_ns()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            },
        )
    )
    consumer.subscribe([topic])
    records: list[tuple[int, int, bytes]] = []
    deadline = time.monotonic() + 60
    try:
        while len(records) < expected and time.monotonic() < deadline:
            records.extend(
                (m.partition(), m.offset(), m.value())
                for m in consumer.consume(10_000, 1.0)
                if m.error() is None
            )
    finally:
        consumer.close()
    return records


def read_topic(settings: Settings, topic: str) -> list[bytes]:
    """Every message now in ``topic``, as raw values."""
    return [value for _, _, value in read_records(settings, topic)]


def committed_offsets(settings: Settings, group: str, topic: str) -> dict[int, int]:
    """``group``'s committed offset per partition of ``topic`` (-1001: none yet)."""
    consumer = Consumer(kafka.client_config(settings, "admin", **{"group.id": group}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in committed}
    finally:
        consumer.close()


def produce_raw(settings: Settings, topic: str, values: list[bytes]) -> None:
    producer = Producer(kafka.client_config(settings, "admin"))  # any topic, any bytes
    for value in values:
        producer.produce(topic, value)
    assert producer.flush(30) == 0


def produce_keyed(settings: Settings, topic: str, key: bytes, value: bytes) -> None:
    """One message with the producer settings and key the replay uses: it lands in the
    partition of that device's readings, after them."""
    producer = Producer(kafka.producer_config(settings, "admin"))
    producer.produce(topic, value, key=key)
    assert producer.flush(30) == 0


def dead_letters(settings: Settings) -> list[dict]:
    return [json.loads(v) for v in read_topic(settings, settings.topics.dead_letter)]


def settled(snapshot: Callable[[], tuple], quiet_s: float, timeout: float, what: str) -> tuple:
    """Wait until ``snapshot()`` stops changing for ``quiet_s`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = snapshot(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = snapshot()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError(f"{what} still changing after {timeout:.0f} s: {last}")
