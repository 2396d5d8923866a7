"""Writes the ``anomalies`` topic into the ``anomalies`` table.

A small consumer in the Kafka Connect JDBC-sink pattern: batches of records become one upsert
on the natural key ``(device_id, timestamp)``, and offsets are committed only after the write,
so a restart re-writes at most one batch and never duplicates a row.

Every record is handled on its own: one that cannot be decoded, validated or stored (PostgreSQL
refuses it: the batch's upsert fails and the records are then written one by one, each in its own
transaction) goes to the dead-letter topic with the reason, and the sink goes on. Offsets are
committed only after the rows are written and every dead letter is acknowledged by Kafka. Failures
of the infrastructure (PostgreSQL or Kafka unreachable) stop the sink, which resumes from the
committed offsets.
"""

from __future__ import annotations

import argparse
import logging
import signal
from datetime import UTC, datetime, timedelta

import psycopg
from confluent_kafka import Consumer, Message, Producer

from flead.config import Settings, load_settings
from flead.kafka import DeadLetters, client_config, producer_config
from streaming.learner import Anomaly
from streaming.messages import decode_anomaly

log = logging.getLogger("flead.anomaly_sink")

#: Errors that say PostgreSQL (or the way there) failed, not that a record is bad.
INFRASTRUCTURE_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)

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


def _row(a: Anomaly) -> tuple:
    return (
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


def write_anomalies(conn: psycopg.Connection, anomalies: list[Anomaly]) -> None:
    # The same key twice in one statement would make ON CONFLICT fail: keep the last.
    latest = {(a.device_id, a.timestamp_ms): a for a in anomalies}
    with conn.transaction(), conn.cursor() as cursor:
        cursor.executemany(UPSERT, [_row(a) for a in latest.values()])


def write_each(conn: psycopg.Connection, anomalies: list[Anomaly]) -> dict[int, str]:
    """Write the records one by one (in order, so the last of a repeated key wins as in
    :func:`write_anomalies`); index → reason for each one PostgreSQL refused."""
    refused = {}
    for i, anomaly in enumerate(anomalies):
        try:
            with conn.transaction(), conn.cursor() as cursor:
                cursor.execute(UPSERT, _row(anomaly))
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:
            refused[i] = f"PostgreSQL refused the record: {type(exc).__name__}: {exc}"[:500]
    return refused


class AnomalySink:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn = psycopg.connect(settings.database_url, autocommit=True)
        self.consumer = Consumer(
            client_config(
                settings,
                "sink",
                **{
                    "group.id": settings.consumer_group("anomaly-sink"),
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                },
            )
        )
        self.producer = Producer(producer_config(settings, "sink"))
        self.refused = DeadLetters(self.producer, settings.topics.dead_letter)
        self.running = True
        self.written = 0

    def run(self) -> None:
        topic = self.settings.topics.anomalies
        self.consumer.subscribe([topic])
        try:
            while self.running:
                messages = self.consumer.consume(5000, timeout=1.0)
                self.handle([m for m in messages if m.error() is None])
        finally:
            self.consumer.close()
            self.conn.close()

    def handle(self, messages: list[Message]) -> None:
        """One poll: decode, write, dead-letter what failed, then commit."""
        if not messages:
            return
        decoded: list[tuple[Message, Anomaly]] = []
        for message in messages:
            try:
                decoded.append((message, decode_anomaly(message.value())))
            except Exception as exc:  # whatever the bytes, the sink goes on
                self._refuse(message, str(exc) or type(exc).__name__)
        anomalies = [a for _, a in decoded]
        try:
            write_anomalies(self.conn, anomalies)
        except INFRASTRUCTURE_ERRORS:
            raise
        except Exception as exc:
            # A record PostgreSQL refuses fails the whole batch: find it, keep the others.
            log.warning(
                "batch of %d anomalies refused (%s): writing one by one", len(anomalies), exc
            )
            refused = write_each(self.conn, anomalies)
            for i, reason in refused.items():
                self._refuse(decoded[i][0], reason)
            anomalies = [a for i, a in enumerate(anomalies) if i not in refused]
        # Offsets move only once every dead letter of the poll is acknowledged (flush() also
        # counts failed deliveries as gone, hence the delivery reports).
        self.refused.confirm()
        self.consumer.commit(asynchronous=False)
        self.written += len(anomalies)

    def _refuse(self, message: Message, reason: str) -> None:
        self.refused.send(message, reason)

    @property
    def dead_letters(self) -> int:
        return self.refused.count

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
