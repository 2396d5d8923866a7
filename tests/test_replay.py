"""Unit test of streaming.replay with a stand-in producer (no broker): keys, timestamps and the
batched form, with single- and multichannel readings."""

from __future__ import annotations

from typing import ClassVar

import pytest

import streaming.replay as replay_module
from streaming.messages import Reading, decode_readings, single_reading


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
