from pathlib import Path

import pytest

from flead.config import Settings, describe, load_settings, to_env, with_database_passwords


def test_defaults_without_environment() -> None:
    # The only difference: the password-less database URLs get the generated password.
    assert load_settings({}) == with_database_passwords(Settings(), {})


def test_environment_overrides_scalars_and_nested_topics() -> None:
    settings = load_settings(
        {
            "FLEAD_KAFKA_BOOTSTRAP": "broker-1:9092,broker-2:9092",
            "FLEAD_KAFKA_PARTITIONS": "12",
            "FLEAD_SYNTHETIC_ANOMALY_RATE": "0.05",
            "FLEAD_TOPICS_READINGS": "plant-a-readings",
            "FLEAD_STATE_DIR": "/tmp/flead-state",
        }
    )
    assert settings.kafka_bootstrap == "broker-1:9092,broker-2:9092"
    assert settings.kafka_partitions == 12
    assert settings.synthetic_anomaly_rate == 0.05
    assert settings.topics.readings == "plant-a-readings"
    assert settings.topics.anomalies == "anomalies"
    assert settings.state_dir == Path("/tmp/flead-state")


def test_to_env_round_trips() -> None:
    settings = load_settings({"FLEAD_TOPICS_ANOMALIES": "a2", "FLEAD_TRAIN_EVERY": "7"})
    assert load_settings(to_env(settings)) == settings


def test_invalid_number_names_the_variable() -> None:
    with pytest.raises(ValueError, match="FLEAD_KAFKA_PARTITIONS"):
        load_settings({"FLEAD_KAFKA_PARTITIONS": "many"})


def test_describe_is_plain_json() -> None:
    described = describe(Settings())
    assert described["topics"]["readings"] == "edge-iiot-stream"
    assert isinstance(described["state_dir"], str)
