"""Transactions that open with a prepared statement sent together with ``BEGIN``, and
close with their last statement sent together with ``COMMIT``.

``Database.transaction(opening)`` sends ``BEGIN; EXECUTE ...`` as one message and
``Connection.execute_and_commit`` sends ``EXECUTE ...; COMMIT``; these tests
read libpq's protocol trace to count what actually crosses the wire, and check commit,
rollback, literal quoting and the re-preparing that psycopg's ``DEALLOCATE ALL`` (after
every rollback it sends) makes necessary.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from lash_core.commit import FinalTurn, RuntimeCommit
from lash_core.errors import LeaseLost, StoreError
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
        # One input's admission, the turn start and the commit send their last statement
        # with the COMMIT; a batch (its arrays of documents bind in binary) commits alone.
        finals = [q for q in queries if q.endswith('; COMMIT"')]
        assert len(finals) == 3 and all(q.startswith('"EXECUTE lash_f') for q in finals)
        assert queries.count('"COMMIT"') == 1, queries
    finally:
        await store.close()


async def _traced(db: Database, tmp_path: Path, work: Callable[[], Awaitable[None]]) -> list[str]:
    """The simple-protocol queries ``work`` sends on the fixture's one connection."""
    trace = tmp_path / "final.trace"
    with trace.open("w") as out:
        async with db.single() as conn:
            conn._raw.pgconn.trace(out.fileno())
        try:
            await work()
        finally:
            async with db.single() as conn:
                conn._raw.pgconn.untrace()
    sent = [line.split("\t") for line in trace.read_text().splitlines()]
    return [f[4].strip() for f in sent if len(f) > 4 and f[1] == "F" and f[3] == "Query"]


async def test_a_last_statement_carries_the_commit(db: Database, tmp_path: Path) -> None:
    """``execute_and_commit``: the statement and ``COMMIT`` in one message; its rows come
    back; what the transaction wrote before it is committed with it; values of every kind
    arrive as sent, however they are quoted."""
    table = await _scratch(db)
    final = text(
        f"WITH w AS (INSERT INTO {table} VALUES (:v) RETURNING v) SELECT w.v,"
        " CAST(:n AS bigint) AS n, :b AS b, CAST(:l AS text[]) AS l, :none AS none FROM w"
    )
    tricky = "it's a \\ % %(s)s 'quoted' \"value\""
    params = {"v": tricky, "n": -7, "b": True, "l": ["a,b", 'q"', ""], "none": None}
    rows: list[Any] = []

    async def work() -> None:
        async with db.transaction(Opening(_ECHO, ("x",), "k")) as conn:
            await conn.execute(text(f"INSERT INTO {table} VALUES ('before')"))
            rows.extend(await conn.execute_and_commit(final, params))

    queries = await _traced(db, tmp_path, work)
    assert [tuple(r) for r in rows] == [(tricky, -7, True, ["a,b", 'q"', ""], None)]
    # The first time: prepared inside the transaction, just before it is sent.
    assert queries[-2].startswith('"PREPARE lash_f') and queries[-1].endswith('; COMMIT"')
    assert '"COMMIT"' not in queries
    assert await _rows(db, table) == sorted(["before", tricky])
    queries = await _traced(db, tmp_path, work)
    assert len(queries) == 2, queries  # prepared now


async def test_a_failed_last_statement_commits_nothing(db: Database) -> None:
    """If the statement fails, its ``COMMIT`` never runs: the whole transaction rolls back,
    and the connection goes on (psycopg's ``DEALLOCATE ALL`` after the rollback included)."""
    table = await _scratch(db)
    async with db.single() as conn:
        await conn.execute(text(f"CREATE UNIQUE INDEX ON {table} (v)"))
    insert = text(f"INSERT INTO {table} VALUES (:v)")
    for value in ("one", "two"):
        async with db.transaction(Opening(_ECHO, ("x",), "k")) as conn:
            await conn.execute_and_commit(insert, {"v": value})
    with pytest.raises(StoreError):
        try:
            async with db.transaction(Opening(_ECHO, ("x",), "k")) as conn:
                await conn.execute(text(f"INSERT INTO {table} VALUES ('lost')"))
                await conn.execute_and_commit(insert, {"v": "one"})
        except psycopg.Error as exc:
            raise StoreError(str(exc)) from exc
    for value in ("three", "four"):
        async with db.transaction(Opening(_ECHO, ("x",), "k")) as conn:
            await conn.execute_and_commit(insert, {"v": value})
    assert await _rows(db, table) == ["four", "one", "three", "two"]


async def test_a_last_statement_survives_lost_and_leftover_prepared_statements(
    db: Database,
) -> None:
    """Prepared again after psycopg deallocates everything behind the store's back (its own
    transaction's rollback: the opening finds its statement gone and starts over), and
    under a new name when the store forgets statements the server still holds:
    ``PREPARE`` inside the transaction never meets an old name."""
    table = await _scratch(db)
    insert = text(f"INSERT INTO {table} VALUES (:v)")

    async def final(value: str) -> None:
        async with db.transaction(Opening(_ECHO, ("x",), "k")) as conn:
            await conn.execute_and_commit(insert, {"v": value})

    await final("a")
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:  # psycopg's transaction: rollback, DEALLOCATE ALL
            await conn.execute(text(f"INSERT INTO {table} VALUES ('lost')"))
            raise RuntimeError
    await final("b")
    async with db.single() as conn:
        conn._raw.forget_prepared()  # the server still holds them
    await final("c")
    async with db.transaction() as conn:  # no opening: a plain statement, then COMMIT
        await conn.execute_and_commit(insert, {"v": "d"})
    assert await _rows(db, table) == ["a", "b", "c", "d"]
