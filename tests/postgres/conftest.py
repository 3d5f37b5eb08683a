"""Fixtures of the PostgreSQL race tests: two independent stores (two pools) on one database.

Every test uses fresh session ids, so the process-wide ``pg_url`` database is shared
without resets; stores are created per test on the test's own event loop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from lash_core.inputs import NextTurnIngress, TextItem, TurnInput, TurnInputDraft
from lash_core.leases import Acquired, Lease, LeaseOwner
from lash_core.store.postgres import PostgresStore

pytestmark = pytest.mark.postgres
T = TypeVar("T")


@pytest_asyncio.fixture
async def stores(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    a, b = PostgresStore(pg_url, pool_size=4), PostgresStore(pg_url, pool_size=4)
    await asyncio.gather(a.start(), b.start())
    try:
        yield a, b
    finally:
        await asyncio.gather(a.close(), b.close())


def sid(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def owner(name: str) -> LeaseOwner:
    return LeaseOwner(owner_id=name, incarnation_id=f"{name}-1")


def draft(session_id: str, text: str = "hi", *, source_key: str | None = None) -> TurnInputDraft:
    return TurnInputDraft(
        session_id=session_id,
        source_key=source_key,
        ingress=NextTurnIngress(),
        input=TurnInput(items=[TextItem(text=text)]),
    )


async def together(*calls: Callable[[], Awaitable[T]]) -> list[T | BaseException]:
    """Run the calls so they hit the database at the same moment (a barrier gate)."""
    gate = asyncio.Barrier(len(calls))

    async def run(call: Callable[[], Awaitable[T]]) -> T:
        await gate.wait()
        return await call()

    return await asyncio.gather(*(run(c) for c in calls), return_exceptions=True)


def acquired(result: Any) -> Lease:
    assert isinstance(result, Acquired), result
    return result.lease


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` with a deadline (for states no event announces)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.02)
