"""Replay readings into ``edge-iiot-stream``: event-time order, key = device_id.

The producer is idempotent with ``acks=all`` so a retried batch is neither lost nor doubled,
and one key's readings stay ordered in one partition. Three pacing modes: as fast as possible,
a fixed rate in readings/s, or event time compressed by a factor.

Batching, as a gateway does it: a device's readings go out in one message when it holds
``batch`` of them or when the oldest has waited ``linger_ms`` (wall clock), whichever comes
first, so a slow device's reading never waits for ``batch - 1`` more.

Resuming a killed replay: what reached the topic is, for each device, a prefix of its readings
(one partition per device, and an idempotent producer never leaves a gap in a partition), so
counting each device's readings in the topic says exactly which readings to skip
(:func:`delivered_counts`, :func:`skip_delivered`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from tqdm import tqdm

from streaming.messages import (
    InvalidMessage,
    Reading,
    decode_readings,
    encode_reading,
    encode_reading_batch,
)

log = logging.getLogger(__name__)


class ReplayError(RuntimeError):
    """Some readings were not acknowledged by the broker."""


@dataclass(frozen=True)
class ReplayResult:
    readings: int
    seconds: float
    messages: int = 0

    @property
    def rate(self) -> float:
        return self.readings / self.seconds if self.seconds > 0 else float("inf")


class _Pacer:
    """Sleeps just enough to hold a fixed rate or an event-time speed-up."""

    def __init__(self, rate: float, speedup: float) -> None:
        if rate < 0 or speedup < 0:
            raise ValueError("rate and speedup must be >= 0 (0 = off)")
        if rate and speedup:
            raise ValueError("give a fixed rate or a time-compression factor, not both")
        self.rate, self.speedup = rate, speedup
        self.wall_start = time.monotonic()
        self.event_start_ms: int | None = None

    def due(self, index: int, reading: Reading) -> float | None:
        """The monotonic time ``reading`` (the ``index``-th) is due; None: no pacing."""
        if self.rate:
            return self.wall_start + index / self.rate
        if self.speedup:
            if self.event_start_ms is None:
                self.event_start_ms = reading.timestamp_ms
            return (
                self.wall_start + (reading.timestamp_ms - self.event_start_ms) / 1000 / self.speedup
            )
        return None


class _Batcher:
    """Each device's readings held until ``batch`` of them or until the oldest has waited
    ``linger_s`` (0 = no time limit), then sent as one message."""

    def __init__(self, producer: Producer, topic: str, batch: int, linger_s: float, on_delivery):
        self.producer, self.topic, self.on_delivery = producer, topic, on_delivery
        self.batch, self.linger_s = batch, linger_s
        # Insertion order is the order of each device's oldest held reading (a device is
        # removed when sent), so the first entry is always the next to expire.
        self.held: dict[str, tuple[float, list[Reading]]] = {}
        self.messages = 0

    def add(self, reading: Reading, now: float) -> None:
        entry = self.held.get(reading.device_id)
        if entry is None:
            entry = self.held[reading.device_id] = (now, [])
        entry[1].append(reading)
        if len(entry[1]) >= self.batch:
            self.send(reading.device_id)

    def next_deadline(self) -> float:
        if not self.linger_s or not self.held:
            return math.inf
        return next(iter(self.held.values()))[0] + self.linger_s

    def send_expired(self, now: float) -> None:
        while self.next_deadline() <= now:
            self.send(next(iter(self.held)))

    def send(self, device_id: str) -> None:
        _, held = self.held.pop(device_id)
        value = encode_reading(held[0]) if len(held) == 1 else encode_reading_batch(held)
        # The message carries the newest reading's time: a batch is complete at that moment.
        produce(
            self.producer, self.topic, device_id, value, held[-1].timestamp_ms, self.on_delivery
        )
        self.messages += 1

    def send_all(self) -> None:
        while self.held:
            self.send(next(iter(self.held)))


def replay(
    readings: Iterable[Reading],
    producer_config: dict[str, object],
    topic: str,
    *,
    rate: float = 0.0,
    speedup: float = 0.0,
    total: int | None = None,
    progress: bool = True,
    batch: int = 1,
    linger_ms: float = 0.0,
) -> ReplayResult:
    """Produce every reading to ``topic``; return once the broker acknowledged all of them.

    ``batch`` > 1 sends up to that many consecutive readings of one device per message (the
    batched form of the contract), which is what lets the Flink job go past per-record costs;
    ``linger_ms`` > 0 sends a device's held readings once the oldest has waited that long
    (a message then holds what the device sent within ``linger_ms``; one reading goes in the
    single-reading form). 0: no time limit.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if linger_ms < 0:
        raise ValueError(f"linger_ms must be >= 0, got {linger_ms}")
    producer = Producer(producer_config)
    failures: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, _message: object) -> None:
        if error is not None:
            failures.append(error)

    pacer = _Pacer(rate, speedup)
    batcher = _Batcher(producer, topic, batch, linger_ms / 1000, on_delivery)
    bar = tqdm(
        total=total,
        unit=" readings",
        unit_scale=True,
        disable=not progress,
        desc=f"replay → {topic}",
        mininterval=0.5,
    )
    started = time.monotonic()
    count = 0
    for count, reading in enumerate(readings, start=1):
        due = pacer.due(count - 1, reading)
        now = time.monotonic()
        batcher.send_expired(now)
        # Until the reading is due, send what expires meanwhile (a lingering device's readings
        # must not wait for the next reading of the whole fleet).
        while due is not None and due - now > 0.001:
            time.sleep(max(min(due, batcher.next_deadline()) - now, 0.0))
            now = time.monotonic()
            batcher.send_expired(now)
        batcher.add(reading, now)
        if count % 10_000 == 0:
            bar.update(10_000)
    batcher.send_all()
    bar.update(count % 10_000)
    unsent = producer.flush(60)
    seconds = time.monotonic() - started
    bar.close()
    if unsent or failures:
        reason = failures[0] if failures else f"{unsent} still queued after flush"
        raise ReplayError(
            f"{len(failures) + unsent} of {count} readings not delivered to {topic}: {reason}"
        )
    return ReplayResult(count, seconds, batcher.messages)


def produce(
    producer: Producer,
    topic: str,
    device_id: str,
    value: bytes,
    timestamp_ms: int,
    on_delivery=None,
) -> None:
    """Produce one message keyed by ``device_id``, waiting (not failing) while the producer's
    local queue is full."""
    while True:
        try:
            producer.produce(
                topic,
                key=device_id.encode(),
                value=value,
                timestamp=timestamp_ms,
                on_delivery=on_delivery,
            )
            producer.poll(0)
            return
        except BufferError:
            # The local queue is full: serve delivery reports until there is room again.
            producer.poll(0.05)


def delivered_counts(consumer_config: dict[str, object], topic: str) -> Counter[str]:
    """How many readings of each device ``topic`` holds now (messages that are not readings,
    such as a stranger's bytes, count for no device)."""
    consumer = Consumer(
        {
            **consumer_config,
            "group.id": "flead-replay-resume",  # assigned, never joined nor committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    counts: Counter[str] = Counter()
    try:
        metadata = consumer.list_topics(topic, timeout=30)
        if metadata.topics[topic].error is not None:
            raise ReplayError(f"cannot read {topic}: {metadata.topics[topic].error}")
        assigned = []
        for partition in metadata.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 30)
            if high > low:
                assigned.append(TopicPartition(topic, partition, OFFSET_BEGINNING))
        consumer.assign(assigned)
        remaining = {tp.partition for tp in assigned}
        while remaining:
            for message in consumer.consume(10_000, timeout=5.0):
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise ReplayError(f"cannot read {topic}: {error}")
                    remaining.discard(message.partition())
                    continue
                with contextlib.suppress(InvalidMessage):
                    counts.update(r.device_id for r in decode_readings(message.value()))
    finally:
        consumer.close()
    return counts


def skip_delivered(readings: Iterable[Reading], delivered: Counter[str]) -> Iterator[Reading]:
    """``readings`` without the first ``delivered[device]`` readings of each device."""
    left = Counter(delivered)
    for reading in readings:
        if left[reading.device_id] > 0:
            left[reading.device_id] -= 1
        else:
            yield reading
