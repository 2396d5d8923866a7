"""``edge-iiot-stream`` as a Spark DataFrame, through Spark's Kafka source.

Both message forms of DESIGN §2 are read: a single reading and the batched
``{"readings": [...]}``, with ``data`` a number or an object of named channels. Each message
goes through :func:`streaming.messages.decode_readings`, the streaming consumers' own decoder.
Messages that break the contract (not JSON, no device, a non-finite value, an unparsable
timestamp, a label other than 0/1, ...) are dropped and counted: the streaming
consumers already send each of them to the dead-letter topic once, so a batch job that reads the
topic again and again must not. A reading replayed twice is the same reading: duplicates of
``(device_id, timestamp)`` are dropped, so every count is idempotent under replays.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from streaming.messages import InvalidMessage, decode_readings

PARSED_SCHEMA = (
    "device_id string, ts timestamp, channels array<string>, values array<double>, label int,"
    " reason string"
)
"""What :func:`decode_messages` makes of a message: one row per reading (``reason`` null), or
one row with the reason the message breaks the contract."""


@dataclass(frozen=True)
class KafkaSlice:
    """Which messages of a topic to read: all of them, or those whose Kafka timestamp is in
    ``[start, end)``. The replay producer stamps each message with its reading's event time,
    so this narrows an hour's read to that hour's offsets instead of scanning the topic."""

    bootstrap: str
    topic: str
    start: datetime | None = None
    end: datetime | None = None
    # The Kafka client's connection properties (flead.kafka.java_client_properties: the
    # dagster user's SASL login), passed to Spark's source with its "kafka." prefix.
    client: tuple[tuple[str, str], ...] = ()

    def options(self) -> dict[str, str]:
        options = {
            "kafka.bootstrap.servers": self.bootstrap,
            "subscribe": self.topic,
            "startingOffsets": "earliest",
            "endingOffsets": "latest",
            "failOnDataLoss": "false",
        }
        options |= {f"kafka.{key}": value for key, value in self.client}
        if self.start is not None:
            del options["startingOffsets"]
            options["startingTimestamp"] = str(_millis(self.start))
            # A partition with nothing at or after `start` contributes nothing (not an error).
            options["startingOffsetsByTimestampStrategy"] = "latest"
        if self.end is not None:
            del options["endingOffsets"]
            # The first offset at or after `end` (exclusive); "latest" where there is none.
            options["endingTimestamp"] = str(_millis(self.end))
        return options


def _millis(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def kafka_messages(spark: SparkSession, source: KafkaSlice) -> DataFrame:
    return spark.read.format("kafka").options(**source.options()).load()


def decode_messages(batches: Iterable[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` body: every Kafka ``value`` through :func:`streaming.messages.
    decode_readings`, the decoder the streaming consumers run, so the batch side accepts and
    refuses exactly what they do (single numbers and objects of named channels, single and
    batched messages; a message with one bad reading is refused whole, as they dead-letter it).
    """
    for batch in batches:
        device, ts_ms, channels, values, label, reason = [], [], [], [], [], []
        for payload in batch["value"]:
            try:
                readings = decode_readings(payload)
            except InvalidMessage as exc:
                device.append(None)
                ts_ms.append(None)
                channels.append(None)
                values.append(None)
                label.append(None)
                reason.append(str(exc))
                continue
            for r in readings:
                device.append(r.device_id)
                ts_ms.append(r.timestamp_ms)
                channels.append(list(r.channels))
                values.append(list(r.values))
                label.append(r.label)
                reason.append(None)
        yield pd.DataFrame(
            {
                "device_id": pd.Series(device, dtype=object),
                "ts": pd.to_datetime(pd.Series(ts_ms, dtype="Int64"), unit="ms", utc=True),
                "channels": pd.Series(channels, dtype=object),
                "values": pd.Series(values, dtype=object),
                "label": pd.Series(label, dtype="Int32"),
                "reason": pd.Series(reason, dtype=object),
            }
        )


def parse_readings(messages: DataFrame) -> tuple[DataFrame, DataFrame]:
    """``(readings, rejected)`` from raw Kafka rows.

    ``readings`` has ``device_id``, ``ts`` (timestamp, UTC, millisecond precision),
    ``channels`` (sorted names; ``["value"]`` for a plain number), ``values`` (in the order of
    ``channels``) and ``label`` (null when unlabelled), de-duplicated on ``(device_id, ts)``;
    ``rejected`` one row (with ``reason``) per message that breaks the contract, for counting.
    """
    parsed = messages.select("value").mapInPandas(decode_messages, schema=PARSED_SCHEMA)
    readings = (
        parsed.where(F.col("reason").isNull()).drop("reason").dropDuplicates(["device_id", "ts"])
    )
    return readings, parsed.where(F.col("reason").isNotNull())


def channel_values(readings: DataFrame) -> DataFrame:
    """One row per reading and channel: ``device_id, ts, channel, value, label``."""
    pairs = F.explode(F.arrays_zip(F.col("channels").alias("c"), F.col("values").alias("v")))
    return readings.select("device_id", "ts", "label", pairs.alias("p")).select(
        "device_id",
        "ts",
        F.col("p.c").alias("channel"),
        F.col("p.v").alias("value"),
        "label",
    )
