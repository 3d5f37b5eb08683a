"""Driver errors leave the store as lash_core errors (never psycopg/SQLAlchemy types)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from lash_core.commit import RuntimeCommit
from lash_core.errors import HeadRevisionConflict, RetryableStoreError, StoreUnavailable
from lash_core.store.postgres import PostgresStore
from tests.postgres.conftest import acquired, owner, sid

pytestmark = pytest.mark.postgres


async def test_unreachable_database_is_store_unavailable() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/postgres", migrate=False)
    with pytest.raises(StoreUnavailable):
        await store.now_ms()
    await store.close()


async def test_lock_timeout_is_retryable_and_a_head_conflict_in_commit(pg_url: str) -> None:
    store = PostgresStore(pg_url, pool_size=2, lock_timeout_ms=200)
    await store.start()
    try:
        s = sid()
        lease = acquired(await store.try_claim_lease(s, owner("A"), 60_000))
        with psycopg.connect(pg_url) as blocker:
            blocker.execute("SELECT 1 FROM lash_leases WHERE session_id = %s FOR UPDATE", (s,))
            with pytest.raises(RetryableStoreError):
                await store.renew_lease(lease.fence(), 60_000)
            with pytest.raises(HeadRevisionConflict):
                await store.commit(RuntimeCommit(session_id=s, fence=lease.fence()))
            blocker.rollback()
        result = await store.commit(RuntimeCommit(session_id=s, fence=lease.fence()))
        assert result.head_revision == 1
    finally:
        await asyncio.wait_for(store.close(), 10)
