"""Tests of the edge-iiot-stream contract in streaming.messages: the Reading shape, the wire form
(single, multichannel, batched), the decoder's limits, and that nothing but InvalidMessage ever
escapes the decoder whatever the bytes."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streaming.messages import (
    DEAD_LETTER_PAYLOAD_CHARS,
    MAGNITUDE_LIMIT,
    MAX_BATCH_READINGS,
    MAX_CHANNEL_NAME_CHARS,
    MAX_CHANNELS,
    MAX_DEVICE_ID_CHARS,
    MAX_PAYLOAD_BYTES,
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP_MS,
    SINGLE_CHANNEL,
    InvalidMessage,
    Reading,
    dead_letter,
    decode_readings,
    encode_reading,
    encode_reading_batch,
    format_timestamp,
    parse_timestamp,
    parse_timestamp_ms,
    reading_to_dict,
    single_reading,
)

T_MS = 1_762_528_951_000  # 2025-11-07T15:22:31.000Z, worked out independently below
READING = single_reading("device_127", T_MS, 42.5, 0)
TS = '"timestamp":"2025-11-07T15:22:31Z"'


def _raises(payload: bytes | str, reason: str) -> InvalidMessage:
    """decode_readings refuses ``payload`` with exactly InvalidMessage and ``reason`` in it."""
    with pytest.raises(Exception) as info:  # the exact type is asserted below
        decode_readings(payload)
    assert type(info.value) is InvalidMessage, repr(info.value)
    assert reason in str(info.value), str(info.value)
    return info.value


# ---------------------------------------------------------------------------- the Reading


def test_reading_shape_and_properties() -> None:
    assert int(datetime(2025, 11, 7, 15, 22, 31, tzinfo=UTC).timestamp()) * 1000 == T_MS
    assert Reading("device_127", T_MS, (42.5,), 0, ("value",)) == READING
    assert READING.channels is SINGLE_CHANNEL and READING.value == 42.5
    assert READING.timestamp == datetime(2025, 11, 7, 15, 22, 31, tzinfo=UTC)
    assert READING.timestamp.tzinfo is not None
    multi = Reading("pump", T_MS + 1, (1.2, 71.5), None, ("pressure", "temp"))
    assert multi.timestamp == datetime(2025, 11, 7, 15, 22, 31, 1000, tzinfo=UTC)
    with pytest.raises(ValueError, match="2 channels"):
        _ = multi.value
    with pytest.raises(AttributeError):
        multi.label = 1  # type: ignore[misc]  # frozen
    assert (
        single_reading("d", 5, 3).values == (3.0,)
        and type(single_reading("d", 5, 3).values[0]) is float
    )


# ---------------------------------------------------------------------------- wire form


def test_single_reading_round_trips_in_the_contract_form() -> None:
    payload = encode_reading(READING)
    assert payload == (
        b'{"device_id":"device_127","timestamp":"2025-11-07T15:22:31.000Z","data":42.5,"label":0}'
    )
    assert decode_readings(payload) == [READING]
    assert decode_readings(payload.decode()) == [READING]  # str payloads too


def test_original_form_without_label_is_accepted() -> None:
    payload = b'{"device_id": "d1", "timestamp": "2025-11-07T15:22:31Z", "data": 3}'
    [reading] = decode_readings(payload)
    assert reading.label is None and reading.value == 3.0 and type(reading.value) is float
    assert decode_readings(payload.replace(b"}", b', "label": null}'))[0].label is None


def test_multichannel_round_trip_sorts_channels() -> None:
    payload = (
        b'{"device_id":"pump_1","timestamp":"2025-11-07T15:22:31.250Z",'
        b'"data":{"temp":71.5,"pressure":1.2,"flow":3},"label":1}'
    )
    [reading] = decode_readings(payload)
    assert reading == Reading(
        "pump_1", T_MS + 250, (3.0, 1.2, 71.5), 1, ("flow", "pressure", "temp")
    )
    assert json.loads(encode_reading(reading)) == {
        "device_id": "pump_1",
        "timestamp": "2025-11-07T15:22:31.250Z",
        "data": {"flow": 3.0, "pressure": 1.2, "temp": 71.5},
        "label": 1,
    }
    assert decode_readings(encode_reading(reading)) == [reading]
    # One channel with a name other than "value" keeps its name on the wire.
    named = Reading("d", T_MS, (2.0,), None, ("temp",))
    assert reading_to_dict(named)["data"] == {"temp": 2.0}
    assert decode_readings(encode_reading(named)) == [named]
    # {"value": x} is the single unnamed channel, the same reading as "data": x.
    [plain] = decode_readings(b'{"device_id":"d",' + TS.encode() + b',"data":{"value":2}}')
    assert plain == single_reading("d", T_MS, 2.0)


def test_batched_form_keeps_order_and_mixes_devices_and_channels() -> None:
    batch = [
        READING,
        single_reading("device_127", T_MS + 10_000, 43.0, 1),
        Reading("pump", T_MS + 5, (1.0, -2.5), None, ("a", "b")),
        single_reading("other", T_MS - 1, -0.0),
    ]
    payload = encode_reading_batch(batch)
    assert json.loads(payload)["readings"][2] == {
        "device_id": "pump",
        "timestamp": "2025-11-07T15:22:31.005Z",
        "data": {"a": 1.0, "b": -2.5},
    }
    assert decode_readings(payload) == batch


def test_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(ValueError):
        encode_reading(single_reading("d", T_MS, math.nan))
    with pytest.raises(ValueError):
        encode_reading(Reading("d", T_MS, (1.0, 2.0), None, SINGLE_CHANNEL))


def test_timestamps_format_and_parse() -> None:
    assert format_timestamp(T_MS + 7) == "2025-11-07T15:22:31.007Z"
    assert format_timestamp(0) == "1970-01-01T00:00:00.000Z"
    aware = datetime.fromisoformat("2025-11-07T17:22:31.123456+02:00")
    assert format_timestamp(aware) == "2025-11-07T15:22:31.123Z"
    assert format_timestamp(datetime(2025, 11, 7, 15, 22, 31)) == "2025-11-07T15:22:31.000Z"
    assert parse_timestamp_ms("2025-11-07T17:22:31.123456+02:00") == T_MS + 123
    assert parse_timestamp_ms("2025-11-07T15:22:31") == T_MS  # naive = UTC
    assert parse_timestamp_ms("2025-11-07 15:22:31.999999Z") == T_MS + 999  # floor
    assert parse_timestamp("2025-11-07T17:22:31.123456+02:00") == datetime(
        2025, 11, 7, 15, 22, 31, 123456, tzinfo=UTC
    )
    offset = "2025-11-07T10:22:31-05:00"
    assert (
        decode_readings(f'{{"device_id":"d","timestamp":"{offset}","data":1}}')[0].timestamp_ms
        == T_MS
    )


def test_limits_are_inclusive_where_documented() -> None:
    def msg(device: str = "d", ts: str = "2025-11-07T15:22:31Z", data: object = 1) -> str:
        return json.dumps({"device_id": device, "timestamp": ts, "data": data})

    assert decode_readings(msg(ts="1970-01-01T00:00:00Z"))[0].timestamp_ms == MIN_TIMESTAMP_MS
    assert decode_readings(msg(ts="2099-12-31T23:59:59.999Z"))[0].timestamp_ms == (
        MAX_TIMESTAMP_MS - 1
    )
    assert int(datetime(2100, 1, 1, tzinfo=UTC).timestamp() * 1000) == MAX_TIMESTAMP_MS
    assert decode_readings(msg(data=MAGNITUDE_LIMIT))[0].value == 1e15
    assert decode_readings(msg(data=-(10**15)))[0].value == -1e15
    assert decode_readings(msg(device="x" * MAX_DEVICE_ID_CHARS))
    assert decode_readings(msg(device="pump ünïcode ☃ 東京"))[0].device_id == "pump ünïcode ☃ 東京"
    wide = {f"c{i:03d}": float(i) for i in range(MAX_CHANNELS)}
    [reading] = decode_readings(msg(data=wide))
    assert reading.channels == tuple(sorted(wide)) and reading.values == tuple(range(256))
    assert decode_readings(msg(data={"n" * MAX_CHANNEL_NAME_CHARS: 1}))
    one = json.loads(msg())
    assert len(decode_readings(json.dumps({"readings": [one] * MAX_BATCH_READINGS}))) == 10_000


# ---------------------------------------------------------------------------- refusals


def _reading_json(**fields: str) -> str:
    base = {"device_id": '"d"', "timestamp": '"2025-11-07T15:22:31Z"', "data": "1"}
    base.update(fields)
    return "{" + ",".join(f'"{k}":{v}' for k, v in base.items()) + "}"


NASTY = [
    # (payload, reason substring)
    (b"not json", "not JSON"),
    (b"", "not JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b'{"device_id":"d\xc3","data":1}', "not UTF-8"),
    ("\ufeff" + _reading_json(), "not JSON"),  # a BOM is not JSON
    (b"[1, 2]", "JSON object"),
    (b'"\\ud800"', "JSON object"),
    (b"null", "JSON object"),
    (_reading_json(data="1" * 400), "magnitude limit"),
    (_reading_json(data="-" + "9" * 400), "magnitude limit"),
    (_reading_json(data="1" * 5000), "not JSON"),  # beyond Python's int digit limit
    (_reading_json(data="1e400"), "finite"),
    (_reading_json(data="-1e400"), "finite"),
    (_reading_json(data="NaN"), "finite"),
    (_reading_json(data="Infinity"), "finite"),
    (_reading_json(data="1e16"), "magnitude limit"),
    (_reading_json(data='"1.5"'), "number"),
    (_reading_json(data="true"), "got true"),
    (_reading_json(data="null"), "data must be a number"),
    (_reading_json(data="[1, 2]"), "data must be a number"),
    (_reading_json(data="{}"), "at least one channel"),
    (_reading_json(data='{"a": true}'), "data['a'] must be a finite number"),
    (_reading_json(data='{"a": 1, "b": NaN}'), "data['b'] must be a finite number"),
    (_reading_json(data='{"a": 1, "b": 1e300}'), "magnitude limit"),
    (_reading_json(data='{"a": 1, "a": 2}'), "more than once"),
    (_reading_json(data='{"temp": 1, "te\\u006dp": 2}'), "more than once"),  # escaped duplicate
    (_reading_json(data='{"": 1}'), "channel name must not be empty"),
    (_reading_json(data='{"a\\u0000": 1}'), "control character"),
    (_reading_json(data='{"\\udfff": 1}'), "lone surrogate"),
    (_reading_json(data='{"' + "n" * 65 + '": 1}'), "longer than 64"),
    (
        _reading_json(data="{" + ",".join(f'"c{i}":1' for i in range(257)) + "}"),
        "more than the limit 256",
    ),
    (_reading_json(device_id="null"), "device_id must be a string"),
    (_reading_json(device_id="7"), "device_id must be a string"),
    (_reading_json(device_id='""'), "device_id must not be empty"),
    (_reading_json(device_id='"a\\u0000b"'), "control character"),
    (_reading_json(device_id='"a\\nb"'), "control character"),
    (_reading_json(device_id='"a\\u0085b"'), "control character"),  # C1 control
    (_reading_json(device_id='"\\ud800"'), "lone surrogate"),
    (_reading_json(device_id='"ok\\udc00"'), "lone surrogate"),
    (_reading_json(device_id='"' + "x" * 129 + '"'), "longer than 128"),
    (_reading_json(timestamp='"0001-01-01T00:00:00+01:00"'), "plausible window"),
    (_reading_json(timestamp='"9999-12-31T23:59:59-23:59"'), "plausible window"),
    (_reading_json(timestamp='"1969-12-31T23:59:59.999Z"'), "plausible window"),
    (_reading_json(timestamp='"2100-01-01T00:00:00Z"'), "plausible window"),
    (_reading_json(timestamp='"yesterday"'), "ISO 8601"),
    (_reading_json(timestamp='"2025-11-07T15:22:31z"'), "ISO 8601"),
    (_reading_json(timestamp="1762528951000"), "ISO 8601 string"),
    (_reading_json(timestamp="null"), "ISO 8601 string"),
    (_reading_json(label="3"), "label"),
    (_reading_json(label="true"), "label"),
    (_reading_json(label="1.0"), "label"),
    (_reading_json(label='"1"'), "label"),
    ("[" * 10_000 + "]" * 10_000, "nested too deeply"),
    ('{"readings":' + "[" * 10_000 + "]" * 10_000 + "}", "nested too deeply"),
    (_reading_json(extra="[" * 5000 + "]" * 5000), "nested too deeply"),
    ('{"readings":' + '{"a":' * 10_000 + "1" + "}" * 10_001, "nested too deeply"),
    (_reading_json(data='{"a":' * 10_000 + "1" + "}" * 10_000), "nested too deeply"),
    (b'{"readings": []}', "non-empty"),
    (b'{"readings": {}}', "non-empty list"),
    (b'{"readings": [1]}', "readings[0]: a reading must be a JSON object"),
    (
        '{"readings": [' + _reading_json() + "," + _reading_json(label="2") + "]}",
        "readings[1]: label",
    ),
    (
        '{"readings": [' + ",".join([_reading_json()] * (MAX_BATCH_READINGS + 1)) + "]}",
        "limit 10000",
    ),
    (b" " * (MAX_PAYLOAD_BYTES + 1), "larger than the limit"),
    (" " * (MAX_PAYLOAD_BYTES + 1), "larger than the limit"),
    ("é" * (MAX_PAYLOAD_BYTES // 2 + 1), "larger than the limit"),  # str: counted in UTF-8 bytes
]


@pytest.mark.parametrize(("payload", "reason"), NASTY, ids=[f"nasty{i}" for i in range(len(NASTY))])
def test_nasty_payloads_are_refused_with_a_reason(payload: bytes | str, reason: str) -> None:
    error = _raises(payload, reason)
    assert len(str(error)) < 400  # a reason, not a copy of the payload


def test_odd_payload_types_are_refused_not_crashed() -> None:
    assert decode_readings(bytearray(encode_reading(READING))) == [READING]
    assert decode_readings(memoryview(encode_reading(READING))) == [READING]
    _raises(None, "bytes or str")  # type: ignore[arg-type]
    _raises(12, "bytes or str")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- dead letters


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe\x00",
        b"\xed\xa0\x80",
        "\ud800 lone",
        None,
        b"",
        b"x" * (DEAD_LETTER_PAYLOAD_CHARS * 5),
    ],
)
def test_dead_letter_never_raises_and_keeps_its_shape(payload: bytes | str | None) -> None:
    record = json.loads(
        dead_letter("edge-iiot-stream", payload, "reason \udc80 here").decode("utf-8")
    )
    assert {"source_topic", "reason", "payload", "timestamp"} <= set(record)
    assert record["source_topic"] == "edge-iiot-stream" and record["reason"].startswith("reason ")
    if payload is None:
        assert record["payload"] is None
    else:
        assert len(record["payload"]) <= DEAD_LETTER_PAYLOAD_CHARS
        record["payload"].encode("utf-8")  # raises if a lone surrogate were left
    if isinstance(payload, bytes) and len(payload) > DEAD_LETTER_PAYLOAD_CHARS:
        assert record["payload_truncated"] is True
    assert datetime.fromisoformat(record["timestamp"]).tzinfo is not None


def test_dead_letter_keeps_a_readable_payload_verbatim() -> None:
    raw = b'{"device_id": "d", "data": "oops \xc3\xa9"}'
    record = json.loads(dead_letter("t", raw, "why"))
    assert record == {
        "source_topic": "t",
        "reason": "why",
        "payload": raw.decode(),
        "timestamp": record["timestamp"],
    }
    bad = json.loads(dead_letter("t", b"ab\xffcd", "why"))
    assert bad["payload"] == "ab\ufffdcd"


# ---------------------------------------------------------------------------- properties


def _check_valid(readings: list[Reading]) -> None:
    """The invariants every decoded reading holds (an oracle written from the contract)."""
    assert isinstance(readings, list) and 1 <= len(readings) <= MAX_BATCH_READINGS
    for r in readings:
        assert type(r) is Reading
        assert isinstance(r.device_id, str) and 1 <= len(r.device_id) <= MAX_DEVICE_ID_CHARS
        assert r.device_id.encode("utf-8")  # no lone surrogates
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in r.device_id)
        assert type(r.timestamp_ms) is int and MIN_TIMESTAMP_MS <= r.timestamp_ms < MAX_TIMESTAMP_MS
        assert list(r.channels) == sorted(set(r.channels)) and 1 <= len(r.channels) <= MAX_CHANNELS
        assert len(r.values) == len(r.channels)
        assert all(
            type(v) is float and math.isfinite(v) and abs(v) <= MAGNITUDE_LIMIT for v in r.values
        )
        assert r.label in (None, 0, 1) and type(r.label) is not bool


def _decode_or_refuse(payload: bytes | str) -> list[Reading] | None:
    try:
        readings = decode_readings(payload)
    except InvalidMessage as exc:
        assert type(exc) is InvalidMessage and str(exc)
        return None
    _check_valid(readings)
    return readings


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
timestamps = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.none() | st.timezones(),
).map(lambda d: d.isoformat())
reading_like = st.fixed_dictionaries(
    {
        "device_id": st.text(max_size=140) | json_values,
        "timestamp": timestamps | json_values,
        "data": json_scalars | st.dictionaries(st.text(max_size=70), json_scalars, max_size=6),
    },
    optional={"label": st.sampled_from([0, 1, None, True, 2, 1.0, "1"])},
)
message_like = reading_like | st.fixed_dictionaries(
    {"readings": st.lists(reading_like | json_values, max_size=5)}
)


@PROPERTY
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_are_refused(payload: bytes) -> None:
    _decode_or_refuse(payload)


@PROPERTY
@given(json_values | message_like)
def test_any_json_value_decodes_or_is_refused(value: object) -> None:
    text = json.dumps(value)  # NaN/Infinity literals and escaped lone surrogates included
    result = _decode_or_refuse(text.encode())
    assert _decode_or_refuse(text) == result  # bytes and str payloads agree


@PROPERTY
@given(message_like, st.integers(min_value=0, max_value=10_000), st.binary(min_size=1, max_size=3))
def test_corrupted_messages_decode_or_are_refused(value: dict, at: int, junk: bytes) -> None:
    raw = json.dumps(value).encode()
    at %= len(raw) + 1
    _decode_or_refuse(raw[:at] + junk + raw[at:])
    _decode_or_refuse(raw[:at])


names = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=MAX_CHANNEL_NAME_CHARS
)
finite = st.floats(min_value=-MAGNITUDE_LIMIT, max_value=MAGNITUDE_LIMIT, allow_nan=False)
valid_readings = st.builds(
    lambda device, ms, data, label: Reading(
        device, ms, tuple(data[k] for k in sorted(data)), label, tuple(sorted(data))
    ),
    names,
    st.integers(min_value=MIN_TIMESTAMP_MS, max_value=MAX_TIMESTAMP_MS - 1),
    st.dictionaries(names, finite, min_size=1, max_size=8),
    st.sampled_from([None, 0, 1]),
)


@PROPERTY
@given(st.lists(valid_readings, min_size=1, max_size=6))
def test_valid_readings_round_trip(readings: list[Reading]) -> None:
    assert decode_readings(encode_reading_batch(readings)) == readings
    assert [decode_readings(encode_reading(r))[0] for r in readings] == readings


@PROPERTY
@given(
    st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(2099, 12, 30),
        timezones=st.just(UTC)
        | st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m))),
    )
)
def test_timestamp_ms_agrees_with_datetime_arithmetic(ts: datetime) -> None:
    expected = (ts.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    assert parse_timestamp_ms(ts.isoformat()) == expected
    assert format_timestamp(expected) == ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{ts.microsecond // 1000:03d}Z"
    )
