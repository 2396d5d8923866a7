"""The sensor on ``federated_models``: every new global version becomes a partition of
``model_evaluations`` and is evaluated by a sensor-launched run.

Scale: the FedAvg service makes a version per ~20 device updates, hundreds within minutes of a
replay, and each run starts a Spark session (a JVM, seconds). So one tick's new versions go
into one run over their partition range (``BackfillPolicy.single_run`` executes a range in one
step), capped at ``evaluation_max_versions_per_run`` versions per run. A tick that sees one new
version requests exactly that partition with ``run_key`` = the version; a range's run key is
``"<first>-<last>"``. Keys never repeat: the cursor only moves forward.

The same tick reports runless materializations of the external assets that changed (the
streaming tables and the raw topic), so their freshness shows in the UI.
"""

import json
from dataclasses import asdict, dataclass, field

from dagster import (
    AssetKey,
    AssetMaterialization,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from flead import kafka
from flead.config import Settings
from flead_assets.assets.evaluations import (
    MODEL_EVALUATION_SUMMARIES,
    MODEL_EVALUATIONS,
    global_versions,
)
from flead_assets.assets.external import (
    ANOMALIES,
    EDGE_IIOT_STREAM,
    FEDERATED_MODELS,
    LOCAL_MODELS,
)
from flead_assets.resources.settings import FleadResource

EVALUATION_ASSETS = [MODEL_EVALUATIONS, MODEL_EVALUATION_SUMMARIES, AssetKey("accuracy_report")]


@dataclass
class Cursor:
    """The last global version seen, and what each external asset looked like last tick."""

    version: int = 0
    seen: dict[str, list] = field(default_factory=dict)  # asset → [rows, latest]

    @classmethod
    def parse(cls, raw: str | None) -> "Cursor":
        if not raw:
            return cls()
        if raw.isdigit():  # a bare version (what a user may set from the UI)
            return cls(int(raw))
        data = json.loads(raw)
        return cls(int(data.get("version", 0)), dict(data.get("seen", {})))

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def chunks(versions: list[int], size: int) -> list[list[int]]:
    size = max(1, size)
    return [versions[i : i + size] for i in range(0, len(versions), size)]


def run_request(versions: list[int]) -> RunRequest:
    first, last = str(versions[0]), str(versions[-1])
    tags = {"flead/versions": str(len(versions))}
    if len(versions) == 1:
        return RunRequest(
            run_key=first, partition_key=first, asset_selection=EVALUATION_ASSETS, tags=tags
        )
    return RunRequest(
        run_key=f"{first}-{last}",
        asset_selection=EVALUATION_ASSETS,
        tags={**tags, ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last},
    )


_TABLE_STATE = {
    FEDERATED_MODELS: "SELECT count(*), max(global_version)::text FROM federated_models",
    LOCAL_MODELS: "SELECT count(*), max(created_at)::text FROM local_models",
    ANOMALIES: "SELECT count(*), max(timestamp)::text FROM anomalies",
}


def external_state(flead: FleadResource, conn) -> dict[str, list]:
    state = {
        key.to_user_string(): list(conn.execute(sql).fetchone())
        for key, sql in _TABLE_STATE.items()
    }
    settings = flead.settings
    try:
        count = kafka.topic_message_counts(settings, [settings.topics.readings], timeout=5)
        state[EDGE_IIOT_STREAM.to_user_string()] = [count[settings.topics.readings], None]
    except Exception:  # Kafka down must not stop evaluations: the topic just shows stale
        pass
    return state


def materializations(before: dict[str, list], now: dict[str, list]) -> list[AssetMaterialization]:
    events = []
    for name, (rows, latest) in now.items():
        if before.get(name) == [rows, latest] or rows is None:
            continue
        metadata = {"dagster/row_count" if name != "edge_iiot_stream" else "messages": rows}
        if latest is not None:
            metadata["latest"] = str(latest)
        events.append(
            AssetMaterialization(
                asset_key=name, description="reported by federated_models_sensor", metadata=metadata
            )
        )
    return events


def evaluate(context: SensorEvaluationContext, flead: FleadResource, per_run: int) -> SensorResult:
    cursor = Cursor.parse(context.cursor)
    with flead.connect(connect_timeout=5) as conn:
        new = [
            row[0]
            for row in conn.execute(
                "SELECT global_version FROM federated_models WHERE global_version > %s"
                " ORDER BY global_version",
                (cursor.version,),
            )
        ]
        state = external_state(flead, conn)
    known = set(context.instance.get_dynamic_partitions(global_versions.name))
    to_add = [str(v) for v in new if str(v) not in known]
    events = materializations(cursor.seen, state)
    next_cursor = Cursor(new[-1] if new else cursor.version, state)
    return SensorResult(
        run_requests=[run_request(chunk) for chunk in chunks(new, per_run)],
        dynamic_partitions_requests=([global_versions.build_add_request(to_add)] if to_add else []),
        asset_events=events,
        cursor=next_cursor.dumps(),
        skip_reason=None if new else f"no global version after {cursor.version}",
    )


def build_federated_models_sensor(settings: Settings):
    @sensor(
        name="federated_models_sensor",
        description="New federated_models rows → evaluation partitions and runs; runless"
        " materializations of the streaming tables and the raw topic.",
        asset_selection=EVALUATION_ASSETS,
        minimum_interval_seconds=settings.evaluation_sensor_interval_s,
        default_status=DefaultSensorStatus.RUNNING,
    )
    def federated_models_sensor(
        context: SensorEvaluationContext, flead: FleadResource
    ) -> SensorResult:
        return evaluate(context, flead, settings.evaluation_max_versions_per_run)

    return federated_models_sensor
