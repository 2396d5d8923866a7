from datetime import UTC, datetime

import pytest

from streaming.messages import (
    InvalidMessage,
    Reading,
    decode_readings,
    encode_reading,
    encode_reading_batch,
    format_timestamp,
)

READING = Reading("device_127", datetime(2025, 11, 7, 15, 22, 31, tzinfo=UTC), 42.5, 0)


def test_reading_round_trips_in_the_contract_form() -> None:
    payload = encode_reading(READING)
    assert payload == (
        b'{"device_id":"device_127","timestamp":"2025-11-07T15:22:31.000Z","data":42.5,"label":0}'
    )
    assert decode_readings(payload) == [READING]


def test_original_form_without_label_is_accepted() -> None:
    payload = b'{"device_id": "d1", "timestamp": "2025-11-07T15:22:31Z", "data": 3}'
    [reading] = decode_readings(payload)
    assert reading.label is None and reading.value == 3.0


def test_batched_form_keeps_order() -> None:
    later = Reading("device_127", datetime(2025, 11, 7, 15, 22, 41, tzinfo=UTC), 43.0, 1)
    assert decode_readings(encode_reading_batch([READING, later])) == [READING, later]


def test_timestamp_keeps_milliseconds_and_converts_to_utc() -> None:
    ts = datetime.fromisoformat("2025-11-07T17:22:31.123456+02:00")
    assert format_timestamp(ts) == "2025-11-07T15:22:31.123Z"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"timestamp": "2025-11-07T15:22:31Z", "data": 1}', "device_id"),
        (b'{"device_id": "d", "timestamp": "yesterday", "data": 1}', "ISO 8601"),
        (b'{"device_id": "d", "timestamp": "2025-11-07T15:22:31Z", "data": "1.5"}', "finite"),
        (b'{"device_id": "d", "timestamp": "2025-11-07T15:22:31Z", "data": NaN}', "finite"),
        (
            b'{"device_id": "d", "timestamp": "2025-11-07T15:22:31Z", "data": 1, "label": 3}',
            "label",
        ),
        (b'{"readings": []}', "non-empty"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_invalid_messages_say_why(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        decode_readings(payload)
