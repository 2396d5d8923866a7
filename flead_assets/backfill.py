"""Backfill of historical global versions: register them as partitions, then one backfill.

``flead.orchestration.backfill_evaluations`` (the ``flead backfill`` command) uses these to
launch the backfill through the running webserver, so the daemon executes it and the UI lists
it; ``BackfillPolicy.single_run`` turns a contiguous range of versions into one run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import psycopg
from dagster import DagsterInstance

from flead.config import Settings
from flead_assets.assets.evaluations import (
    MODEL_EVALUATION_SUMMARIES,
    MODEL_EVALUATIONS,
    global_versions,
)

REPORT = ["accuracy_report"]


def instance(settings: Settings) -> DagsterInstance:
    """The instance in ``<state>/dagster`` (its dagster.yaml is rendered by ensure_dagster)."""
    home = settings.dagster_home
    if not (home / "dagster.yaml").exists():
        from flead.orchestration import prepare_home

        prepare_home(settings)
    os.environ.setdefault("DAGSTER_HOME", str(home))
    return DagsterInstance.from_config(str(home))


def stored_versions(settings: Settings) -> list[int]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute("SELECT global_version FROM federated_models ORDER BY 1").fetchall()
    return [row[0] for row in rows]


def register_versions(settings: Settings, versions: Sequence[int] | None = None) -> list[str]:
    """Add the versions (all of ``federated_models`` by default) that are not partitions yet,
    in version order; return the partition keys to backfill."""
    wanted = sorted(set(versions)) if versions is not None else stored_versions(settings)
    keys = [str(v) for v in wanted]
    with instance(settings) as dagster:
        known = set(dagster.get_dynamic_partitions(global_versions.name))
        missing = [k for k in keys if k not in known]
        if missing:
            dagster.add_dynamic_partitions(global_versions.name, missing)
    return keys


def contiguous_ranges(keys: Sequence[str], order: Sequence[str]) -> list[dict[str, str]]:
    """``keys`` as ranges of consecutive keys in the partitions' ``order`` (GraphQL form)."""
    position = {key: i for i, key in enumerate(order)}
    ranges: list[dict[str, str]] = []
    previous = None
    for key in sorted(keys, key=position.__getitem__):
        if previous is not None and position[key] == position[previous] + 1:
            ranges[-1]["end"] = key
        else:
            ranges.append({"start": key, "end": key})
        previous = key
    return ranges


def evaluation_params(settings: Settings, keys: Sequence[str]) -> dict[str, Any]:
    """GraphQL ``LaunchBackfillParams``: the versions' ranges, and the report after them."""
    with instance(settings) as dagster:
        order = dagster.get_dynamic_partitions(global_versions.name)
    ranges = contiguous_ranges(keys, order)
    partitioned = [
        {"assetKey": {"path": key.path}, "partitions": {"ranges": ranges}}
        for key in (MODEL_EVALUATIONS, MODEL_EVALUATION_SUMMARIES)
    ]
    return {
        "partitionsByAssets": [
            *partitioned,
            {"assetKey": {"path": REPORT}, "partitions": None},
        ],
        "title": f"evaluate global versions {keys[0]}…{keys[-1]}",
        "tags": [{"key": "flead/versions", "value": str(len(keys))}],
    }


def analytics_params(first_hour: str, last_hour: str) -> dict[str, Any]:
    return {
        "partitionsByAssets": [
            {
                "assetKey": {"path": ["hourly_device_analytics"]},
                "partitions": {"range": {"start": first_hour, "end": last_hour}},
            }
        ],
        "title": f"hourly analytics {first_hour}…{last_hour}",
    }
