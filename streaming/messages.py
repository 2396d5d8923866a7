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


# --- anomalies, local-model-updates, global-model-updates ------------------------------------


@dataclass(frozen=True, slots=True)
class Anomaly:
    device_id: str
    value: float
    z_score: float
    severity: str  # "warning" | "critical"
    timestamp: datetime


@dataclass(frozen=True, slots=True)
class LocalUpdate:
    device_id: str
    model_version: int  # the device's round counter, 1, 2, ...
    base_global_version: int  # the global model the round started from (0 = none yet)
    weights: tuple[float, ...]
    bias: float
    accuracy: float  # training accuracy of the round: never reported as model quality
    loss: float
    samples_processed: int
    timestamp: datetime
    label_source: str = "ground_truth"  # or "pseudo" (the z-score rule)


@dataclass(frozen=True, slots=True)
class GlobalUpdate:
    version: int
    aggregation_round: int
    weights: tuple[float, ...]
    bias: float
    accuracy: float | None  # sample-weighted mean training accuracy of the updates
    num_devices: int
    strategy: str
    timestamp: datetime


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


def encode_anomaly(anomaly: Anomaly) -> bytes:
    return _dumps(
        {
            "device_id": anomaly.device_id,
            "value": anomaly.value,
            "z_score": anomaly.z_score,
            "severity": anomaly.severity,
            "timestamp": format_timestamp(anomaly.timestamp),
        }
    )


def decode_anomaly(payload: bytes | str) -> Anomaly:
    obj = _loads_object(payload)
    severity = obj.get("severity")
    if severity not in ("warning", "critical"):
        raise InvalidMessage(f"severity must be 'warning' or 'critical', got {severity!r}")
    return Anomaly(
        _text(obj, "device_id"),
        _number(obj, "value"),
        _number(obj, "z_score"),
        severity,
        parse_timestamp(obj.get("timestamp")),
    )


def encode_local_update(update: LocalUpdate) -> bytes:
    return _dumps(
        {
            "device_id": update.device_id,
            "model_version": update.model_version,
            "base_global_version": update.base_global_version,
            "weights": list(update.weights),
            "bias": update.bias,
            "accuracy": update.accuracy,
            "loss": update.loss,
            "samples_processed": update.samples_processed,
            "timestamp": format_timestamp(update.timestamp),
            "label_source": update.label_source,
        }
    )


def decode_local_update(payload: bytes | str) -> LocalUpdate:
    obj = _loads_object(payload)
    label_source = obj.get("label_source", "ground_truth")
    if label_source not in ("ground_truth", "pseudo"):
        raise InvalidMessage(
            f"label_source must be 'ground_truth' or 'pseudo', got {label_source!r}"
        )
    return LocalUpdate(
        device_id=_text(obj, "device_id"),
        model_version=_count(obj, "model_version", 1),
        base_global_version=_count(obj, "base_global_version"),
        weights=_weights(obj),
        bias=_number(obj, "bias"),
        accuracy=_number(obj, "accuracy"),
        loss=_number(obj, "loss"),
        samples_processed=_count(obj, "samples_processed", 1),
        timestamp=parse_timestamp(obj.get("timestamp")),
        label_source=label_source,
    )


def encode_global_update(update: GlobalUpdate) -> bytes:
    return _dumps(
        {
            "version": update.version,
            "aggregation_round": update.aggregation_round,
            "weights": list(update.weights),
            "bias": update.bias,
            "accuracy": update.accuracy,
            "num_devices": update.num_devices,
            "strategy": update.strategy,
            "timestamp": format_timestamp(update.timestamp),
        }
    )


def decode_global_update(payload: bytes | str) -> GlobalUpdate:
    obj = _loads_object(payload)
    return GlobalUpdate(
        version=_count(obj, "version", 1),
        aggregation_round=_count(obj, "aggregation_round", 1),
        weights=_weights(obj),
        bias=_number(obj, "bias"),
        accuracy=_number(obj, "accuracy", optional=True),
        num_devices=_count(obj, "num_devices", 1),
        strategy=_text(obj, "strategy"),
        timestamp=parse_timestamp(obj.get("timestamp")),
    )
