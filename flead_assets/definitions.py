"""The ``flead_assets`` code location (loaded by ``workspace.yaml``)."""

from __future__ import annotations

from dagster import Definitions, in_process_executor

from flead.config import Settings, load_settings
from flead_assets.assets.analytics import build_hourly_device_analytics
from flead_assets.assets.dashboards import dashboard_specs
from flead_assets.assets.evaluations import model_evaluations
from flead_assets.assets.external import SERVICE_HEALTH_CHECKS, external_specs
from flead_assets.assets.reports import accuracy_report
from flead_assets.jobs import streaming_services_job
from flead_assets.resources import build_resources
from flead_assets.sensors.federated_models import build_federated_models_sensor
from flead_assets.sensors.readings import build_readings_sensor
from flead_assets.sensors.schedules import build_hourly_schedule
from flead_assets.sensors.streaming_health import build_streaming_health_sensor


def build_defs(settings: Settings) -> Definitions:
    hourly = build_hourly_device_analytics(settings)
    hourly_job, hourly_schedule = build_hourly_schedule(settings, hourly)
    return Definitions(
        assets=[
            *external_specs(settings),
            hourly,
            model_evaluations,
            accuracy_report,
            *dashboard_specs(),
        ],
        asset_checks=SERVICE_HEALTH_CHECKS,
        jobs=[hourly_job, streaming_services_job],
        schedules=[hourly_schedule],
        sensors=[
            build_federated_models_sensor(settings),
            build_readings_sensor(settings, hourly, hourly.partitions_def),
            build_streaming_health_sensor(settings),
        ],
        resources=build_resources(settings),
        # A run is already its own process; its steps run one after the other (Spark pool,
        # dependencies), so a subprocess per step would only add start-up time.
        executor=in_process_executor,
    )


defs = build_defs(load_settings())
