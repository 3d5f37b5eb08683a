"""Fixtures of the consumer tests: a fresh database per test, cleaned-up namespaces."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aio_pika
import pytest

from tests import services
from tests.consumer.harness import delete_topology


@pytest.fixture
def db_url(pg_url: str) -> Iterator[str]:
    """An empty database of its own for one test.

    Workers of one database publish every session's events whatever their namespace, so
    end-to-end tests never share a database (``pg_url`` ensures the server is there).
    """
    with services.fresh_database("lash_c") as url:
        yield url


@pytest.fixture
async def clean_namespace(amqp_url: str, namespace: str) -> AsyncIterator[str]:
    """``namespace``, with its exchanges and queues deleted after the test."""
    yield namespace
    connection = await aio_pika.connect(amqp_url)
    try:
        await delete_topology(connection, namespace)
    finally:
        await connection.close()
