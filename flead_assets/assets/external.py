"""External assets: what the streaming tier produces, declared so the graph starts at Kafka.

Dagster does not materialize these; the evaluation sensor reports runless materializations of
them as they change, which is what the UI's freshness shows. Health checks of the services that
produce them are asset checks here, evaluated by the streaming health sensor (or on demand).
"""

from datetime import timedelta

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    AssetSpec,
    FreshnessPolicy,
    MetadataValue,
    asset_check,
)

from flead.config import Settings
from flead_assets.resources.streaming import ServiceHealth, StreamingServiceResource

GROUP = "streaming"
EDGE_IIOT_STREAM = AssetKey("edge_iiot_stream")
ANOMALIES = AssetKey("anomalies")
LOCAL_MODELS = AssetKey("local_models")
FEDERATED_MODELS = AssetKey("federated_models")

# Versions arrive every few seconds while devices learn; an hour of silence means the stream
# (or the service) has stopped, which the UI should show rather than hide.
_STREAM_FRESHNESS = FreshnessPolicy.time_window(
    fail_window=timedelta(hours=6), warn_window=timedelta(hours=1)
)


def _table(name: str) -> dict[str, object]:
    return {"dagster/table_name": f"public.{name}"}


def external_specs(settings: Settings) -> list[AssetSpec]:
    topic = settings.topics.readings
    return [
        AssetSpec(
            EDGE_IIOT_STREAM,
            description=f"Raw IoT readings, Kafka topic `{topic}` (key = device_id, JSON;"
            " single or batched readings). Written by the replay producer.",
            kinds={"kafka"},
            group_name=GROUP,
            metadata={"topic": topic, "bootstrap": settings.kafka_bootstrap},
        ),
        AssetSpec(
            ANOMALIES,
            description="z-score anomalies per reading, found by the PyFlink job (topic"
            f" `{settings.topics.anomalies}`) and stored by the anomaly sink.",
            deps=[EDGE_IIOT_STREAM],
            kinds={"flink", "postgres"},
            group_name=GROUP,
            metadata=_table("anomalies"),
            freshness_policy=_STREAM_FRESHNESS,
        ),
        AssetSpec(
            LOCAL_MODELS,
            description="Each device's local SGD round (weights included), trained by the PyFlink"
            f" job on `{topic}`; stored by the FedAvg service with the version it went into.",
            deps=[EDGE_IIOT_STREAM],
            kinds={"flink", "postgres"},
            group_name=GROUP,
            metadata=_table("local_models"),
            freshness_policy=_STREAM_FRESHNESS,
        ),
        AssetSpec(
            FEDERATED_MODELS,
            description="Global model versions: the FedAvg service's weighted average of the"
            f" weights of ~{settings.fedavg_min_devices} devices' local rounds.",
            deps=[LOCAL_MODELS],
            kinds={"python", "postgres"},
            group_name=GROUP,
            metadata=_table("federated_models"),
            freshness_policy=_STREAM_FRESHNESS,
        ),
    ]


# --- health of the services behind them ------------------------------------------------------

SERVICE_CHECKS = {
    "flink-job": (LOCAL_MODELS, "flink_job_running"),
    "fedavg": (FEDERATED_MODELS, "fedavg_service_running"),
    "anomaly-sink": (ANOMALIES, "anomaly_sink_running"),
}
"""Service → (asset it produces, name of the check that says whether it runs)."""


def health_check_result(health: ServiceHealth) -> AssetCheckResult:
    asset, check = SERVICE_CHECKS[health.name]
    return AssetCheckResult(
        asset_key=asset,
        check_name=check,
        passed=health.alive,
        severity=AssetCheckSeverity.ERROR,
        description=health.describe(),
        metadata={"pid": health.pid or 0, "log": MetadataValue.path(health.log)},
    )


@asset_check(asset=LOCAL_MODELS, name="flink_job_running", blocking=False)
def flink_job_running(flink_job: StreamingServiceResource) -> AssetCheckResult:
    return health_check_result(flink_job.health())


@asset_check(asset=FEDERATED_MODELS, name="fedavg_service_running", blocking=False)
def fedavg_service_running(fedavg: StreamingServiceResource) -> AssetCheckResult:
    return health_check_result(fedavg.health())


@asset_check(asset=ANOMALIES, name="anomaly_sink_running", blocking=False)
def anomaly_sink_running(anomaly_sink: StreamingServiceResource) -> AssetCheckResult:
    return health_check_result(anomaly_sink.health())


SERVICE_HEALTH_CHECKS = [flink_job_running, fedavg_service_running, anomaly_sink_running]
