"""Evaluation throughput: held-out readings scored per second for one global version, with
Spark (the ``model_evaluations`` asset's code path) beside a plain pandas/numpy evaluation of
the same readings, and the time to backfill 20 versions.

Both engines do the whole job for one version, alternating over several rounds: read the
readings topic, keep the held-out devices' readings, compute their time-ordered features
(``streaming.learner.score`` per device, messages of ``replay_batch``), decide with the
version's detector, and write the per-sample
rows and the summary to PostgreSQL (a fresh benchmark database; the readings topic is only read).
The Spark session is started once and kept warm: its start-up is reported separately.

The backfill is timed as Dagster runs it, in a new process (`dagster asset materialize
--partition-range`, i.e. ``BackfillPolicy.single_run``: one run, one Spark session, one read
for all 20 versions), beside one single-version run in a new process: 20 of those is what one
run per version would cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import uuid
from urllib.parse import urlsplit

import pandas as pd
import psycopg
from confluent_kafka import Consumer, TopicPartition
from psycopg.types.json import Jsonb

from benchmarks.common import interleaved, summarise, write_result
from flead import db, kafka
from flead.config import REPO_ROOT, Settings, load_settings
from flead_assets.lib import evaluation, spark_jobs
from flead_assets.resources.spark import spark_config
from streaming.learner import Detector, GlobalParams, LearnerConfig
from streaming.messages import InvalidMessage, decode_readings

# --- setup -----------------------------------------------------------------------------------


def _url(settings: Settings, name: str) -> str:
    return urlsplit(settings.database_url)._replace(path=f"/{name}").geturl()


def create_database(settings: Settings) -> str:
    name = f"flead_bench_{uuid.uuid4().hex[:8]}"
    url = db.create_database(settings, name)  # as the administrator, owned by the app role
    db.apply_schema(url)
    return url


def drop_database(settings: Settings, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    db.drop_database(settings, name)


_COPIED = (
    "global_version, aggregation_round, num_devices, accuracy, weights, bias, strategy,"
    " created_at, hidden, threshold, normal_threshold, label_source, detector, server_state"
)


def copy_versions(source_url: str, target_url: str, count: int) -> list[GlobalParams]:
    """The first ``count`` global versions the FedAvg service stored (real models)."""
    with psycopg.connect(source_url) as conn:
        rows = conn.execute(
            f"SELECT {_COPIED} FROM federated_models ORDER BY global_version LIMIT %s",
            (count,),
        ).fetchall()
    if len(rows) < count:
        raise SystemExit(
            f"need {count} global versions in federated_models, found {len(rows)}:"
            " run `make run` and let the FedAvg service make them first"
        )
    with psycopg.connect(target_url) as conn, conn.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO federated_models ({_COPIED}) VALUES ({', '.join(['%s'] * 14)})",
            [(*r[:-1], Jsonb(r[-1])) for r in rows],
        )
        found = evaluation.load_global_params(conn, [r[0] for r in rows])
    return found


def spark_session(settings: Settings):
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder
    for key, value in spark_config(settings).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


# --- the two engines -------------------------------------------------------------------------


def pandas_readings(settings: Settings) -> pd.DataFrame:
    """Every reading of the topic with a plain consumer, validated like the streaming jobs."""
    topic = settings.topics.readings
    consumer = Consumer(kafka.client_config(settings, "admin", **{"group.id": "flead-bench-eval"}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {}
        assignment = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
                assignment.append(TopicPartition(topic, p, low))
        consumer.assign(assignment)
        rows: list[tuple] = []
        while ends:
            for message in consumer.consume(10_000, timeout=1.0):
                if message.error() is not None:
                    continue
                if message.offset() + 1 >= ends.get(message.partition(), 0):
                    ends.pop(message.partition(), None)
                try:
                    readings = decode_readings(message.value())
                except InvalidMessage:
                    continue
                rows.extend(
                    (r.device_id, r.timestamp, list(r.channels), list(r.values), r.label)
                    for r in readings
                )
    finally:
        consumer.close()
    frame = pd.DataFrame(rows, columns=["device_id", "ts", "channels", "values", "label"])
    return frame.drop_duplicates(["device_id", "ts"])


def pandas_evaluate(settings: Settings, gm: GlobalParams, url: str) -> int:
    readings = pandas_readings(settings)
    held = readings[
        evaluation.held_out_mask(readings["device_id"], settings.holdout_fraction, settings.seed)
    ]
    config = LearnerConfig.from_settings(settings)
    rows = evaluation.fleet_rows(held, config, settings.replay_batch)
    evaluated = evaluation.evaluate(rows, Detector(gm, config))
    with psycopg.connect(url) as conn:
        evaluation.store(conn, evaluated)
    return len(rows)


def spark_evaluate(spark, settings: Settings, gm: GlobalParams, url: str) -> int:
    rows = spark_jobs.held_out_rows_of_topic(spark, settings)
    spark_jobs.evaluate_versions(
        spark, rows, [gm.version], url, LearnerConfig.from_settings(settings)
    )
    return len(rows)


def rate(run) -> float:
    started = time.perf_counter()
    samples = run()
    return samples / (time.perf_counter() - started)


# --- backfill in new processes ---------------------------------------------------------------


def cli_materialize(settings: Settings, url: str, home: str, partition_args: list[str]) -> float:
    env = {
        **os.environ,
        "DAGSTER_HOME": home,
        "FLEAD_DATABASE_URL": url,
        "FLEAD_HOLDOUT_FRACTION": str(settings.holdout_fraction),
    }
    argv = [
        str(REPO_ROOT / ".venv" / "bin" / "dagster"),
        "asset",
        "materialize",
        "-m",
        "flead_assets.definitions",
        "--select",
        "model_evaluations,model_evaluation_summaries",
        *partition_args,
    ]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=home, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"dagster asset materialize failed:\n{done.stderr[-3000:]}")
    return seconds


def backfill_times(settings: Settings, url: str, versions: list[GlobalParams]) -> dict:
    from dagster import DagsterInstance

    keys = [str(v.version) for v in versions]
    with tempfile.TemporaryDirectory(prefix="flead-bench-dagster-") as home:
        with DagsterInstance.from_config(home) as instance:
            instance.add_dynamic_partitions("global_versions", keys)
        one = cli_materialize(settings, url, home, ["--partition", keys[0]])
        span = f"{keys[0]}...{keys[-1]}"
        many = cli_materialize(settings, url, home, ["--partition-range", span])
    with psycopg.connect(url) as conn:
        stored = conn.execute("SELECT count(*) FROM model_evaluation_summaries").fetchone()[0]
    assert stored == len(keys), f"{stored} summaries after backfilling {len(keys)} versions"
    return {
        "versions": len(keys),
        "single_run_backfill_s": many,
        "one_version_run_s": one,
        "one_run_per_version_estimate_s": one * len(keys),
        "speedup": one * len(keys) / many,
    }


# --- main ------------------------------------------------------------------------------------


def run(settings: Settings, rounds: int, backfill_versions: int) -> dict:
    url = create_database(settings)
    try:
        versions = copy_versions(settings.database_url, url, backfill_versions)
        bench = dataclasses.replace(settings, database_url=url)
        started = time.perf_counter()
        spark = spark_session(bench)
        spark_start = time.perf_counter() - started
        gm = versions[-1]
        samples = {"spark": spark_evaluate(spark, bench, gm, url)}  # warm-up, and the count
        samples["pandas"] = pandas_evaluate(bench, gm, url)
        assert samples["spark"] == samples["pandas"], samples
        rates = summarise(
            interleaved(
                {
                    "spark": lambda: rate(lambda: spark_evaluate(spark, bench, gm, url)),
                    "pandas_numpy": lambda: rate(lambda: pandas_evaluate(bench, gm, url)),
                },
                rounds,
            )
        )
        spark.stop()
        backfill = backfill_times(bench, url, versions)
    finally:
        drop_database(settings, url)
    return {
        "unit": "held-out readings/s, one version: read → features → score → store",
        "held_out_samples": samples["spark"],
        "holdout_fraction": settings.holdout_fraction,
        "rounds": rounds,
        "rates": rates,
        "ratio_spark_to_pandas": rates["spark"]["median"] / rates["pandas_numpy"]["median"],
        "spark_session_start_s": spark_start,
        "spark_master": settings.spark_master,
        "backfill": backfill,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--versions", type=int, default=20, help="versions to backfill")
    args = parser.parse_args(argv)
    result = run(load_settings(), args.rounds, args.versions)
    path = write_result("evaluation_throughput", result)
    rates, backfill = result["rates"], result["backfill"]
    spark, plain = rates["spark"]["median"], rates["pandas_numpy"]["median"]
    print(
        f"one version, {result['held_out_samples']:,} held-out readings: Spark {spark:,.0f}/s,"
        f" pandas/numpy {plain:,.0f}/s; backfill of {backfill['versions']} versions in one run"
        f" {backfill['single_run_backfill_s']:.1f} s vs"
        f" ~{backfill['one_run_per_version_estimate_s']:.0f} s one run per version → {path}"
    )
    return result


if __name__ == "__main__":
    main()
