"""Jobs that are not asset materializations: starting and stopping the streaming services
from the Dagster UI (Launchpad: ``action: start | stop | restart``)."""

from typing import Literal

from dagster import Config, OpExecutionContext, job, op

from flead_assets.resources.streaming import StreamingServiceResource


class StreamingAction(Config):
    action: Literal["start", "stop", "restart"] = "start"


@op(description="Start, stop or restart the Flink job, the FedAvg service and the anomaly sink.")
def manage_streaming_services(
    context: OpExecutionContext,
    config: StreamingAction,
    flink_job: StreamingServiceResource,
    fedavg: StreamingServiceResource,
    anomaly_sink: StreamingServiceResource,
) -> dict[str, str]:
    services = [flink_job, fedavg, anomaly_sink]  # the job first: the others drain what it emits
    outcome: dict[str, str] = {}
    if config.action in ("stop", "restart"):
        for service in services:
            outcome[service.name] = "stopped" if service.stop() else "was not running"
    if config.action in ("start", "restart"):
        for service in reversed(services):  # consumers first, so nothing the job emits waits
            outcome[service.name] = service.start()
    for name, state in outcome.items():
        context.log.info("%s: %s", name, state)
    return outcome


@job(description="Start, stop or restart the streaming services (pid files, as `flead up`).")
def streaming_services_job() -> None:
    manage_streaming_services()
