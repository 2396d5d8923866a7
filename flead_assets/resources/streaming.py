"""The long-running streaming services as Dagster resources: start, stop, health.

Dagster does not run the Flink job or the FedAvg service (they are not batch steps); it
manages them as external processes through the same pid files as ``flead up``/``flead down``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dagster import ConfigurableResource

from flead import orchestration, services, supervision
from flead_assets.resources.settings import FleadResource


@dataclass(frozen=True)
class ServiceHealth:
    name: str
    alive: bool
    pid: int | None
    log: str
    restarts: int = 0  # by `flead supervise` (flead/supervision.py)
    stalled: bool = False  # consumer lag with no committed progress for lag_stall_s

    def describe(self) -> str:
        state = "running as pid " + str(self.pid) if self.alive else "is not running"
        stalled = ", stalled: lag and no committed progress" if self.stalled else ""
        return f"{self.name} {state}{stalled}; restarted {self.restarts} times"


class StreamingServiceResource(ConfigurableResource):
    """One streaming service of ``services.streaming_commands``: ``flink-job``, ``fedavg`` or
    ``anomaly-sink``. Alive means its recorded pid is a live process."""

    name: str
    flead: FleadResource

    def health(self) -> ServiceHealth:
        settings = self.flead.settings
        pid = services.recorded_pid(settings, self.name)
        log = str(settings.log_dir / f"{self.name}.log")
        seen = supervision.service_report(settings)
        record = seen.get(self.name, {})
        stalled = bool(seen[supervision.SUPERVISOR]["alive"] and record.get("stalled"))
        return ServiceHealth(
            self.name, pid is not None, pid, log, int(record.get("restarts", 0)), stalled
        )

    def start(self) -> str:
        """Start the service unless it runs; "running" or "started"."""
        return orchestration.start_streaming_service(self.flead.settings, self.name)

    def stop(self) -> bool:
        """SIGTERM (then SIGKILL) exactly the recorded pid; True if something was stopped."""
        return services.stop_pid(self.flead.settings, self.name, timeout=60)


STREAMING_RESOURCE_KEYS = {
    "flink-job": "flink_job",
    "fedavg": "fedavg",
    "anomaly-sink": "anomaly_sink",
}
"""Service name → resource key (resource keys must be identifiers)."""


def streaming_resources(flead: FleadResource) -> dict[str, StreamingServiceResource]:
    return {
        key: StreamingServiceResource(name=name, flead=flead)
        for name, key in STREAMING_RESOURCE_KEYS.items()
    }
