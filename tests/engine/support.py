"""Shared fixtures and helpers of the engine and facade tests.

Every test runs against both stores: the in-memory double (system clock, so lease TTLs
are real time like on PostgreSQL) and a :class:`PostgresStore` on this process's fresh
database (``pg_url``). Session ids are unique per test, so no reset is needed and tests
never see each other's rows.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from lash_core.engine.agent import AgentConfig
from lash_core.leases import LeaseOwner
from lash_core.providers.echo import EchoProvider
from lash_core.store.base import Store
from lash_core.store.memory import InMemoryStore
from lash_core.tools import default_registry

BACKENDS = ["memory", "postgres"]


@pytest_asyncio.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield InMemoryStore()
        return
    from lash_core.store.postgres import PostgresStore

    url: str = request.getfixturevalue("pg_url")
    pg = PostgresStore(url, pool_size=4, max_overflow=8)
    await pg.start()
    try:
        yield pg
    finally:
        await pg.close()


def new_session_id(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def owner(name: str) -> LeaseOwner:
    return LeaseOwner(owner_id=name, incarnation_id=f"{name}-{uuid.uuid4().hex[:6]}")


def agent(delay_ms: int = 0, **kwargs: Any) -> AgentConfig:
    provider = kwargs.pop("provider", None) or EchoProvider(delay_ms=delay_ms)
    tools = kwargs.pop("tools", None) or default_registry()
    return AgentConfig(provider=provider, tools=tools, **kwargs)


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, interval_s: float = 0.02
) -> None:
    """Poll ``predicate`` until true; fail after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)
