"""Hourly analytics for the hours that new readings landed in.

The schedule covers live data (the previous hour, every hour). Replayed data carries event
times in the past, which no schedule reaches: this sensor looks at how far each partition of
``edge-iiot-stream`` grew since its last tick, reads the Kafka timestamps (= event times) of the
first and last new message, and requests one run over the range of hours between them.
"""

import json
from datetime import UTC, datetime

from confluent_kafka import Consumer, TopicPartition
from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    TimeWindowPartitionsDefinition,
    sensor,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from flead import kafka
from flead.config import Settings
from flead_assets.resources.settings import FleadResource


def _consumer(settings: Settings) -> Consumer:
    return Consumer(
        kafka.short_lived(
            kafka.client_config(
                settings,
                "dagster",
                **{"group.id": "flead-dagster-readings-sensor", "enable.auto.commit": False},
            )
        )
    )


def _timestamp_at(consumer: Consumer, topic: str, partition: int, offset: int) -> int | None:
    consumer.assign([TopicPartition(topic, partition, offset)])
    message = consumer.poll(5.0)
    if message is None or message.error() is not None:
        return None
    return message.timestamp()[1]


def new_time_range(
    settings: Settings, seen: dict[str, int]
) -> tuple[dict[str, int], datetime | None, datetime | None]:
    """(end offsets now, earliest and latest Kafka timestamp of the messages since ``seen``)."""
    topic = settings.topics.readings
    consumer = _consumer(settings)
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        ends: dict[str, int] = {}
        stamps: list[int] = []
        for partition in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            ends[str(partition)] = high
            first = max(low, seen.get(str(partition), low))
            if high <= first:
                continue
            for offset in (first, high - 1):
                ms = _timestamp_at(consumer, topic, partition, offset)
                if ms is not None and ms > 0:
                    stamps.append(ms)
    finally:
        consumer.close()
    if not stamps:
        return ends, None, None
    as_dt = [datetime.fromtimestamp(ms / 1000, UTC) for ms in (min(stamps), max(stamps))]
    return ends, as_dt[0], as_dt[1]


def hour_range(
    partitions: TimeWindowPartitionsDefinition, start: datetime, end: datetime
) -> tuple[str, str] | None:
    """Partition keys of the hours containing ``start`` and ``end``, clipped to the existing
    partitions (none before ``analytics_start``, none for the hour still running)."""
    first_key, last_key = partitions.get_first_partition_key(), partitions.get_last_partition_key()
    if first_key is None or last_key is None:
        return None
    fmt = partitions.fmt
    lo = max(start.replace(minute=0, second=0, microsecond=0), partitions.start)
    last = datetime.strptime(last_key, fmt).replace(tzinfo=UTC)
    hi = min(end.replace(minute=0, second=0, microsecond=0), last)
    if hi < lo:
        return None
    return lo.strftime(fmt), hi.strftime(fmt)


def build_readings_sensor(settings: Settings, analytics_asset, partitions):
    @sensor(
        name="readings_sensor",
        description="New messages in the readings topic → hourly analytics of their hours.",
        asset_selection=[analytics_asset.key],
        minimum_interval_seconds=max(60, settings.evaluation_sensor_interval_s * 4),
        default_status=DefaultSensorStatus.RUNNING,
    )
    def readings_sensor(context: SensorEvaluationContext, flead: FleadResource) -> SensorResult:
        seen = json.loads(context.cursor) if context.cursor else {}
        ends, start, end = new_time_range(flead.settings, seen)
        hours = hour_range(partitions, start, end) if start and end else None
        if hours is None:
            return SensorResult(cursor=json.dumps(ends), skip_reason="no new readings to summarise")
        first, last = hours
        request = RunRequest(
            run_key=f"readings-{sum(ends.values())}-{first}-{last}",
            tags={ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last},
        )
        if first == last:
            request = RunRequest(run_key=request.run_key, partition_key=first)
        return SensorResult(run_requests=[request], cursor=json.dumps(ends))

    return readings_sensor
