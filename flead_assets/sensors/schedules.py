"""The hourly analytics schedule: each hour, the hour that just ended (live data)."""

from __future__ import annotations

from dagster import DefaultScheduleStatus, build_schedule_from_partitioned_job, define_asset_job

from flead.config import Settings


def build_hourly_schedule(settings: Settings, analytics_asset):
    job = define_asset_job(
        "hourly_analytics_job",
        selection=[analytics_asset.key],
        description="hourly_device_analytics for one hour (or a range, in one Spark run).",
    )
    # A few minutes past the hour, so readings that arrive late still land in their hour.
    schedule = build_schedule_from_partitioned_job(
        job,
        minute_of_hour=settings.analytics_schedule_minute,
        default_status=DefaultScheduleStatus.RUNNING,
    )
    return job, schedule
