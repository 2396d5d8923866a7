"""Replay readings into ``edge-iiot-stream``: event-time order, key = device_id.

The producer is idempotent with ``acks=all`` so a retried batch is neither lost nor doubled,
and one key's readings stay ordered in one partition. Three pacing modes: as fast as possible,
a fixed rate in readings/s, or event time compressed by a factor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from confluent_kafka import KafkaError, Producer
from tqdm import tqdm

from streaming.messages import Reading, encode_reading, encode_reading_batch

log = logging.getLogger(__name__)


class ReplayError(RuntimeError):
    """Some readings were not acknowledged by the broker."""


@dataclass(frozen=True)
class ReplayResult:
    readings: int
    seconds: float

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

    def wait(self, index: int, reading: Reading) -> None:
        if self.rate:
            due = self.wall_start + index / self.rate
        elif self.speedup:
            if self.event_start_ms is None:
                self.event_start_ms = reading.timestamp_ms
            due = (
                self.wall_start + (reading.timestamp_ms - self.event_start_ms) / 1000 / self.speedup
            )
        else:
            return
        delay = due - time.monotonic()
        if delay > 0.001:
            time.sleep(delay)


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
) -> ReplayResult:
    """Produce every reading to ``topic``; return once the broker acknowledged all of them.

    ``batch`` > 1 sends up to that many consecutive readings of one device per message (the
    batched form of the contract), which is what lets the Flink job go past per-record costs.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    producer = Producer(producer_config)
    failures: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, _message: object) -> None:
        if error is not None:
            failures.append(error)

    pacer = _Pacer(rate, speedup)
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
    pending: dict[str, list[Reading]] = {}
    for count, reading in enumerate(readings, start=1):
        pacer.wait(count - 1, reading)
        if batch == 1:
            produce(
                producer,
                topic,
                reading.device_id,
                encode_reading(reading),
                reading.timestamp_ms,
                on_delivery,
            )
        else:
            held = pending.setdefault(reading.device_id, [])
            held.append(reading)
            if len(held) == batch:
                _produce_batch(producer, topic, pending.pop(reading.device_id), on_delivery)
        if count % 10_000 == 0:
            bar.update(10_000)
    for held in pending.values():
        _produce_batch(producer, topic, held, on_delivery)
    bar.update(count % 10_000)
    unsent = producer.flush(60)
    seconds = time.monotonic() - started
    bar.close()
    if unsent or failures:
        reason = failures[0] if failures else f"{unsent} still queued after flush"
        raise ReplayError(
            f"{len(failures) + unsent} of {count} readings not delivered to {topic}: {reason}"
        )
    return ReplayResult(count, seconds)


def _produce_batch(producer: Producer, topic: str, held: list[Reading], on_delivery) -> None:
    # The message carries the newest reading's time: a batch is complete at that moment.
    produce(
        producer,
        topic,
        held[0].device_id,
        encode_reading_batch(held),
        held[-1].timestamp_ms,
        on_delivery,
    )


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
