"""Shared helpers for benchmarks: fresh topics, interleaved repeats, result files."""

from __future__ import annotations

import json
import platform
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from flead import kafka
from flead.config import Settings

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def fresh_topic(settings: Settings, prefix: str) -> str:
    name = f"bench-{prefix}-{uuid.uuid4().hex[:8]}"
    kafka.ensure_topics(settings, [name])
    return name


def delete_topics(settings: Settings, names: list[str]) -> None:
    client = kafka.admin(settings)  # must outlive its futures
    for future in client.delete_topics(names, operation_timeout=30).values():
        future.result()


def interleaved(candidates: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each candidate once per round, alternating, so machine noise hits all alike.

    Each candidate returns a rate (items/s)."""
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            rates[name].append(run())
    return rates


def summarise(rates: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        name: {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "runs": values,
        }
        for name, values in rates.items()
    }


def write_result(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {
        "benchmark": name,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def timed(fn: Callable[[], int]) -> float:
    started = time.perf_counter()
    count = fn()
    return count / (time.perf_counter() - started)
