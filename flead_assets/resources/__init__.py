"""Resources: FLEAD's settings, Spark, and the streaming services."""

from __future__ import annotations

from flead.config import Settings
from flead_assets.resources.settings import FleadResource
from flead_assets.resources.spark import pyspark_resource
from flead_assets.resources.streaming import StreamingServiceResource, streaming_resources

__all__ = ["FleadResource", "StreamingServiceResource", "build_resources"]


def build_resources(settings: Settings, flead: FleadResource | None = None) -> dict[str, object]:
    flead = flead or FleadResource()
    return {"flead": flead, "pyspark": pyspark_resource(settings), **streaming_resources(flead)}
