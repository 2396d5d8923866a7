"""One external asset per Grafana dashboard (the files in ``grafana/dashboards/``), with deps
on the tables each reads: the end of the lineage from the Kafka topic."""

from __future__ import annotations

from dagster import AssetKey, AssetSpec

GROUP = "dashboards"

DASHBOARDS: dict[str, tuple[str, list[str]]] = {
    "flead-overview": (
        "Training activity: local and global models, active devices, anomalies.",
        ["local_models", "federated_models", "anomalies"],
    ),
    "flead-model-quality": (
        "Held-out accuracy, precision, recall and F1 per global version, with the baseline.",
        ["model_evaluation_summaries", "accuracy_report"],
    ),
    "flead-analytics": (
        "Hourly per-device statistics and anomalies per hour by severity.",
        ["hourly_device_analytics", "anomalies"],
    ),
}
"""Dashboard uid (= file name without .json) → (what it shows, asset keys it reads)."""


def dashboard_key(uid: str) -> AssetKey:
    return AssetKey(uid.replace("-", "_"))  # asset names are identifiers


def dashboard_specs(grafana_url: str = "http://127.0.0.1:3000") -> list[AssetSpec]:
    return [
        AssetSpec(
            dashboard_key(uid),
            description=description,
            deps=[AssetKey(dep) for dep in deps],
            kinds={"grafana"},
            group_name=GROUP,
            metadata={
                "file": f"grafana/dashboards/{uid}.json",
                "dashboard_uid": uid,
                "url": f"{grafana_url}/d/{uid}",
            },
        )
        for uid, (description, deps) in DASHBOARDS.items()
    ]
