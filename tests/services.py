"""Where the tests find PostgreSQL and RabbitMQ.

Order: the ``LASH_TEST_DATABASE_URL`` / ``LASH_TEST_AMQP_URL`` environment variables, then
the service defaults (``LASH_DATABASE_URL`` / ``LASH_AMQP_URL`` or the contract defaults),
then a testcontainers container when a Docker engine answers. If none works the test is
skipped - except under ``CI=true``, where a missing service fails the run.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-not-found,import-untyped]

        docker.from_env().ping()
        return True
    except Exception:
        return False


def missing(what: str) -> None:
    msg = f"{what} is not reachable and no Docker engine is available"
    if in_ci():
        pytest.fail(f"{msg} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(msg)


_containers: list[object] = []


def base_database_url() -> str:
    url = os.environ.get("LASH_TEST_DATABASE_URL") or os.environ.get(
        "LASH_DATABASE_URL", DEFAULT_DATABASE_URL
    )
    if _reachable(url, 5432):
        return url
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16-alpine", driver=None)
        container.start()
        _containers.append(container)
        return str(container.get_connection_url())
    missing(f"PostgreSQL at {url}")
    raise AssertionError("unreachable")


def base_amqp_url() -> str:
    url = os.environ.get("LASH_TEST_AMQP_URL") or os.environ.get("LASH_AMQP_URL", DEFAULT_AMQP_URL)
    if _reachable(url, 5672):
        return url
    if _docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13-alpine")
        container.start()
        _containers.append(container)
        host = container.get_container_host_ip()
        port = container.get_exposed_port(5672)
        return f"amqp://guest:guest@{host}:{port}/"
    missing(f"RabbitMQ at {url}")
    raise AssertionError("unreachable")


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


@contextmanager
def fresh_database(prefix: str = "lash_t") -> Iterator[str]:
    """Create an empty database for one test run and drop it afterwards.

    Each pytest process (and each developer running tests at the same time) gets its own
    database, so parallel runs never see each other's rows.
    """
    import psycopg

    base = base_database_url()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(base, name)
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def unique_namespace(prefix: str = "lasht") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
