"""Transactions that open with a prepared statement sent together with ``BEGIN``.

``Database.transaction(opening)`` sends ``BEGIN; EXECUTE ...`` as one message; these tests
read libpq's protocol trace to count what actually crosses the wire, and check commit,
rollback, literal quoting and the re-preparing that psycopg's ``DEALLOCATE ALL`` (after
every rollback it sends) makes necessary.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from lash_core.commit import FinalTurn, RuntimeCommit
from lash_core.errors import LeaseLost
from lash_core.outcomes import AssistantMessageFinish, Finished
from lash_core.store.postgres import PostgresStore
from lash_core.store.postgres.db import Database, Opening, Prepared, prepared, text
from tests.postgres.conftest import acquired, draft, owner, sid

pytestmark = pytest.mark.postgres

_ECHO = Prepared("lash_test_echo", ("text",), "SELECT $1::text AS value, 1 AS one")


@pytest_asyncio.fixture
async def db(stores: tuple[PostgresStore, PostgresStore], pg_url: str) -> AsyncIterator[Database]:
    """One connection (so every transaction below shares it), on the migrated database."""
    database = Database(pg_url, min_size=1, max_size=1)
    await database.open()
    try:
        yield database
    finally:
        await database.close()


async def _scratch(db: Database) -> str:
    """A temporary table on the fixture's one connection (gone when it closes)."""
    name = f"lash_test_opening_{sid('t').replace('-', '_')}"
    async with db.single() as conn:
        await conn.execute(text(f"CREATE TEMP TABLE {name} (v text)"))
    return name


async def _rows(db: Database, table: str) -> list[str]:
    async with db.single() as conn:
        return [r.v for r in await conn.execute(text(f"SELECT v FROM {table} ORDER BY v"))]


async def test_opening_commits_and_hands_over_its_result_once(db: Database) -> None:
    table = await _scratch(db)
    tricky = "it's a \\ % %(s)s 'quoted' \"value\""
    for value in ("plain", tricky):
        async with db.transaction(Opening(_ECHO, (value,), "k")) as conn:
            assert conn.take_opened("other") is None
            opened = conn.take_opened("k")
            assert opened is not None and opened.one().value == value
            assert conn.take_opened("k") is None  # once
            await conn.execute(text(f"INSERT INTO {table} VALUES (:v)"), {"v": value})
    assert await _rows(db, table) == sorted(["plain", tricky])


async def test_a_failed_block_rolls_back_and_the_next_opening_prepares_again(
    db: Database,
) -> None:
    table = await _scratch(db)

    async def open_and_insert(value: str) -> None:
        async with db.transaction(Opening(_ECHO, (value,), "k")) as conn:
            opened = conn.take_opened("k")
            assert opened is not None and opened.one().value == value
            await conn.execute(text(f"INSERT INTO {table} VALUES (:v)"), {"v": value})

    await open_and_insert("first")
    # psycopg's own transaction rolls back, and then deallocates every prepared statement
    # on the (single) connection, ours included, without telling us.
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await conn.execute(text(f"INSERT INTO {table} VALUES ('lost')"))
            raise RuntimeError
    await open_and_insert("second")  # found missing, prepared again
    with pytest.raises(ZeroDivisionError):
        async with db.transaction(Opening(_ECHO, ("a",), "k")) as conn:
            await conn.execute(text(f"INSERT INTO {table} VALUES ('lost too')"))
            raise ZeroDivisionError
    await open_and_insert("third")
    assert await _rows(db, table) == ["first", "second", "third"]


async def test_after_commit_callbacks_run_once_committed_and_never_on_rollback(
    db: Database,
) -> None:
    """Every kind of block calls its callbacks, in order, after its work is committed;
    a block that raises (and rolls back) calls none."""
    table = await _scratch(db)
    seen: list[str] = []

    def note(tag: str) -> None:
        seen.append(tag)

    async with db.transaction(Opening(_ECHO, ("x",), "k")) as conn:
        await conn.execute(text(f"INSERT INTO {table} VALUES ('opened')"))
        conn.after_commit(lambda: note("opened"))
        assert seen == []  # not before the commit
    async with db.transaction() as conn:
        await conn.execute(text(f"INSERT INTO {table} VALUES ('plain')"))
        conn.after_commit(lambda: note("plain"))
        conn.after_commit(lambda: note("plain, second"))
    async with db.single() as conn:
        await conn.execute(text(f"INSERT INTO {table} VALUES ('single')"))
        conn.after_commit(lambda: note("single"))
    for opening in ((), (Opening(_ECHO, ("y",), "k"),)):
        with pytest.raises(RuntimeError):
            async with db.transaction(*opening) as conn:
                await conn.execute(text(f"INSERT INTO {table} VALUES ('lost')"))
                conn.after_commit(lambda: note("rolled back"))
                raise RuntimeError
    assert seen == ["opened", "plain", "plain, second", "single"]
    assert await _rows(db, table) == ["opened", "plain", "single"]


async def test_begin_travels_with_the_opening_statement(db: Database, tmp_path: Path) -> None:
    """On the wire: one simple-protocol message for ``BEGIN`` and the opening statement,
    one extended-protocol exchange for the next statement, one ``COMMIT``."""
    follow = text("SELECT 1 AS one")
    async with db.transaction(Opening(_ECHO, ("warm",), "k")) as conn:
        await conn.execute(follow)  # both statements are prepared on the connection now
    trace = tmp_path / "libpq.trace"
    with trace.open("w") as out:
        async with db.single() as conn:
            conn._raw.pgconn.trace(out.fileno())
        try:
            async with db.transaction(Opening(_ECHO, ("x",), "k")) as conn:
                await conn.execute(follow)
        finally:
            async with db.single() as conn:
                conn._raw.pgconn.untrace()
    # libpq trace lines: timestamp, direction (F: sent), length, message type, contents.
    sent = [line.split("\t") for line in trace.read_text().splitlines()]
    sent = [fields[3:] for fields in sent if len(fields) > 3 and fields[1] == "F"]
    queries = [fields[1] for fields in sent if fields[0] == "Query"]
    assert len(queries) == 2, sent
    assert queries[0].strip() == "\"BEGIN; EXECUTE lash_test_echo('x')\""
    assert queries[1].strip() == '"COMMIT"'
    assert [fields[0] for fields in sent].count("Sync") == 1, sent  # the statement between


async def test_store_transactions_open_with_the_lease_lock(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    """The store's hot-path transactions work through the opening lease lock, also right
    after a rollback on the same connections (a lost fence raises inside the lock)."""
    store, _ = stores
    s = sid()
    lease = acquired(await store.try_claim_lease(s, owner("A"), 60_000))
    await store.enqueue_input(draft(s))
    start = await store.start_turn(lease.fence(), "t1")
    assert start is not None and start.claim is not None
    stale = lease.model_copy(update={"fencing_token": lease.fencing_token + 7})
    for _ in range(3):  # every pooled connection sees a rollback
        with pytest.raises(LeaseLost):
            await store.renew_lease(stale.fence(), 60_000)
    renewed = await store.renew_lease(lease.fence(), 60_000)
    assert renewed.expires_at_ms >= lease.expires_at_ms


def test_prepared_numbers_named_parameters_in_argument_order() -> None:
    """As :func:`text` reads them (``::type`` is a cast, not a parameter)."""
    stmt = prepared("x", "SELECT :b + 1, :b, CAST(:a AS text[]), '1'::int", a="text[]", b="int")
    assert stmt.source == "SELECT $2 + 1, $2, CAST($1 AS text[]), '1'::int"
    assert stmt.prepare_sql == f"PREPARE x(text[], int) AS {stmt.source}"


async def test_store_hot_path_sends_begin_with_its_first_statement(
    pg_url: str, stores: tuple[PostgresStore, PostgresStore], tmp_path: Path
) -> None:
    """Admission (one input, and a batch), turn start and commit each send ``BEGIN`` with
    their first statement: on the wire, no ``BEGIN`` goes alone."""
    store = PostgresStore(pg_url, pool_size=1, max_overflow=0)
    await store.start()
    try:
        s, other = sid(), sid()

        async def traffic() -> None:
            await store.enqueue_input(draft(s))
            await store.enqueue_inputs([draft(s), draft(other)])
            tenure = await store.acquire_and_start_turn(s, owner("A"), 60_000)
            turn = tenure.turn
            assert turn is not None and turn.claim is not None
            done = RuntimeCommit(
                session_id=s,
                fence=acquired(tenure.lease).fence(),
                turn=FinalTurn(
                    turn_id=turn.turn_id,
                    outcome=Finished(finish=AssistantMessageFinish(text="done")),
                ),
                completed_input_claims=[turn.claim.completion()],
                release_lease=True,
            )
            assert (await store.commit(done)).released

        await traffic()  # prepares every statement on the one connection
        trace = tmp_path / "libpq.trace"
        with trace.open("w") as out:
            async with store.database.single() as conn:
                conn._raw.pgconn.trace(out.fileno())
            try:
                await traffic()
            finally:
                async with store.database.single() as conn:
                    conn._raw.pgconn.untrace()
        sent = [line.split("\t") for line in trace.read_text().splitlines()]
        queries = [f[4].strip() for f in sent if len(f) > 4 and f[1] == "F" and f[3] == "Query"]
        opened = [
            re.findall(r"EXECUTE (\w+)\(", q) for q in queries if q.startswith('"BEGIN; EXECUTE ')
        ]
        assert opened == [
            ["lash_admission_gate"],
            ["lash_batch_gate"],
            # a turn start reads the session's open rows in the same message
            ["lash_lock_lease", "lash_open_rows"],
            # a commit reads its head in the same message
            ["lash_lock_lease", "lash_commit_head"],
        ], queries
        assert '"BEGIN"' not in queries
    finally:
        await store.close()
