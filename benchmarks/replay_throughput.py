"""Replay throughput: FLEAD's replay producer beside a bare confluent-kafka loop.

Both send the same readings (same keys, JSON values and timestamps) with the same producer
configuration to fresh topics on the same broker, alternating over several rounds. The bare
loop gets its messages pre-encoded and has no pacing, progress or delivery accounting: it is
the ceiling the replay producer is measured against.
"""

from __future__ import annotations

import argparse

from confluent_kafka import Producer

from benchmarks.common import (
    delete_topics,
    fresh_topic,
    interleaved,
    summarise,
    timed,
    write_result,
)
from flead import kafka
from flead.config import Settings, load_settings
from streaming.messages import encode_reading
from streaming.replay import replay
from streaming.sources import synthetic_fleet


def bare_loop(settings: Settings, topic: str, messages: list[tuple[bytes, bytes, int]]) -> int:
    producer = Producer(kafka.producer_config(settings, "admin"))
    for key, value, timestamp in messages:
        while True:
            try:
                producer.produce(topic, value, key, timestamp=timestamp)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(60)
    return len(messages)


def run(settings: Settings, devices: int, readings_per_device: int, rounds: int) -> dict:
    readings = list(synthetic_fleet(num_devices=devices, readings_per_device=readings_per_device))
    messages = [(r.device_id.encode(), encode_reading(r), r.timestamp_ms) for r in readings]
    topics: list[str] = []

    def flead_replay() -> float:
        topics.append(fresh_topic(settings, "replay"))
        return timed(
            lambda: replay(
                readings, kafka.producer_config(settings, "admin"), topics[-1], progress=False
            ).readings
        )

    def bare() -> float:
        topics.append(fresh_topic(settings, "bare"))
        return timed(lambda: bare_loop(settings, topics[-1], messages))

    try:
        rates = summarise(
            interleaved({"flead_replay": flead_replay, "bare_confluent_kafka": bare}, rounds)
        )
    finally:
        delete_topics(settings, topics)
    ratio = rates["flead_replay"]["median"] / rates["bare_confluent_kafka"]["median"]
    return {
        "unit": "readings/s",
        "readings_per_run": len(readings),
        "rounds": rounds,
        "rates": rates,
        "ratio_replay_to_bare": ratio,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=2407)
    parser.add_argument("--readings-per-device", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    result = run(load_settings(), args.devices, args.readings_per_device, args.rounds)
    path = write_result("replay_throughput", result)
    rates = result["rates"]
    print(
        f"replay {rates['flead_replay']['median']:,.0f} readings/s, bare confluent-kafka "
        f"{rates['bare_confluent_kafka']['median']:,.0f} readings/s, ratio "
        f"{result['ratio_replay_to_bare']:.2f} → {path}"
    )
    return result


if __name__ == "__main__":
    main()
