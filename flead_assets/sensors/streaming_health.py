"""Reports a dead streaming service: the health checks of the external assets, evaluated
runlessly every ``streaming_health_interval_s`` seconds (no run, no Spark, no JVM)."""

import json

from dagster import (
    AssetCheckEvaluation,
    DefaultSensorStatus,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from flead.config import Settings
from flead_assets.assets.external import SERVICE_CHECKS
from flead_assets.resources.streaming import ServiceHealth, StreamingServiceResource


def evaluation(health: ServiceHealth) -> AssetCheckEvaluation:
    asset, check = SERVICE_CHECKS[health.name]
    return AssetCheckEvaluation(
        asset_key=asset,
        check_name=check,
        passed=health.alive and not health.stalled,
        description=health.describe(),
        metadata={"pid": health.pid or 0, "log": health.log, "restarts": health.restarts},
    )


def evaluate(
    context: SensorEvaluationContext, resources: list[StreamingServiceResource]
) -> SensorResult:
    """An evaluation per service whose state changed since the last tick (and all of them on
    the first tick), so the check history records transitions rather than one row a minute."""
    before = json.loads(context.cursor) if context.cursor else {}
    healths = [r.health() for r in resources]
    # A restart is a change too: the check history shows every one.
    now = {h.name: [h.alive and not h.stalled, h.restarts] for h in healths}
    changed = [h for h in healths if before.get(h.name) != now[h.name]]
    dead = [h.name for h in healths if not h.alive or h.stalled]
    if dead:
        context.log.warning("streaming services not running: %s", ", ".join(dead))
    return SensorResult(
        asset_events=[evaluation(h) for h in changed],
        cursor=json.dumps(now, sort_keys=True),
        skip_reason=f"not running: {', '.join(dead)}" if dead else "all streaming services run",
    )


def build_streaming_health_sensor(settings: Settings):
    @sensor(
        name="streaming_health_sensor",
        description="Whether the Flink job, the FedAvg service and the anomaly sink run;"
        " reported as the asset checks *_running of the tables they fill.",
        minimum_interval_seconds=settings.streaming_health_interval_s,
        default_status=DefaultSensorStatus.RUNNING,
    )
    def streaming_health_sensor(
        context: SensorEvaluationContext,
        flink_job: StreamingServiceResource,
        fedavg: StreamingServiceResource,
        anomaly_sink: StreamingServiceResource,
    ) -> SensorResult:
        return evaluate(context, [flink_job, fedavg, anomaly_sink])

    return streaming_health_sensor
