"""The Kubernetes manifests in deploy/ (they cannot be applied here: no cluster, no operators):
every file parses as YAML, every document is a Kubernetes object, and what the manifests say
about the job matches the project (the same job file, topics, users and settings)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flead.config import REPO_ROOT, Settings
from flead.kafka import USERS

DEPLOY = REPO_ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(kind: str) -> list[dict]:
    return [d for p in MANIFESTS for d in documents(p) if d["kind"] == kind]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_is_kubernetes_yaml(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc, dict), doc
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert doc["metadata"].get("name"), doc


def test_helm_values_parse() -> None:
    values = yaml.safe_load((DEPLOY / "dagster-values.yaml").read_text())
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"][-1] == "flead_assets.definitions"
    assert (REPO_ROOT / "flead_assets" / "definitions.py").exists()


def test_flink_deployment_runs_the_projects_job_file() -> None:
    (flink,) = by_kind("FlinkDeployment")
    args = flink["spec"]["job"]["args"]
    assert args[args.index("-py") + 1].endswith("streaming/flink_job.py")
    assert (REPO_ROOT / "streaming" / "flink_job.py").exists()
    config = flink["spec"]["flinkConfiguration"]
    assert config["restart-strategy.type"] == "failure-rate"


def test_strimzi_cluster_matches_cluster_mode() -> None:
    settings = Settings()
    topics = {t["metadata"]["name"]: t["spec"] for t in by_kind("KafkaTopic")}
    assert set(topics) == set(settings.topics.all())
    assert all(spec["replicas"] == 3 for spec in topics.values())
    assert all(spec["config"]["min.insync.replicas"] == 2 for spec in topics.values())
    assert {u["metadata"]["name"] for u in by_kind("KafkaUser")} == set(USERS)
    (pool,) = by_kind("KafkaNodePool")
    assert pool["spec"]["replicas"] == 3


def test_services_run_the_projects_modules() -> None:
    commands = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    assert set(commands) == {"fedavg", "anomaly-sink"}
    for deployment in commands.values():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        module = container["command"][-1]
        assert (REPO_ROOT / (module.replace(".", "/") + ".py")).exists(), module


def test_cluster_mode_is_settings_only() -> None:
    from flead.config import load_settings

    local = load_settings({})
    assert (local.deploy, local.kafka_replication, local.spark_master) == ("local", 1, "local[*]")
    clustered = load_settings({"FLEAD_DEPLOY": "cluster"})
    assert clustered.kafka_replication == 3 and clustered.kafka_min_insync_replicas == 2
    assert len(clustered.kafka_bootstrap.split(",")) == 3
    assert clustered.spark_master.startswith("spark://")
    # A variable still wins over the cluster default.
    assert (
        load_settings({"FLEAD_DEPLOY": "cluster", "FLEAD_KAFKA_REPLICATION": "2"}).kafka_replication
        == 2
    )
    with pytest.raises(ValueError, match="FLEAD_DEPLOY"):
        load_settings({"FLEAD_DEPLOY": "k8s"})


def test_cluster_mode_submits_the_same_job_file() -> None:
    from flead import services
    from flead.config import load_settings

    local = services.streaming_commands(load_settings({}))
    clustered = services.streaming_commands(load_settings({"FLEAD_DEPLOY": "cluster"}))
    assert local["flink-job"][-2:] == ["-m", "streaming.flink_job"]
    assert clustered["flink-job"][-2:] == ["flead.cluster", "run-job"]
    assert {k: v for k, v in local.items() if k != "flink-job"} == {
        k: v for k, v in clustered.items() if k != "flink-job"
    }
