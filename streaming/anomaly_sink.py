"""Writes the ``anomalies`` topic into the ``anomalies`` table.

A small consumer in the Kafka Connect JDBC-sink pattern: batches of records become one upsert
on the natural key ``(device_id, timestamp)``, and offsets are committed only after the write,
so a restart re-writes at most one batch and never duplicates a row. Invalid records go to the
dead-letter topic.
"""

from __future__ import annotations

import argparse
import logging
import signal
from datetime import UTC, datetime, timedelta

import psycopg
from confluent_kafka import Consumer, Producer

from flead.config import Settings, load_settings
from flead.kafka import producer_config
from streaming.learner import Anomaly
from streaming.messages import InvalidMessage, dead_letter, decode_anomaly

log = logging.getLogger("flead.anomaly_sink")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

UPSERT = (
    "INSERT INTO anomalies (device_id, value, z_score, severity, timestamp, score, threshold,"
    " model_version, detector, channels, reason)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (device_id, timestamp) DO UPDATE SET value = EXCLUDED.value,"
    " z_score = EXCLUDED.z_score, severity = EXCLUDED.severity, score = EXCLUDED.score,"
    " threshold = EXCLUDED.threshold, model_version = EXCLUDED.model_version,"
    " detector = EXCLUDED.detector, channels = EXCLUDED.channels, reason = EXCLUDED.reason"
)


def write_anomalies(conn: psycopg.Connection, anomalies: list[Anomaly]) -> None:
    # The same key twice in one statement would make ON CONFLICT fail: keep the last.
    latest = {(a.device_id, a.timestamp_ms): a for a in anomalies}
    with conn.transaction(), conn.cursor() as cursor:
        cursor.executemany(
            UPSERT,
            [
                (
                    a.device_id,
                    a.value,
                    a.z_score,
                    a.severity,
                    _EPOCH + timedelta(milliseconds=a.timestamp_ms),
                    a.score,
                    a.threshold,
                    a.model_version,
                    a.detector,
                    list(a.channels),
                    a.reason,
                )
                for a in latest.values()
            ],
        )


class AnomalySink:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn = psycopg.connect(settings.database_url, autocommit=True)
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": settings.consumer_group("anomaly-sink"),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self.producer = Producer(producer_config(settings))
        self.running = True
        self.written = 0

    def run(self) -> None:
        topic = self.settings.topics.anomalies
        self.consumer.subscribe([topic])
        while self.running:
            messages = [m for m in self.consumer.consume(5000, timeout=1.0) if m.error() is None]
            if not messages:
                continue
            anomalies = []
            for message in messages:
                try:
                    anomalies.append(decode_anomaly(message.value()))
                except InvalidMessage as exc:
                    self.producer.produce(
                        self.settings.topics.dead_letter,
                        dead_letter(topic, message.value(), str(exc)),
                    )
            write_anomalies(self.conn, anomalies)
            self.producer.flush(30)
            self.consumer.commit(asynchronous=False)
            self.written += len(anomalies)
        self.consumer.close()
        self.conn.close()

    def stop(self, *_: object) -> None:
        self.running = False


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sink = AnomalySink(load_settings())
    signal.signal(signal.SIGTERM, sink.stop)
    signal.signal(signal.SIGINT, sink.stop)
    sink.run()


if __name__ == "__main__":
    main()
