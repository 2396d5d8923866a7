"""The message contracts of DESIGN §2: one module that encodes and validates every topic's JSON.

Producers call ``encode_*``; consumers call ``decode_*``, which raise :class:`InvalidMessage`
with a human-readable reason that goes to the dead-letter topic.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


class InvalidMessage(ValueError):
    """A message that does not follow its topic's contract; ``str(exc)`` is the reason."""


@dataclass(frozen=True, slots=True)
class Reading:
    device_id: str
    timestamp: datetime  # timezone-aware, UTC
    value: float
    label: int | None = None  # 1 = anomaly, 0 = normal, None = unlabelled

    @property
    def timestamp_ms(self) -> int:
        return int(self.timestamp.timestamp() * 1000)


def format_timestamp(ts: datetime) -> str:
    """ISO 8601 UTC with milliseconds and a ``Z``: ``2025-11-07T15:22:31.000Z``."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def parse_timestamp(raw: Any) -> datetime:
    if not isinstance(raw, str):
        raise InvalidMessage(f"timestamp must be an ISO 8601 string, got {type(raw).__name__}")
    try:
        ts = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidMessage(f"timestamp {raw!r} is not ISO 8601") from exc
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def reading_to_dict(reading: Reading) -> dict[str, Any]:
    message: dict[str, Any] = {
        "device_id": reading.device_id,
        "timestamp": format_timestamp(reading.timestamp),
        "data": reading.value,
    }
    if reading.label is not None:
        message["label"] = reading.label
    return message


def encode_reading(reading: Reading) -> bytes:
    return json.dumps(reading_to_dict(reading), separators=(",", ":")).encode()


def encode_reading_batch(readings: list[Reading]) -> bytes:
    """The batched form: ``{"readings": [<reading>, ...]}``, all of one device."""
    return json.dumps(
        {"readings": [reading_to_dict(r) for r in readings]}, separators=(",", ":")
    ).encode()


def _reading_from_dict(obj: Any) -> Reading:
    if not isinstance(obj, dict):
        raise InvalidMessage("a reading must be a JSON object")
    device_id = obj.get("device_id")
    if not isinstance(device_id, str) or not device_id:
        raise InvalidMessage("device_id must be a non-empty string")
    value = obj.get("data")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidMessage(f"data must be a finite number, got {value!r}")
    label = obj.get("label")
    if label is not None and label not in (0, 1):
        raise InvalidMessage(f"label must be 0, 1 or absent, got {label!r}")
    return Reading(device_id, parse_timestamp(obj.get("timestamp")), float(value), label)


def decode_readings(payload: bytes | str) -> list[Reading]:
    """One message of ``edge-iiot-stream``: a single reading or the batched form."""
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidMessage(f"not JSON: {exc}") from exc
    if isinstance(obj, dict) and "readings" in obj:
        batch = obj["readings"]
        if not isinstance(batch, list) or not batch:
            raise InvalidMessage("readings must be a non-empty list")
        return [_reading_from_dict(item) for item in batch]
    return [_reading_from_dict(obj)]


def dead_letter(topic: str, payload: bytes | None, reason: str) -> bytes:
    """The dead-letter record: where it came from, why it was refused, and the raw payload."""
    raw = payload.decode("utf-8", errors="replace") if payload is not None else None
    return json.dumps(
        {
            "source_topic": topic,
            "reason": reason,
            "payload": raw,
            "timestamp": format_timestamp(datetime.now(UTC)),
        }
    ).encode()
