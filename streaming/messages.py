"""The message contracts of DESIGN §2: one module that encodes and validates every topic's JSON.

Producers call ``encode_*``; consumers call ``decode_*``, which raise :class:`InvalidMessage`
with a human-readable reason that goes to the dead-letter topic.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import orjson

from streaming.learner import Anomaly, GlobalParams, LocalRound
from streaming.model.detectors import LOGIT_EDGES, NORMAL_EDGES, Network, NormalStats
from streaming.model.features import N_FEATURES, N_POOLED
from streaming.model.metrics import Confusion


class InvalidMessage(ValueError):
    """A message that does not follow its topic's contract; ``str(exc)`` is the reason."""


# --- edge-iiot-stream: readings ---------------------------------------------------------------

#: The channel names of a univariate reading: one unnamed channel, ``"data": <number>`` on the wire.
SINGLE_CHANNEL: tuple[str, ...] = ("value",)

# Limits of the readings contract. The decoder runs on whatever reaches the topic, so every
# dimension of a message is bounded: a hostile or broken producer costs one dead letter, never
# the consumer's memory, time or numerical sanity.

#: Largest message accepted (UTF-8 bytes). Kafka's default is 1 MB; 8 MiB leaves room for a
#: broker configured larger while bounding what one message makes json allocate (its objects
#: take several times the text's size).
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024
#: Most readings in one batched message. The replay sends 50; 10,000 keeps one message's work
#: and memory small for a consumer that decodes it in one call.
MAX_BATCH_READINGS = 10_000
#: Most channels in one reading: more than any sensor has, few enough that a reading stays small.
MAX_CHANNELS = 256
#: Longest device id (characters): ids become Kafka keys, table keys and dashboard labels.
MAX_DEVICE_ID_CHARS = 128
#: Longest channel name (characters): names become feature and column labels.
MAX_CHANNEL_NAME_CHARS = 64
#: Largest |value| accepted. Real measurements are far below it (a pressure in Pa is ~1e5-1e7);
#: beyond it a number is almost surely a unit or encoding error, float64 no longer holds every
#: integer (2**53 ≈ 9e15), and squares in the running statistics (up to 1e30) stay far from
#: overflow. It also refuses integers too large for a float: json parses a 400-digit integer
#: without complaint and ``float()`` of it would raise OverflowError.
MAGNITUDE_LIMIT = 1e15
#: Plausible event times, epoch milliseconds in [MIN, MAX): 1970-01-01 up to 2100-01-01 UTC.
#: Anything else is a broken clock or unit (seconds for ms) and would wreck event-time windows;
#: it also keeps every accepted time convertible to a datetime without overflow.
MIN_TIMESTAMP_MS = 0
MAX_TIMESTAMP_MS = 4_102_444_800_000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_fromisoformat = datetime.fromisoformat
_EPOCH_NAIVE = datetime(1970, 1, 1)
_MS = timedelta(milliseconds=1)
_US = timedelta(microseconds=1)
# Characters a name may not contain: C0 and C1 control characters (NUL included) and lone
# surrogates (they cannot be encoded as UTF-8, so they would break every consumer downstream).
_BAD_NAME_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class Reading(NamedTuple):
    """One reading of one device: a value per channel at one event time.

    ``channels`` are sorted names, ``values`` follow their order. ``SINGLE_CHANNEL``
    (``("value",)``) is the univariate case, a plain number on the wire. The constructor does not
    validate: the decoder and the loaders do, and the hot path builds ~100k readings per second
    (a named tuple: a third of a frozen dataclass's construction, which sets each field through
    ``object.__setattr__``).
    """

    device_id: str
    timestamp_ms: int  # epoch milliseconds, UTC (no datetime on the hot path)
    values: tuple[float, ...]  # one per channel, in the order of `channels`
    label: int | None = None  # 1 = anomaly, 0 = normal, None = unlabelled
    channels: tuple[str, ...] = SINGLE_CHANNEL  # sorted; ("value",) = one unnamed channel

    @property
    def timestamp(self) -> datetime:
        """The event time as a timezone-aware UTC datetime."""
        return _EPOCH + timedelta(milliseconds=self.timestamp_ms)

    @property
    def value(self) -> float:
        """The value of a one-channel reading; ValueError if it has several channels."""
        if len(self.values) != 1:
            raise ValueError(
                f"reading of {self.device_id!r} has {len(self.values)} channels "
                f"{self.channels}: use .values"
            )
        return self.values[0]


_tuple_new = tuple.__new__  # a Reading of its fields in order, without __new__'s argument parsing


def single_reading(
    device_id: str, timestamp_ms: int, value: float, label: int | None = None
) -> Reading:
    """A univariate reading (channels ``("value",)``)."""
    return Reading(device_id, timestamp_ms, (float(value),), label)


def epoch_ms(ts: datetime) -> int:
    """Epoch milliseconds (floor) of a datetime; a naive datetime is UTC by convention."""
    if ts.tzinfo is None:
        return (ts - _EPOCH_NAIVE) // _MS
    return (ts - _EPOCH) // _MS


def format_timestamp(ts: int | datetime) -> str:
    """ISO 8601 UTC with milliseconds and a ``Z``: ``2025-11-07T15:22:31.000Z``.

    Takes epoch milliseconds, or a datetime (naive = UTC; sub-millisecond digits are dropped).
    """
    if isinstance(ts, datetime):
        if ts.tzinfo is not None:
            ts = ts.astimezone(UTC).replace(tzinfo=None)
    else:
        ts = _EPOCH_NAIVE + timedelta(milliseconds=ts)
    return ts.isoformat(timespec="milliseconds") + "Z"


def _describe(value: Any) -> str:
    """A short, safe description of a JSON value for a reason (never a huge or nested repr)."""
    if value is None:
        return "null (or nothing)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if -(10**20) < value < 10**20:
            return repr(value)
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, list):
        return f"a JSON array of {len(value)} item(s)"
    if isinstance(value, dict):
        return "a JSON object"
    return type(value).__name__


def _parse_datetime(raw: Any) -> datetime:
    if type(raw) is not str:
        raise InvalidMessage(f"timestamp must be an ISO 8601 string, got {_describe(raw)}")
    try:
        return datetime.fromisoformat(raw)
    except (ValueError, TypeError) as exc:
        raise InvalidMessage(f"timestamp {_describe(raw)} is not ISO 8601") from exc


def _window_error(raw: Any) -> InvalidMessage:
    return InvalidMessage(
        f"timestamp {_describe(raw)} is outside the plausible window [1970-01-01, 2100-01-01)"
    )


def parse_timestamp_ms(raw: Any) -> int:
    """Epoch milliseconds (floor) of an ISO 8601 string (``Z`` or offset; naive = UTC) within
    [1970-01-01, 2100-01-01); anything else raises InvalidMessage."""
    ts = _parse_datetime(raw)
    try:
        ms = epoch_ms(ts)
    except (OverflowError, ValueError) as exc:  # not reachable with fixed offsets; belt and braces
        raise _window_error(raw) from exc
    if not MIN_TIMESTAMP_MS <= ms < MAX_TIMESTAMP_MS:
        raise _window_error(raw)
    return ms


def parse_timestamp(raw: Any) -> datetime:
    """Like :func:`parse_timestamp_ms` but a timezone-aware UTC datetime (microseconds kept)."""
    ts = _parse_datetime(raw)
    try:
        us = (ts - (_EPOCH_NAIVE if ts.tzinfo is None else _EPOCH)) // _US
    except (OverflowError, ValueError) as exc:
        raise _window_error(raw) from exc
    if not MIN_TIMESTAMP_MS * 1000 <= us < MAX_TIMESTAMP_MS * 1000:
        raise _window_error(raw)
    return _EPOCH + timedelta(microseconds=us)


def name_problem(name: Any, what: str, max_chars: int) -> str | None:
    """Why ``name`` is not a valid device id or channel name, or None if it is: a non-empty
    string of at most ``max_chars`` characters without control characters or lone surrogates."""
    if type(name) is not str:
        return f"{what} must be a string, got {_describe(name)}"
    if not name:
        return f"{what} must not be empty"
    if len(name) > max_chars:
        return f"{what} is longer than {max_chars} characters ({len(name)})"
    if not (name.isascii() and name.isprintable()) and _BAD_NAME_CHARS.search(name):
        return f"{what} {_describe(name)} contains a control character or a lone surrogate"
    return None


def value_problem(value: Any, what: str) -> str | None:
    """Why ``value`` is not a valid channel value (a finite int/float, not a bool, with
    |value| <= MAGNITUDE_LIMIT), or None if it is."""
    kind = type(value)
    if (kind is float or kind is int) and -MAGNITUDE_LIMIT <= value <= MAGNITUDE_LIMIT:
        return None  # NaN fails the comparison, so it lands below with the infinities
    if kind is float or kind is int:
        if kind is float and not math.isfinite(value):
            return f"{what} must be a finite number, got {_describe(value)}"
        return f"{what} {_describe(value)} is beyond the magnitude limit {MAGNITUDE_LIMIT:g}"
    return f"{what} must be a finite number, got {_describe(value)}"


class _DuplicateKeys(dict):
    """A JSON object that repeated a key (``json`` would silently keep the last value)."""

    duplicate: str = ""


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    flagged = _DuplicateKeys(obj)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            flagged.duplicate = key
            break
        seen.add(key)
    return flagged


class _NeedPairs(Exception):
    """Internal: a multichannel reading needs the duplicate-checking parse."""


# Validated channel tuples, so a fleet's repeated channel sets are checked once and shared
# (one tuple object per set rather than one per reading). Bounded: cleared when full.
_KNOWN_CHANNELS: dict[tuple[str, ...], tuple[str, ...]] = {SINGLE_CHANNEL: SINGLE_CHANNEL}
_KNOWN_CHANNELS_MAX = 4096


def _channels(data: dict[str, Any]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    if not data:
        raise InvalidMessage("data must be a number or an object with at least one channel")
    if len(data) > MAX_CHANNELS:
        raise InvalidMessage(f"data has {len(data)} channels, more than the limit {MAX_CHANNELS}")
    if type(data) is _DuplicateKeys:
        raise InvalidMessage(f"data names channel {_describe(data.duplicate)} more than once")
    names = tuple(sorted(data))
    known = _KNOWN_CHANNELS.get(names)
    if known is None:
        for name in names:
            problem = name_problem(name, "channel name", MAX_CHANNEL_NAME_CHARS)
            if problem:
                raise InvalidMessage(problem)
        if len(_KNOWN_CHANNELS) >= _KNOWN_CHANNELS_MAX:
            _KNOWN_CHANNELS.clear()
            _KNOWN_CHANNELS[SINGLE_CHANNEL] = SINGLE_CHANNEL
        known = _KNOWN_CHANNELS[names] = names
    values = [data[name] for name in names]
    for value in values:
        kind = type(value)
        if not ((kind is float or kind is int) and -MAGNITUDE_LIMIT <= value <= MAGNITUDE_LIMIT):
            name = names[values.index(value)]
            raise InvalidMessage(value_problem(value, f"data[{_describe(name)}]"))
    return known, tuple([float(value) for value in values])


def _reading_from_dict(obj: Any, pairs_checked: bool = True) -> Reading:
    """One reading object -> Reading. ``pairs_checked``: objects were parsed with the duplicate
    key check (otherwise a multichannel ``data`` raises _NeedPairs for a re-parse)."""
    if not isinstance(obj, dict):
        raise InvalidMessage(f"a reading must be a JSON object, got {_describe(obj)}")
    device_id = obj.get("device_id")
    if (
        type(device_id) is not str
        or not device_id
        or len(device_id) > MAX_DEVICE_ID_CHARS
        or not (device_id.isascii() and device_id.isprintable())
    ):
        problem = name_problem(device_id, "device_id", MAX_DEVICE_ID_CHARS)
        if problem:
            raise InvalidMessage(problem)
    raw_ts = obj.get("timestamp")
    try:  # the fast path: an aware ISO 8601 string (the contract writes "...Z")
        timestamp_ms = (_fromisoformat(raw_ts) - _EPOCH) // _MS  # floor, like epoch_ms
    except (TypeError, ValueError):  # naive (UTC by convention), or not a timestamp at all
        timestamp_ms = parse_timestamp_ms(raw_ts)
    else:
        if not MIN_TIMESTAMP_MS <= timestamp_ms < MAX_TIMESTAMP_MS:
            raise _window_error(raw_ts)
    data = obj.get("data")
    kind = type(data)
    if kind is float or kind is int:
        if not -MAGNITUDE_LIMIT <= data <= MAGNITUDE_LIMIT:
            raise InvalidMessage(value_problem(data, "data"))
        channels, values = SINGLE_CHANNEL, (data if kind is float else float(data),)
    elif kind is dict or kind is _DuplicateKeys:
        if not pairs_checked:
            raise _NeedPairs
        channels, values = _channels(data)
    else:
        raise InvalidMessage(
            f"data must be a number or an object of named numbers, got {_describe(data)}"
        )
    label = obj.get("label")
    if label is not None and (type(label) is not int or (label != 0 and label != 1)):
        raise InvalidMessage(f"label must be 0, 1, null or absent, got {_describe(label)}")
    return _tuple_new(Reading, (device_id, timestamp_ms, values, label, channels))


def reading_to_dict(reading: Reading) -> dict[str, Any]:
    """The wire form: ``"data"`` is a number for ``SINGLE_CHANNEL``, else ``{name: value}``."""
    channels, values = reading.channels, reading.values
    if channels == SINGLE_CHANNEL:
        if len(values) != 1:
            raise ValueError(f"a single-channel reading needs one value, got {len(values)}")
        data: Any = values[0]
    else:
        data = dict(zip(channels, values, strict=True))
    message: dict[str, Any] = {
        "device_id": reading.device_id,
        "timestamp": format_timestamp(reading.timestamp_ms),
        "data": data,
    }
    if reading.label is not None:
        message["label"] = reading.label
    return message


def encode_reading(reading: Reading) -> bytes:
    """One reading, the original single-reading form. ValueError for a non-finite value."""
    return json.dumps(reading_to_dict(reading), separators=(",", ":"), allow_nan=False).encode()


def encode_reading_batch(readings: list[Reading]) -> bytes:
    """The batched form: ``{"readings": [<reading>, ...]}``; any mix of devices and channels."""
    return json.dumps(
        {"readings": [reading_to_dict(r) for r in readings]},
        separators=(",", ":"),
        allow_nan=False,
    ).encode()


def _payload_text(payload: Any) -> str:
    if isinstance(payload, str):
        size = len(payload)
        if MAX_PAYLOAD_BYTES // 4 < size <= MAX_PAYLOAD_BYTES:  # exact count only when it matters
            size = len(payload.encode("utf-8", "surrogatepass"))
        if size > MAX_PAYLOAD_BYTES:
            raise InvalidMessage(f"message larger than the limit of {MAX_PAYLOAD_BYTES} bytes")
        return payload
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise InvalidMessage(f"payload must be bytes or str, got {type(payload).__name__}")
    if len(payload) > MAX_PAYLOAD_BYTES:  # memoryview: len is items, bytes for the usual format
        raise InvalidMessage(
            f"message of {len(payload)} bytes is larger than the limit of {MAX_PAYLOAD_BYTES}"
        )
    try:
        return bytes(payload).decode("utf-8") if type(payload) is not bytes else payload.decode()
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"not UTF-8: invalid byte at position {exc.start}") from None


def _readings_from(obj: Any, pairs_checked: bool) -> list[Reading]:
    if not isinstance(obj, dict):
        raise InvalidMessage(
            'a message must be a JSON object (a reading or {"readings": [...]}), '
            f"got {_describe(obj)}"
        )
    if "readings" not in obj:
        return [_reading_from_dict(obj, pairs_checked)]
    batch = obj["readings"]
    if type(batch) is not list or not batch:
        raise InvalidMessage(f"readings must be a non-empty list, got {_describe(batch)}")
    if len(batch) > MAX_BATCH_READINGS:
        raise InvalidMessage(
            f"a batch of {len(batch)} readings is more than the limit {MAX_BATCH_READINGS}"
        )
    out = []
    for i, item in enumerate(batch):
        try:
            out.append(_reading_from_dict(item, pairs_checked))
        except InvalidMessage as exc:
            raise InvalidMessage(f"readings[{i}]: {exc}") from None
    return out


def _parsed(text: str) -> Any:
    """``json.loads(text)``, through orjson (a third of the time) where orjson reads it. What
    orjson refuses goes to json, which reads it (NaN, Infinity, lone surrogates, numbers beyond
    float64: the validation names their problem) or says what is wrong in its own words. The
    one difference left, an integer beyond 64 bits read as a float, is refused all the same:
    it exceeds every limit a field has."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _decode_readings(payload: Any) -> list[Reading]:
    text = _payload_text(payload)
    # Duplicate keys must be visible in a multichannel "data" object, so that a channel named
    # twice is refused rather than silently reduced to its last value; that takes a slower
    # parse (a hook per object). Single-channel messages, the bulk of the stream, have one
    # object per reading plus the batch wrapper, and skip it; if the brace count misleads
    # (a brace inside a string, an escaped key), the first pass finds the multichannel reading
    # and the message is parsed again with the check.
    checked = text.count("{") > text.count('"device_id"') + 1
    try:
        obj = json.loads(text, object_pairs_hook=_pairs_hook) if checked else _parsed(text)
    except RecursionError:
        raise InvalidMessage("not JSON this decoder accepts: nested too deeply") from None
    except ValueError as exc:
        raise InvalidMessage(f"not JSON: {exc}") from None
    try:
        return _readings_from(obj, pairs_checked=checked)
    except _NeedPairs:
        return _readings_from(json.loads(text, object_pairs_hook=_pairs_hook), pairs_checked=True)


def decode_readings(payload: bytes | str) -> list[Reading]:
    """One message of ``edge-iiot-stream``: a single reading or the batched form.

    Whatever the input, the result is a list of valid Readings or an :class:`InvalidMessage`
    with the reason; no other exception escapes (see the limits above for what is refused).
    """
    try:
        return _decode_readings(payload)
    except InvalidMessage:
        raise
    except RecursionError:
        raise InvalidMessage("not JSON this decoder accepts: nested too deeply") from None
    except MemoryError:
        raise InvalidMessage("message too large to decode") from None
    except (ArithmeticError, LookupError, TypeError, ValueError) as exc:
        raise InvalidMessage(f"malformed reading ({type(exc).__name__}: {exc})"[:300]) from None


#: Longest raw payload a dead letter keeps (characters): a dead letter must itself fit in a
#: Kafka message (1 MB by default) even when every character is escaped as ``\uXXXX``.
DEAD_LETTER_PAYLOAD_CHARS = 100_000
_DEAD_LETTER_REASON_CHARS = 2_000


def _clean_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, lone surrogates replaced (valid UTF-8 JSON)."""
    text = text[:limit]
    if not text.isascii():
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def dead_letter(topic: str, payload: bytes | str | None, reason: str) -> bytes:
    """The dead-letter record: where it came from, why it was refused, and the raw payload.

    Never raises: invalid UTF-8 becomes replacement characters, and a payload longer than
    ``DEAD_LETTER_PAYLOAD_CHARS`` is cut (``payload_truncated`` then says so).
    """
    raw: str | None
    cut = False
    if payload is None:
        raw = None
    elif isinstance(payload, str):
        raw = payload
    elif isinstance(payload, bytes | bytearray | memoryview):
        head = bytes(payload[: DEAD_LETTER_PAYLOAD_CHARS * 4 + 1])
        cut = len(head) > DEAD_LETTER_PAYLOAD_CHARS * 4
        raw = head[: DEAD_LETTER_PAYLOAD_CHARS * 4].decode("utf-8", errors="replace")
    else:
        raw = repr(payload)
    record: dict[str, Any] = {
        "source_topic": _clean_text(str(topic), 1_000),
        "reason": _clean_text(str(reason), _DEAD_LETTER_REASON_CHARS),
        "payload": None if raw is None else _clean_text(raw, DEAD_LETTER_PAYLOAD_CHARS),
        "timestamp": format_timestamp(datetime.now(UTC)),
    }
    if cut or (raw is not None and len(raw) > DEAD_LETTER_PAYLOAD_CHARS):
        record["payload_truncated"] = True
    return json.dumps(record).encode()


# --- local-model-updates, global-model-updates of the first model ---------------------------


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _loads_object(payload: bytes | str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidMessage(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidMessage("a message must be a JSON object")
    return obj


def _number(obj: dict[str, Any], name: str, *, optional: bool = False) -> float | None:
    value = obj.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidMessage(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _count(obj: dict[str, Any], name: str, minimum: int = 0) -> int:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidMessage(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _text(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidMessage(f"{name} must be a non-empty string")
    return value


def _weights(obj: dict[str, Any]) -> tuple[float, ...]:
    weights = obj.get("weights")
    if not isinstance(weights, list) or not weights:
        raise InvalidMessage("weights must be a non-empty list of numbers")
    return tuple(_number({"weights[]": w}, "weights[]") for w in weights)


# --- the learner's contracts: local rounds and global versions (detection models) ------------
#
# ``local-model-updates`` carries a device's round (network parameters, the statistics of its
# normal rows, the score histograms and prequential counts of the version it was using);
# ``global-model-updates`` carries a version (parameters, calibrated thresholds, the fleet's
# normal model). Arrays travel as flat JSON lists, but for co-moment matrices (base64 of their
# upper triangle); every decoder checks shapes and bounds and raises only InvalidMessage,
# whatever the bytes.

MAX_PARAMETERS = 100_000
"""Longest parameter or statistics list accepted (the default network has 321 parameters)."""
PARAMETER_LIMIT = 1e6
"""|parameter| beyond this is refused: no honest round gets there from bounded features."""
STATISTICS_LIMIT = 1e15
"""Bound of the normal model's count and co-moments: sums that grow with the rows summarised."""
MAX_VERSION = 2**31 - 1
"""Versions and rounds are PostgreSQL integers."""


def _floats(
    obj: dict[str, Any], name: str, size: int | None = None, limit: float = PARAMETER_LIMIT
) -> np.ndarray:
    values = obj.get(name)
    if type(values) is not list or not values or len(values) > MAX_PARAMETERS:
        raise InvalidMessage(f"{name} must be a non-empty list of at most {MAX_PARAMETERS} numbers")
    if size is not None and len(values) != size:
        raise InvalidMessage(f"{name} must have {size} numbers, got {len(values)}")
    for v in values:
        if type(v) not in (int, float) or not -limit <= v <= limit:
            raise InvalidMessage(f"{name} holds {_describe(v)}: not a number within ±{limit:g}")
    return np.asarray(values, dtype=np.float64)


def _counts(obj: dict[str, Any], name: str, size: int) -> np.ndarray:
    values = obj.get(name)
    if type(values) is not list or len(values) != size:
        raise InvalidMessage(f"{name} must be a list of {size} counts")
    for v in values:
        if type(v) not in (int, float) or not 0 <= v <= 1e12:
            raise InvalidMessage(f"{name} holds {_describe(v)}: not a count")
    return np.asarray(values, dtype=np.float64)


def _optional_counts(obj: dict[str, Any], name: str, size: int) -> np.ndarray:
    """Counts added to the contract later: absent (an older learner's message) means zeros."""
    return _counts(obj, name, size) if name in obj else np.zeros(size)


def _integer(obj: dict[str, Any], name: str, minimum: int = 0, maximum: int = MAX_VERSION) -> int:
    value = obj.get(name)
    if type(value) is not int or not minimum <= value <= maximum:
        raise InvalidMessage(
            f"{name} must be an integer in [{minimum}, {maximum}], got {_describe(value)}"
        )
    return value


def _finite(obj: dict[str, Any], name: str, optional: bool = False) -> float | None:
    value = obj.get(name)
    if value is None and optional:
        return None
    if type(value) not in (int, float) or not -PARAMETER_LIMIT <= value <= PARAMETER_LIMIT:
        raise InvalidMessage(
            f"{name} must be a number within ±{PARAMETER_LIMIT:g}, got {_describe(value)}"
        )
    return float(value)


def _choice(obj: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    value = obj.get(name)
    if value not in allowed or type(value) is not str:
        raise InvalidMessage(f"{name} must be one of {', '.join(allowed)}, got {_describe(value)}")
    return value


def _guarded(decode):
    """Run a decoder so that nothing but InvalidMessage can escape, whatever the payload."""

    extra_args = decode.__code__.co_argcount - 1  # e.g. the signing key

    def wrapper(payload: bytes | str, *args: Any):
        if len(args) != extra_args:  # a caller's mistake must not pass for a bad message
            raise TypeError(f"{decode.__name__} takes the payload and {extra_args} argument(s)")
        try:
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise InvalidMessage(f"message larger than {MAX_PAYLOAD_BYTES} bytes")
            return decode(_loads_object(payload), *args)
        except InvalidMessage:
            raise
        except (RecursionError, ValueError, TypeError, OverflowError, KeyError, MemoryError) as exc:
            raise InvalidMessage(f"malformed message: {type(exc).__name__}: {exc}"[:500]) from exc

    wrapper.__doc__ = decode.__doc__
    return wrapper


def _normal_dict(stats: NormalStats) -> dict[str, Any]:
    """``comoment`` as the base64 of its upper triangle (see :func:`_comoment_from`)."""
    upper = np.ascontiguousarray(stats.comoment[np.triu_indices(stats.mean.size)], "<f8")
    return {
        "count": float(stats.count),
        "mean": stats.mean.tolist(),
        "comoment": base64.b64encode(upper.tobytes()).decode("ascii"),
    }


def symmetric(stats: NormalStats) -> NormalStats:
    """``stats`` with an exactly symmetric co-moment matrix: what its upper triangle, the part
    that travels, stands for (a version is signed as devices will decode it)."""
    m = stats.comoment
    return NormalStats(stats.count, stats.mean, (m + m.T) * 0.5)


def _comoment_from(obj: dict[str, Any], name: str, f: int) -> np.ndarray:
    """The F×F co-moment matrix: a base64 string of its upper triangle (diagonal included, row
    by row, little-endian float64: a fifth of the bytes of the full matrix as JSON numbers),
    or, from an older learner or service, the full matrix as a flat list."""
    value = obj.get("comoment")
    if type(value) is list:
        return _floats(obj, "comoment", f * f, STATISTICS_LIMIT).reshape(f, f)
    size = f * (f + 1) // 2
    if type(value) is not str or len(value) != 4 * ((8 * size + 2) // 3):
        raise InvalidMessage(
            f"{name}.comoment must be the base64 of {size} float64 (the upper triangle of a"
            f" {f}×{f} matrix) or a list of {f * f} numbers, got {_describe(value)}"
        )
    try:
        upper = np.frombuffer(base64.b64decode(value, validate=True), "<f8").astype(np.float64)
    except (binascii.Error, ValueError):
        raise InvalidMessage(f"{name}.comoment is not valid base64") from None
    if upper.size != size or not np.all(np.abs(upper) <= STATISTICS_LIMIT):
        raise InvalidMessage(
            f"{name}.comoment must hold {size} finite numbers within ±{STATISTICS_LIMIT:g}"
        )
    matrix = np.zeros((f, f))
    rows, columns = np.triu_indices(f)
    matrix[rows, columns] = upper
    matrix[columns, rows] = upper
    return matrix


def _normal_from(obj: Any, name: str) -> NormalStats:
    if type(obj) is not dict:
        raise InvalidMessage(f"{name} must be an object with count, mean and comoment")
    count = obj.get("count")
    if type(count) not in (int, float) or not 0 <= count <= STATISTICS_LIMIT:
        raise InvalidMessage(f"{name}.count must be a number in [0, {STATISTICS_LIMIT:g}]")
    f = N_FEATURES
    mean = _floats(obj, "mean", f)
    return NormalStats(count, mean, _comoment_from(obj, name, f))


def _orjson_safe(*arrays: np.ndarray) -> bool:
    """Whether orjson writes these floats byte for byte as ``json`` does: it does for 0 and for
    1e-4 <= |x| < 1e16 (both print the shortest round-trip digits; checked on 8 million random
    floats), not below (``0.00001`` vs ``1e-05``), and not for NaN or the infinities."""
    for a in arrays:
        magnitude = np.abs(a)
        if not np.all(((magnitude >= 1e-4) & (magnitude < 1e16)) | (a == 0)):
            return False
    return True


LABEL_SOURCES = ("ground_truth", "pseudo")
"""What labels a round or a model learnt from: the stream's, or the z-score rule's."""

OPTIONAL_STATISTICS = ("anomalous", "pseudo_normal", "pseudo_anomalous")
"""A round's statistics blocks beyond ``normal``: each sent only when it has rows."""


def encode_local_round(update: LocalRound) -> bytes:
    c = update.prequential
    # The profile of the Flink job: json's float formatting was ~15 % of its Python time (a
    # round carries ~700 floats). orjson is ~20x faster and gives the same bytes whenever
    # _orjson_safe holds (ASCII strings too: json escapes the rest); json writes the others.
    fast = update.device_id.isascii() and _orjson_safe(
        update.params,
        update.normal.mean,
        update.anomalous.mean,
        update.pseudo_normal.mean,
        update.pseudo_anomalous.mean,
        np.array(
            [
                update.loss,
                update.accuracy,
                float(update.normal.count),
                float(update.anomalous.count),
                float(update.pseudo_normal.count),
                float(update.pseudo_anomalous.count),
            ]
        ),
    )
    message = {
        "device_id": update.device_id,
        "model_version": update.round,
        "state_since_ms": update.since_ms,
        "base_global_version": update.base_version,
        "weights": update.params.tolist(),
        "samples_processed": update.samples,
        "label_source": update.label_source,
        "loss": update.loss,
        "accuracy": update.accuracy,
        "normal": _normal_dict(update.normal),
        "scores": {
            "version": update.scored_version,
            "positives": update.hist_pos.tolist(),
            "negatives": update.hist_neg.tolist(),
            "normal": update.hist_normal.tolist(),
            "normal_positives": update.hist_normal_pos.tolist(),
            "normal_negatives": update.hist_normal_neg.tolist(),
            "discriminant_positives": update.hist_disc_pos.tolist(),
            "discriminant_negatives": update.hist_disc_neg.tolist(),
            "prequential": _confusion_dict(c),
        },
        "timestamp": format_timestamp(update.timestamp_ms),
    }
    for name in OPTIONAL_STATISTICS:  # absent means no such rows (decode)
        stats = getattr(update, name)
        if stats.count:
            message[name] = _normal_dict(stats)
    if fast:
        try:
            return orjson.dumps(message)
        except orjson.JSONEncodeError:  # e.g. a type orjson does not take: json's bytes, then
            pass
    return _dumps(message)


def _device_id(obj: dict[str, Any]) -> str:
    """The message's ``device_id``, valid as a PostgreSQL text key and a Kafka key."""
    device_id = obj.get("device_id")
    problem = name_problem(device_id, "device_id", MAX_DEVICE_ID_CHARS)
    if problem:
        raise InvalidMessage(problem)
    return device_id


@_guarded
def decode_local_round(obj: dict[str, Any]) -> LocalRound:
    """One message of ``local-model-updates`` (see :func:`encode_local_round`)."""
    device_id = _device_id(obj)
    scores = obj.get("scores")
    if type(scores) is not dict:
        raise InvalidMessage("scores must be an object")
    preq = scores.get("prequential")
    if type(preq) is not dict:
        raise InvalidMessage("scores.prequential must be an object")
    bins = LOGIT_EDGES.size + 1
    return LocalRound(
        device_id=device_id,
        round=_integer(obj, "model_version", 1),
        base_version=_integer(obj, "base_global_version"),
        params=_floats(obj, "weights"),
        samples=_integer(obj, "samples_processed", 1),
        label_source=_choice(obj, "label_source", LABEL_SOURCES),
        loss=_finite(obj, "loss"),
        accuracy=_finite(obj, "accuracy"),
        normal=_normal_from(obj.get("normal"), "normal"),
        hist_pos=_counts(scores, "positives", bins),
        hist_neg=_counts(scores, "negatives", bins),
        hist_normal=_counts(scores, "normal", NORMAL_EDGES.size + 1),
        hist_normal_pos=_optional_counts(scores, "normal_positives", NORMAL_EDGES.size + 1),
        hist_normal_neg=_optional_counts(scores, "normal_negatives", NORMAL_EDGES.size + 1),
        scored_version=_integer(scores, "version"),
        prequential=_confusion_from(preq, "scores.prequential"),
        timestamp_ms=parse_timestamp_ms(obj.get("timestamp")),
        since_ms=_integer(obj, "state_since_ms", 0, MAX_TIMESTAMP_MS)
        if "state_since_ms" in obj
        else 0,
        # Added to the contract later (an older learner's round has neither); absent also
        # means no such rows: most rounds see no anomaly, a labelled stream no pseudo-label.
        anomalous=_optional_stats(obj, "anomalous"),
        pseudo_normal=_optional_stats(obj, "pseudo_normal"),
        pseudo_anomalous=_optional_stats(obj, "pseudo_anomalous"),
        hist_disc_pos=_optional_counts(scores, "discriminant_positives", bins),
        hist_disc_neg=_optional_counts(scores, "discriminant_negatives", bins),
    )


def _optional_stats(obj: dict[str, Any], name: str) -> NormalStats:
    return _normal_from(obj[name], name) if name in obj else NormalStats.empty(N_FEATURES)


def _confusion_dict(c: Confusion) -> dict[str, int]:
    return {"tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn}


#: Largest confusion count one round may report. A round counts the fresh readings since the
#: device's previous round (tens to thousands); the server adds rounds' counts into bigint
#: columns (``prequential_evaluations``), so a bound far below 2**63 / (rounds per version)
#: keeps every sum storable.
MAX_ROUND_COUNT = 10**9


def _confusion_from(obj: Any, name: str) -> Confusion:
    if type(obj) is not dict:
        raise InvalidMessage(f"{name} must be an object with tp, fp, tn, fn")
    return Confusion(*(_integer(obj, k, 0, MAX_ROUND_COUNT) for k in ("tp", "fp", "tn", "fn")))


DETECTOR_KINDS = ("supervised", "discriminant", "label_free", "zscore")
ANOMALY_DETECTORS = (*DETECTOR_KINDS, "personal")
"""What may decide an anomaly: a global version's detector, or the device's own model."""


#: The field of a global version that carries its HMAC, and the algorithm's label in it.
SIGNATURE_FIELD = "signature"
SIGNATURE_PREFIX = "hmac-sha256:"


def _key_bytes(key: bytes | str) -> bytes:
    key = key.encode() if isinstance(key, str) else bytes(key)
    if not key:
        raise ValueError("the model signing key must not be empty")
    return key


def _signed_content(model: GlobalParams) -> bytes:
    """The canonical bytes the signature covers: everything a device takes from a version.

    Built from the values as a device decodes them (floats as float64, ``repr`` exact), not from
    the message's text, so that any JSON spelling of the same content verifies and any change of
    a value a device uses does not. The leading tag keeps this from being confused with any
    other signed thing that may share the key.
    """
    normal = model.normal
    content = [
        "flead-global-model/1",
        int(model.version),
        int(model.hidden),
        np.asarray(model.params, dtype=np.float64).ravel().tolist(),
        None if model.threshold is None else float(model.threshold),
        float(normal.count),
        np.asarray(normal.mean, dtype=np.float64).ravel().tolist(),
        np.asarray(normal.comoment, dtype=np.float64).ravel().tolist(),
        None if model.normal_threshold is None else float(model.normal_threshold),
        str(model.label_source),
        str(model.detector),
        None
        if model.discriminant is None
        else np.asarray(model.discriminant, dtype=np.float64).ravel().tolist(),
        None if model.discriminant_threshold is None else float(model.discriminant_threshold),
    ]
    if model.discriminant_labels != "ground_truth":
        # Appended only when not the default, so that versions signed before the field keep
        # their signatures.
        content.append(str(model.discriminant_labels))
    return json.dumps(content, separators=(",", ":"), allow_nan=False).encode()


def sign_global_params(model: GlobalParams, key: bytes | str) -> str:
    """The signature of a version: ``hmac-sha256:<hex>`` over :func:`_signed_content`."""
    digest = hmac.new(_key_bytes(key), _signed_content(model), hashlib.sha256).hexdigest()
    return SIGNATURE_PREFIX + digest


def encode_global_params(
    model: GlobalParams, timestamp_ms: int, *, key: bytes | str, **extra: Any
) -> bytes:
    """A version for ``global-model-updates``, signed with ``key`` (the FedAvg service's
    ``model_signing_key``); ``extra`` adds the service's bookkeeping fields (``num_devices``,
    ``strategy``, ``accuracy``), which devices do not use and the signature does not cover."""
    if SIGNATURE_FIELD in extra:
        raise ValueError("the signature is computed here, not passed in")
    model = replace(model, normal=symmetric(model.normal))
    # A version without a normal model (learner.as_sent) leaves the block out: absent reads as
    # no rows, and the signature covers that.
    normal = {"normal": _normal_dict(model.normal)} if model.normal.count else {}
    return _dumps(
        {
            "version": model.version,
            "aggregation_round": model.version,
            "hidden": model.hidden,
            "weights": model.params.tolist(),
            "threshold": model.threshold,
            **normal,
            "normal_threshold": model.normal_threshold,
            "label_source": model.label_source,
            "detector": model.detector,
            "discriminant": None if model.discriminant is None else model.discriminant.tolist(),
            "discriminant_threshold": model.discriminant_threshold,
            "discriminant_labels": model.discriminant_labels,
            "timestamp": format_timestamp(timestamp_ms),
            **extra,
            SIGNATURE_FIELD: sign_global_params(model, key),
        }
    )


def _global_from(obj: dict[str, Any]) -> GlobalParams:
    hidden = _integer(obj, "hidden", 0, 1024)
    size = Network(N_POOLED, hidden).size
    return GlobalParams(
        version=_integer(obj, "version", 1),
        hidden=hidden,
        params=_floats(obj, "weights", size),
        threshold=_finite(obj, "threshold", optional=True),
        normal=_optional_stats(obj, "normal"),
        normal_threshold=_finite(obj, "normal_threshold", optional=True),
        label_source=_choice(obj, "label_source", LABEL_SOURCES),
        detector=_choice(obj, "detector", DETECTOR_KINDS),
        discriminant=(
            None
            if obj.get("discriminant") is None
            else _floats(obj, "discriminant", N_FEATURES + 1)
        ),
        discriminant_threshold=_finite(obj, "discriminant_threshold", optional=True),
        discriminant_labels=_choice(obj, "discriminant_labels", LABEL_SOURCES)
        if "discriminant_labels" in obj
        else "ground_truth",  # a version from before the field
    )


@_guarded
def decode_global_params(obj: dict[str, Any], key: bytes | str) -> GlobalParams:
    """One message of ``global-model-updates`` (see :func:`encode_global_params`), accepted only
    with a valid signature under ``key``: an unsigned or badly signed version (anyone who can
    write to the topic could otherwise take over every device's model) raises InvalidMessage."""
    signature = obj.get(SIGNATURE_FIELD)
    if signature is None:
        raise InvalidMessage(
            "unsigned global model: no signature field (only the FedAvg service's signed "
            "versions are adopted)"
        )
    if (
        type(signature) is not str
        or not signature.startswith(SIGNATURE_PREFIX)
        or len(signature) != len(SIGNATURE_PREFIX) + 64
    ):
        raise InvalidMessage(
            f"global model signature must be '{SIGNATURE_PREFIX}' and 64 hex digits, "
            f"got {_describe(signature)}"
        )
    model = _global_from(obj)
    try:
        expected = sign_global_params(model, key)
    except (ValueError, TypeError) as exc:  # a missing key is the consumer's fault: say so
        raise InvalidMessage(f"cannot verify the global model's signature: {exc}") from None
    if not hmac.compare_digest(expected.encode(), signature.encode("ascii", "replace")):
        raise InvalidMessage(
            f"global model version {model.version} is badly signed: its signature does not match "
            "the FedAvg service's key (forged, altered, or signed with another key)"
        )
    return model


@_guarded
def decode_stored_global_params(obj: dict[str, Any]) -> GlobalParams:
    """A version this process verified before it kept it (the Flink job's broadcast state):
    validated again but not re-verified, so that a rotated signing key does not strand the
    version a device holds. Never use it on what comes from Kafka."""
    return _global_from(obj)


# --- anomalies --------------------------------------------------------------------------------
#
# One record per flagged reading: what was flagged (the channel with the largest |z|, its value
# and z), by which detector of which global version, its score against the threshold, the
# channels that drove it and a human-readable reason.

SEVERITIES = ("warning", "critical")
MAX_REASON_CHARS = 2_000
"""Longest ``reason`` accepted (characters)."""
_REASON_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")
SCORE_LIMIT = MAGNITUDE_LIMIT
"""|z_score|, |score| and |threshold| beyond this are refused (z and scores are capped far
below it; a value beyond is a broken producer)."""


def encode_anomaly(anomaly: Anomaly) -> bytes:
    """A record for ``anomalies`` (see :class:`streaming.learner.Anomaly`)."""
    return _dumps(
        {
            "device_id": anomaly.device_id,
            "timestamp": format_timestamp(anomaly.timestamp_ms),
            "value": anomaly.value,
            "z_score": anomaly.z_score,
            "severity": anomaly.severity,
            "score": anomaly.score,
            "threshold": anomaly.threshold,
            "model_version": anomaly.model_version,
            "detector": anomaly.detector,
            "channels": list(anomaly.channels),
            "reason": anomaly.reason,
        }
    )


def _bounded(obj: dict[str, Any], name: str, limit: float) -> float:
    value = obj.get(name)
    if type(value) not in (int, float) or not -limit <= value <= limit:
        raise InvalidMessage(f"{name} must be a number within ±{limit:g}, got {_describe(value)}")
    return float(value)


def _anomaly_channels(obj: dict[str, Any]) -> tuple[str, ...]:
    channels = obj.get("channels")
    if type(channels) is not list or not channels or len(channels) > MAX_CHANNELS:
        raise InvalidMessage(
            f"channels must be a non-empty list of at most {MAX_CHANNELS} names, "
            f"got {_describe(channels)}"
        )
    for name in channels:
        problem = name_problem(name, "channel name", MAX_CHANNEL_NAME_CHARS)
        if problem:
            raise InvalidMessage(problem)
    if len(set(channels)) != len(channels):
        raise InvalidMessage("channels names a channel more than once")
    return tuple(channels)


@_guarded
def decode_anomaly(obj: dict[str, Any]) -> Anomaly:
    """One record of ``anomalies`` (see :func:`encode_anomaly`)."""
    device_id = _device_id(obj)
    reason = obj.get("reason")
    if type(reason) is not str or len(reason) > MAX_REASON_CHARS:
        raise InvalidMessage(
            f"reason must be a string of at most {MAX_REASON_CHARS} characters, "
            f"got {_describe(reason)}"
        )
    if _REASON_BAD_CHARS.search(reason):
        # NUL cannot be stored in a PostgreSQL text column; a lone surrogate is not UTF-8.
        raise InvalidMessage("reason contains NUL or a lone surrogate")
    return Anomaly(
        device_id=device_id,
        timestamp_ms=parse_timestamp_ms(obj.get("timestamp")),
        value=_bounded(obj, "value", MAGNITUDE_LIMIT),
        z_score=_bounded(obj, "z_score", SCORE_LIMIT),
        severity=_choice(obj, "severity", SEVERITIES),
        score=_bounded(obj, "score", SCORE_LIMIT),
        threshold=_bounded(obj, "threshold", SCORE_LIMIT),
        model_version=_integer(obj, "model_version"),
        detector=_choice(obj, "detector", ANOMALY_DETECTORS),
        channels=_anomaly_channels(obj),
        reason=reason,
    )
