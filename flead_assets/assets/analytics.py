"""``hourly_device_analytics``: per device and hour, statistics of the raw stream (Spark)."""

import io
from datetime import UTC, datetime, timedelta

import pandas as pd
from dagster import (
    AssetExecutionContext,
    BackfillPolicy,
    HourlyPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
)
from dagster_pyspark import LazyPySparkResource
from pyspark.sql import functions as F

from flead import kafka
from flead.config import Settings
from flead_assets.assets.external import EDGE_IIOT_STREAM
from flead_assets.lib import spark_jobs
from flead_assets.lib.readings import KafkaSlice
from flead_assets.resources.settings import FleadResource
from flead_assets.resources.spark import session

GROUP = "analytics"

_COLUMNS = ("device_id", "channel", "hour", "readings", "mean", "std", "min", "max", "anomaly_rate")


def hourly_partitions(settings: Settings) -> HourlyPartitionsDefinition:
    return HourlyPartitionsDefinition(start_date=settings.analytics_start, timezone="UTC")


def compute(spark, settings: Settings, start: datetime, end: datetime) -> tuple[pd.DataFrame, int]:
    """Rows of ``hourly_device_analytics`` for event times in ``[start, end)`` and the number
    of readings they summarise."""
    # Read beyond the window by Kafka timestamp, then keep it by event time: a batch stamped
    # with its newest reading, or a reading that reached Kafka late, still counts in its hour.
    slack = timedelta(seconds=settings.analytics_kafka_slack_s)
    source = KafkaSlice(
        settings.kafka_bootstrap,
        settings.topics.readings,
        start - slack,
        end + slack,
        client=tuple(kafka.java_client_properties(settings, "dagster").items()),
    )
    readings = spark_jobs.read(spark, source).readings
    in_window = readings.where((F.col("ts") >= F.lit(start)) & (F.col("ts") < F.lit(end)))
    stats = spark_jobs.hourly_device_stats(in_window).toPandas()
    return stats, int(stats["readings"].sum()) if len(stats) else 0


def store(conn, rows: pd.DataFrame, start: datetime, end: datetime) -> None:
    """Replace the window's rows in one transaction: a re-run (late data, a backfill) leaves
    one row per (device_id, channel, hour), and no row of a device that no longer has data
    there."""
    hours = pd.to_datetime(rows["hour"])
    if len(rows) and hours.dt.tz is None:
        hours = hours.dt.tz_localize("UTC")
    out = rows.assign(hour=hours.dt.strftime("%Y-%m-%d %H:%M:%S+00"))[list(_COLUMNS)]
    buffer = io.StringIO()
    out.to_csv(buffer, header=False, index=False, float_format="%.17g")
    with conn.transaction():
        conn.execute(
            "DELETE FROM hourly_device_analytics WHERE hour >= %s AND hour < %s", (start, end)
        )
        with conn.cursor().copy(
            f"COPY hourly_device_analytics ({', '.join(_COLUMNS)}) FROM STDIN (FORMAT csv)"
        ) as copy:
            copy.write(buffer.getvalue())


def build_hourly_device_analytics(settings: Settings):
    @asset(
        name="hourly_device_analytics",
        description="Per device, channel and event-time hour of the raw stream: readings,"
        " mean, std, min, max and anomaly rate (share of the device's labelled anomalies);"
        " a univariate reading is the channel 'value'. Spark reads the hour from"
        " Kafka by timestamp; a run over a range of hours reads the range once.",
        partitions_def=hourly_partitions(settings),
        backfill_policy=BackfillPolicy.single_run(),
        deps=[EDGE_IIOT_STREAM],
        kinds={"spark", "postgres"},
        group_name=GROUP,
        pool="spark",
        metadata={"dagster/table_name": "public.hourly_device_analytics"},
    )
    def hourly_device_analytics(
        context: AssetExecutionContext, flead: FleadResource, pyspark: LazyPySparkResource
    ) -> MaterializeResult:
        window = context.partition_time_window
        start, end = window.start.astimezone(UTC), window.end.astimezone(UTC)
        rows, readings = compute(session(pyspark), flead.settings, start, end)
        with flead.connect() as conn:
            store(conn, rows, start, end)
        context.log.info("%d rows from %d readings for [%s, %s)", len(rows), readings, start, end)
        return MaterializeResult(
            metadata={
                "dagster/row_count": len(rows),
                "readings": readings,
                "devices": int(rows["device_id"].nunique()) if len(rows) else 0,
                "hours": MetadataValue.text(f"{start:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} UTC"),
            }
        )

    return hourly_device_analytics
