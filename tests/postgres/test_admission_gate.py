"""The admission gate: every admission waits for a lease holder's row lock BEFORE it draws
its ``enqueue_seq`` (and, before a session has a lease row, for a first lease claim).

This is what lets a holder trust what it reads after locking the lease row: admissions it
does not see have not drawn their seq yet (so next-turn claims can stop at the earliest
pending command) and will commit, and wake a drain, only after the holder's transaction
(so a final commit may release an idle session's lease without a re-check).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import pytest

from lash_core.commands import CommandDraft, ResetSession
from lash_core.leases import Acquired
from lash_core.store.postgres import PostgresStore
from tests.postgres.conftest import acquired, draft, owner, sid, wait_until

pytestmark = pytest.mark.postgres


@asynccontextmanager
async def holding(url: str, sql: str, session_id: str) -> AsyncIterator[psycopg.AsyncConnection]:
    """A transaction on its own connection that holds ``sql``'s lock until the block ends."""
    conn = await psycopg.AsyncConnection.connect(url)
    try:
        async with conn.transaction():
            await conn.execute(sql, (session_id,))
            yield conn
    finally:
        await conn.close()


async def waiting_on_locks(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def last_seq(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM lash_enqueue_seq"
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_admissions_wait_for_the_lease_row_lock_before_drawing_a_seq(
    stores: tuple[PostgresStore, PostgresStore], pg_url: str
) -> None:
    store, _ = stores
    s = sid()
    lease = acquired(await store.try_claim_lease(s, owner("A"), 60_000))
    async with holding(pg_url, "SELECT 1 FROM lash_leases WHERE session_id = %s FOR UPDATE", s):
        before = await last_seq(pg_url)
        admit = asyncio.create_task(store.enqueue_input(draft(s, "x")))
        command = asyncio.create_task(
            store.enqueue_command(
                CommandDraft(session_id=s, idempotency_key="c", command=ResetSession())
            )
        )

        async def both_waiting() -> bool:
            return await waiting_on_locks(pg_url) >= 2

        await wait_until(both_waiting)
        assert not admit.done() and not command.done()
        assert await last_seq(pg_url) == before  # no seq drawn behind the gate
    admitted, queued = await asyncio.wait_for(asyncio.gather(admit, command), 10)
    assert admitted.record.enqueue_seq > before and queued.command.enqueue_seq > before
    await store.release_lease(lease.fence())


async def test_before_a_lease_row_exists_admission_waits_for_a_first_claim(
    stores: tuple[PostgresStore, PostgresStore], pg_url: str
) -> None:
    store, _ = stores
    s = sid()
    async with holding(pg_url, "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", s):
        before = await last_seq(pg_url)
        admit = asyncio.create_task(store.enqueue_input(draft(s, "x")))

        async def waiting() -> bool:
            return await waiting_on_locks(pg_url) >= 1

        await wait_until(waiting)
        assert not admit.done()
        assert await last_seq(pg_url) == before
    admitted = await asyncio.wait_for(admit, 10)
    assert admitted.record.enqueue_seq > before


async def test_admission_writes_a_free_lease_row_so_a_first_claim_needs_no_advisory_lock(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    store, _ = stores
    one, two = sid(), sid()
    await store.enqueue_inputs([draft(one, "a"), draft(one, "b"), draft(two, "c")])
    await store.enqueue_input(draft(single := sid(), "d"))
    for s in (one, two, single):
        row = await store.read_lease(s)
        assert row is not None and row.owner is None and row.lease_token is None
        assert row.fencing_token == 0 and not row.is_live(await store.now_ms())
    sent: list[str] = []
    store.database.add_listener(sent.append)
    try:
        start = await store.acquire_and_start_turn(one, owner("a"), 60_000)
    finally:
        store.database.remove_listener(sent.append)
    assert isinstance(start.lease, Acquired) and start.lease.lease.fencing_token == 1
    assert start.turn is not None and start.turn.claim is not None
    assert [r.input_id for r in start.turn.claim.inputs] == [
        r.input_id for r in await store.list_inputs(one)
    ]
    assert not [q for q in sent if "advisory" in q], sent
    assert len(sent) == 3


async def test_a_first_claim_racing_an_admission_waits_and_locks_its_free_lease_row(
    stores: tuple[PostgresStore, PostgresStore], pg_url: str
) -> None:
    """The claim reads no row (the admission's is not committed), so it takes the advisory
    lock, which the admission holds shared until it commits; then it reads the row."""
    store, _ = stores
    s = sid()
    conn = await psycopg.AsyncConnection.connect(pg_url)
    try:
        async with conn.transaction():
            # What an admission of the session's first input holds until it commits.
            await conn.execute("SELECT pg_advisory_xact_lock_shared(hashtextextended(%s, 0))", (s,))
            await conn.execute("INSERT INTO lash_leases (session_id) VALUES (%s)", (s,))
            claim = asyncio.create_task(store.try_claim_lease(s, owner("a"), 60_000))
            start = asyncio.create_task(store.acquire_and_start_turn(s, owner("b"), 60_000))

            async def both_waiting() -> bool:
                return await waiting_on_locks(pg_url) >= 2

            await wait_until(both_waiting)
            assert not claim.done() and not start.done()
    finally:
        await conn.close()
    claimed, started = await asyncio.wait_for(asyncio.gather(claim, start), 10)
    winners = [r for r in (claimed, started.lease) if isinstance(r, Acquired)]
    assert len(winners) == 1 and winners[0].lease.fencing_token == 1
