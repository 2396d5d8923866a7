"""Fixtures for the integration tests: the real PostgreSQL and Kafka broker.

They are started through the same code as ``flead up`` when they are not running and reused
when they are. Each test run works in its own database and on its own topics, so a developer's
running system is never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import psycopg
import pytest

from flead import db, services
from flead.config import Settings, load_settings, namespaced, to_env


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def postgres(base_settings: Settings) -> Settings:
    services.ensure_postgres(base_settings)
    return base_settings


@pytest.fixture(scope="session")
def kafka_broker(base_settings: Settings) -> Settings:
    services.ensure_kafka(base_settings)
    return base_settings


def _with_database(settings: Settings, name: str) -> str:
    return urlsplit(settings.database_url)._replace(path=f"/{name}").geturl()


@contextlib.contextmanager
def fresh_database(settings: Settings) -> Iterator[str]:
    """A new, empty database on the real server, dropped afterwards."""
    name = f"flead_test_{uuid.uuid4().hex[:10]}"
    admin = _with_database(settings, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(settings, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_database(postgres: Settings) -> Iterator[str]:
    with fresh_database(postgres) as url:
        yield url


@pytest.fixture
def database(empty_database: str) -> str:
    db.apply_schema(empty_database)
    return empty_database


def isolated(base: Settings, database_url: str, **overrides: object) -> Settings:
    """``base`` with its own topics (created), consumer groups and database."""
    from flead import kafka

    test_settings = dataclasses.replace(
        namespaced(base, f"test-{uuid.uuid4().hex[:8]}"), database_url=database_url, **overrides
    )
    kafka.ensure_topics(test_settings)
    return test_settings


@pytest.fixture
def settings(kafka_broker: Settings, database: str) -> Settings:
    """Settings for one test: its own topics and its own migrated database."""
    return isolated(kafka_broker, database)


def settings_env(settings: Settings) -> dict[str, str]:
    """The FLEAD_* variables that make a subprocess see ``settings``."""
    return to_env(settings)
