"""Unit test of streaming.replay with a stand-in producer (no broker): keys, timestamps and the
batched form, with single- and multichannel readings."""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import pytest

import streaming.replay as replay_module
from streaming.messages import Reading, decode_readings, encode_reading, single_reading


class FakeProducer:
    instances: ClassVar[list[FakeProducer]] = []

    def __init__(self, config: dict) -> None:
        self.config = config
        self.sent: list[tuple[str, bytes, bytes, int]] = []
        FakeProducer.instances.append(self)

    def produce(self, topic, key, value, timestamp, on_delivery=None) -> None:
        self.sent.append((topic, key, value, timestamp))
        if on_delivery is not None:
            on_delivery(None, None)

    def poll(self, _timeout: float) -> int:
        return 0

    def flush(self, _timeout: float) -> int:
        return 0


READINGS = [
    single_reading("a", 1_000, 1.0, 0),
    Reading("pump", 1_500, (2.0, 3.0), 1, ("pressure", "temp")),
    single_reading("a", 2_000, 4.0),
    Reading("pump", 2_500, (5.0, 6.0), None, ("pressure", "temp")),
    single_reading("a", 3_000, 7.0, 1),
]


@pytest.fixture
def producer(monkeypatch):
    FakeProducer.instances.clear()
    monkeypatch.setattr(replay_module, "Producer", FakeProducer)
    return FakeProducer.instances


@pytest.mark.parametrize("batch", [1, 2, 50])
def test_replay_keys_by_device_and_stamps_event_time(producer, batch):
    result = replay_module.replay(READINGS, {}, "edge-iiot-stream", progress=False, batch=batch)
    assert result.readings == len(READINGS)
    [fake] = producer
    received = []
    for topic, key, value, timestamp in fake.sent:
        decoded = decode_readings(value)
        assert topic == "edge-iiot-stream" and len(decoded) <= batch
        assert {r.device_id for r in decoded} == {key.decode()}  # key = device_id
        assert timestamp == decoded[-1].timestamp_ms  # the newest reading's event time
        received += decoded
    for device in ("a", "pump"):  # each device's readings arrive complete and in order
        assert [r for r in received if r.device_id == device] == [
            r for r in READINGS if r.device_id == device
        ]
    if batch == 1:
        assert received == READINGS


class FakeClock:
    """The replay's clock, advanced only by its sleeps: the linger's timing is exact."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


@pytest.fixture
def clock(monkeypatch, producer) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(replay_module.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(replay_module.time, "sleep", fake.sleep)
    # Each message with the (fake) moment it was produced.
    original = FakeProducer.produce

    def produce(self, topic, key, value, timestamp, on_delivery=None) -> None:
        original(self, topic, key, value, timestamp, on_delivery)
        self.sent[-1] = (*self.sent[-1], fake.now)

    monkeypatch.setattr(FakeProducer, "produce", produce)
    return fake


def two_devices(seconds: int) -> list[Reading]:
    """ "a" reads every second on the second, "pump" every second at the half (two channels)."""
    out = []
    for k in range(seconds):
        out.append(single_reading("a", 1_000_000 + k * 1000, float(k), k % 2))
        out.append(Reading("pump", 1_000_500 + k * 1000, (k, -k), None, ("pressure", "temp")))
    return out


def test_linger_sends_what_a_device_sent_within_linger_ms(producer, clock):
    readings = two_devices(10)
    result = replay_module.replay(
        readings, {}, "t", speedup=1.0, progress=False, batch=50, linger_ms=2_500
    )
    [fake] = producer
    assert result.readings == 20 and result.messages == len(fake.sent)
    start = clock.now - result.seconds
    messages = []
    for _, key, value, timestamp, sent_at in fake.sent:
        decoded = decode_readings(value)
        assert {r.device_id for r in decoded} == {key.decode()}
        assert timestamp == decoded[-1].timestamp_ms
        first_due = start + (decoded[0].timestamp_ms - 1_000_000) / 1000
        # Sent when the oldest had waited the linger, not later (the rest at the end).
        assert sent_at == pytest.approx(min(first_due + 2.5, clock.now))
        messages.append([r.timestamp_ms for r in decoded])
    # Readings 1 s apart, a linger of 2.5 s: three per message, the last one what is left.
    expected = [[1_000_000 + k * 1000 for k in range(i, min(i + 3, 10))] for i in range(0, 10, 3)]
    assert sorted(m for m in messages if m[0] % 1000 == 0) == expected
    assert sorted(m for m in messages if m[0] % 1000 == 500) == [
        [t + 500 for t in m] for m in expected
    ]
    received = [r for _, _, v, _, _ in fake.sent for r in decode_readings(v)]
    assert sorted(received, key=lambda r: r.timestamp_ms) == readings


def test_linger_keeps_the_count_limit_and_the_single_reading_form(producer, clock):
    readings = two_devices(5)
    replay_module.replay(readings, {}, "t", speedup=1.0, progress=False, batch=2, linger_ms=60_000)
    [fake] = producer
    sizes = sorted(len(decode_readings(v)) for _, _, v, _, _ in fake.sent)
    assert sizes == [1, 1, 2, 2, 2, 2]  # 5 readings per device: 2 + 2 + 1
    # A linger shorter than the gap between a device's readings: single-reading messages.
    FakeProducer.instances.clear()
    replay_module.replay(readings, {}, "t", speedup=1.0, progress=False, batch=50, linger_ms=1)
    [fake] = producer
    assert [v for _, _, v, _, _ in fake.sent] == [encode_reading(r) for r in readings]


def test_resume_skips_each_devices_first_delivered_readings() -> None:
    readings = [
        single_reading("a", 1_000, 1.0),
        single_reading("b", 1_000, 2.0),
        single_reading("a", 2_000, 3.0),
        single_reading("b", 2_000, 4.0),
        single_reading("a", 3_000, 5.0),
    ]
    delivered = Counter({"a": 2, "c": 7})  # c: a device of another data set, never seen here
    rest = list(replay_module.skip_delivered(readings, delivered))
    assert [(r.device_id, r.timestamp_ms) for r in rest] == [
        ("b", 1_000),
        ("b", 2_000),
        ("a", 3_000),
    ]
    assert delivered == Counter({"a": 2, "c": 7})  # the caller's counts are left as they were
