"""Kafka authentication and least privilege against the real broker: who may connect, and
which of flead's SCRAM users may write and read which topic (flead/kafka.py)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from flead import kafka
from flead.config import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def secured(settings: Settings) -> Settings:
    if settings.kafka_security != "sasl":
        pytest.skip("FLEAD_KAFKA_SECURITY=none: the broker has no authentication to test")
    return settings


def _count(settings: Settings, topic: str) -> int:
    return kafka.topic_message_counts(settings, [topic])[topic] or 0


def _produce(config: dict[str, object], topic: str) -> KafkaError | None:
    """Send one message; the delivery report's error (None: the broker stored it)."""
    reports: list[KafkaError | None] = []
    producer = Producer({**config, "message.timeout.ms": 8000})
    producer.produce(topic, b'{"probe": true}', on_delivery=lambda err, _msg: reports.append(err))
    producer.flush(20)
    assert len(reports) == 1, "no delivery report within 20 s"
    return reports[0]


def test_unauthenticated_client_cannot_produce(secured: Settings) -> None:
    topic = secured.topics.readings
    before = _count(secured, topic)
    error = _produce({"bootstrap.servers": secured.kafka_bootstrap}, topic)
    assert error is not None, "a client without credentials wrote to the readings topic"
    # A wrong password for a real user is refused as well.
    wrong = kafka.client_config(secured, "replay", **{"sasl.password": "not-the-password"})
    assert _produce(wrong, topic) is not None
    assert _count(secured, topic) == before


def test_unauthenticated_admin_cannot_list_topics(secured: Settings) -> None:
    client = AdminClient({"bootstrap.servers": secured.kafka_bootstrap})
    with pytest.raises(Exception):  # noqa: B017 - times out or fails authentication
        client.list_topics(timeout=5)


@pytest.mark.parametrize(
    ("user", "topic", "allowed"),
    [
        ("replay", "global_updates", False),
        ("edge", "global_updates", False),
        ("sink", "global_updates", False),
        ("dagster", "global_updates", False),
        ("fedavg", "global_updates", True),
        ("replay", "readings", True),
        ("replay", "anomalies", False),
        ("replay", "local_updates", False),
        ("edge", "local_updates", True),
        ("edge", "anomalies", True),
        ("fedavg", "readings", False),
    ],
)
def test_who_may_write_which_topic(secured: Settings, user: str, topic: str, allowed: bool) -> None:
    name = getattr(secured.topics, topic)
    before = _count(secured, name)
    error = _produce(kafka.producer_config(secured, user), name)
    if allowed:
        assert error is None, f"{user} could not write {name}: {error}"
        assert _count(secured, name) == before + 1
    else:
        assert error is not None, f"{user} wrote to {name}"
        assert error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error
        assert _count(secured, name) == before


def test_replay_user_cannot_read(secured: Settings) -> None:
    """The replay producer writes readings; reading them back is not among its rights."""
    assert _produce(kafka.producer_config(secured, "replay"), secured.topics.readings) is None
    consumer = Consumer(
        kafka.client_config(
            secured,
            "replay",
            **{"group.id": secured.consumer_group("edge"), "auto.offset.reset": "earliest"},
        )
    )
    consumer.subscribe([secured.topics.readings])
    errors: list[KafkaError] = []
    try:
        deadline = time.monotonic() + 20
        while not errors and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is not None:
                assert message.error() is not None, "the replay user read a reading"
                errors.append(message.error())
    finally:
        consumer.close()
    assert errors and errors[0].code() in {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
    }


def test_flink_properties_use_the_relocated_login_module(
    secured: Settings,
) -> None:
    """The Flink connector's properties authenticate with the relocated login module."""
    props = kafka.java_client_properties(secured, "edge", kafka.FLINK_SHADED_PREFIX)
    assert props["security.protocol"] == "SASL_PLAINTEXT"
    assert props["sasl.jaas.config"].startswith(
        "org.apache.flink.kafka.shaded.org.apache.kafka.common.security.scram.ScramLoginModule"
    )
    assert 'username="edge"' in props["sasl.jaas.config"]


def test_short_lived_consumers_close_without_a_login_error_line(secured: Settings, capfd) -> None:
    """A consumer that looks and closes (what `flead status`, `flead wait`, `flead replay
    --resume` and the readings sensor do) can close while its group-coordinator connection is
    still logging in; librdkafka then prints a benign "SASL authentication error" line, about
    one close in ten here. Routed to Python logging (kafka.short_lived), none reaches the
    terminal in 60 closes, and the counts are still right."""
    topic = secured.topics.readings
    held = {_count(secured, topic) for _ in range(60)}
    assert held == {_count(secured, topic)}
    assert "SASL authentication error" not in capfd.readouterr().err


def test_a_wrong_password_still_fails_loudly(secured: Settings, caplog) -> None:
    """Routed to logging, librdkafka's real errors still reach the user: the call fails, and
    the log says why."""
    config = kafka.short_lived(
        {**kafka.client_config(secured, "admin"), "sasl.password": "wrong", "group.id": "probe"}
    )
    consumer = Consumer(config)
    try:
        with caplog.at_level("ERROR", logger="flead.kafka"), pytest.raises(KafkaException):
            consumer.list_topics(secured.topics.readings, timeout=10)
    finally:
        consumer.close()
    assert any("invalid credentials" in r.getMessage() for r in caplog.records)
