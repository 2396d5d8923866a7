"""FLEAD's settings as a Dagster resource, so assets and sensors read ``flead.config``."""

from __future__ import annotations

import os
from typing import Any

import psycopg
from dagster import ConfigurableResource

from flead.config import Settings, load_settings, to_env


class FleadResource(ConfigurableResource):
    """``flead.config.load_settings()`` of the process, with ``overrides`` (``FLEAD_*``
    variables) laid over ``os.environ``.

    Empty ``overrides`` (the code location's default) means the settings the webserver and
    daemon were started with; tests pass their own database and topics here. (Not named
    ``env``: a config dict with that key means "read an environment variable" to Dagster.)
    """

    overrides: dict[str, str] = {}  # noqa: RUF012 - a pydantic field, copied per instance

    @property
    def settings(self) -> Settings:
        return load_settings({**os.environ, **self.overrides})

    def connect(self, **kwargs: Any) -> psycopg.Connection:
        return psycopg.connect(self.settings.database_url, **kwargs)

    @classmethod
    def for_settings(cls, settings: Settings) -> FleadResource:
        return cls(overrides=to_env(settings))
