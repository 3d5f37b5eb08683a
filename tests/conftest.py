"""Shared fixtures: real services for integration tests (see ``tests/services.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import services


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this pytest process (plain ``postgresql://``)."""
    with services.fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def amqp_url() -> str:
    return services.base_amqp_url()


@pytest.fixture
def namespace() -> str:
    """A unique ``LASH_NAMESPACE`` so tests sharing one broker never see each other."""
    return services.unique_namespace()
