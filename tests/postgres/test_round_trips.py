"""Round trips per hot operation stay low (one transaction, few statements each).

Counts the statements the store sends (``Database.add_listener``); BEGIN/COMMIT are not
counted. A regression here means an extra network round trip on every turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from psycopg.adapt import PyFormat
from psycopg.types.array import ListBinaryDumper

from lash_core.commit import FinalTurn, RuntimeCommit
from lash_core.outcomes import AssistantMessageFinish, Finished, Usage
from lash_core.store.postgres import PostgresStore
from lash_core.store.postgres.db import PooledConnection, text
from lash_core.transcript import GraphAppend, MessageNode
from tests.postgres.conftest import acquired, draft, owner, sid

pytestmark = pytest.mark.postgres


@contextmanager
def counting(store: PostgresStore) -> Iterator[list[str]]:
    seen: list[str] = []

    def count(sql: str) -> None:
        seen.append(sql.split()[0])

    store.database.add_listener(count)
    try:
        yield seen
    finally:
        store.database.remove_listener(count)


async def test_hot_path_statement_counts(stores: tuple[PostgresStore, PostgresStore]) -> None:
    store, _ = stores
    s = sid()
    lease = acquired(await store.try_claim_lease(s, owner("A"), 60_000))
    with counting(store) as seen:
        await store.enqueue_input(draft(s, source_key="k"))
    assert len(seen) == 2, seen
    with counting(store) as seen:
        await store.enqueue_input(draft(s, source_key="k"))  # duplicate: one extra read
    assert len(seen) == 3, seen
    with counting(store) as seen:
        start = await store.start_turn(lease.fence(), "t1")
    assert start is not None and start.claim is not None
    # Lock and check the lease; open rows with the first pending command; one write.
    assert len(seen) == 3, seen
    nodes = [
        MessageNode(node_id="u1", role="user", text="hi", turn_id="t1"),
        MessageNode(node_id="a1", parent_node_id="u1", role="assistant", text="ok", turn_id="t1"),
    ]
    final = RuntimeCommit(
        session_id=s,
        fence=lease.fence(),
        release_lease=True,
        expected_head_revision=0,
        graph=GraphAppend(nodes=nodes, leaf_node_id="a1"),
        usage=Usage(input_tokens=3, output_tokens=1),
        turn=FinalTurn(turn_id="t1", outcome=Finished(finish=AssistantMessageFinish(text="ok"))),
        completed_input_claims=[start.claim.completion()],
        defer_active_inputs_of_turn="t1",
    )
    with counting(store) as seen:
        result = await store.commit(final)
    # Lock the lease; read the head, the rows to complete and defer; one write.
    assert len(seen) == 3, seen
    assert result.head_revision == 1 and [e.type for e in result.events] == ["turn.committed"]
    state = await store.load_state(s)
    assert [n.node_id for n in state.nodes] == ["u1", "a1"] and state.usage.input_tokens == 3
    assert await store.read_lease(s) is not None
    assert (await store.read_lease(s)).lease_token is None  # type: ignore[union-attr]
    replay = await store.commit(final)
    assert replay.replayed and replay.head_revision == 1 and replay.events == result.events


async def test_batch_admission_is_three_statements_whatever_its_size(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    store, _ = stores
    sessions = [sid() for _ in range(5)]
    drafts = [draft(s, f"m{i}", source_key=f"k{i}") for i in range(4) for s in sessions]
    with counting(store) as seen:
        outcomes = await store.enqueue_inputs(drafts)
    assert len(outcomes) == 20
    assert len(seen) == 3, seen


async def test_concurrent_overlapping_batches_admit_everything_once(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    """Eight batches on two pools over the same sessions, in opposite session orders, at
    once: no deadlock, every input admitted once, each session's events gapless."""
    a, b = stores
    sessions = [sid() for _ in range(6)]
    batches = [
        [draft(s, f"{n}-{i}", source_key=f"{n}-{i}") for i in range(3) for s in order]
        for n, order in enumerate([sessions, sessions[::-1]] * 4)
    ]
    results = await asyncio.gather(
        *((a if n % 2 else b).enqueue_inputs(batch) for n, batch in enumerate(batches))
    )
    assert all(o.status.value == "admitted" for r in results for o in r)  # type: ignore[union-attr]
    for s in sessions:
        pending = await a.list_pending_inputs(s)
        assert len(pending) == 8 * 3
        assert len({p.source_key for p in pending}) == 8 * 3
        page = await a.events_after(s, 0)
        assert [e.seq for e in page.events] == list(range(1, 8 * 3 + 1))


async def test_lists_bind_as_binary_arrays(stores: tuple[PostgresStore, PostgresStore]) -> None:
    """The store's connections send lists in psycopg's binary array format (no per-element
    quoting and escaping, see ``db._configure``), and every kind of value the store
    passes comes back as it went."""
    store, _ = stores
    docs = ['{"text": "a \\"quoted\\" word, a \\\\ and {braces}"}', None, "", "NULL"]
    async with store.database.single() as conn:
        assert conn._raw.adapters.get_dumper(list, PyFormat.AUTO) is ListBinaryDumper
        row = (
            await conn.execute(
                text(
                    "SELECT CAST(:docs AS text[]) AS docs, CAST(:nums AS bigint[]) AS nums,"
                    " CAST(:none AS text[]) AS none, 'b' = ANY(:ids) AS found"
                ),
                {"docs": docs, "nums": [1, 2**40, -3], "none": [], "ids": ["a", "b"]},
            )
        ).one()
    assert row.docs == docs and row.nums == [1, 2**40, -3]
    assert row.none == [] and row.found is True


async def test_a_connection_runs_its_statements_on_one_cursor(
    stores: tuple[PostgresStore, PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pooled connection keeps one cursor for every statement it runs (a cursor per
    statement costs a fifth of psycopg's client CPU per statement); rows are read before
    the next statement, so results stay apart."""
    store, _ = stores
    made: list[int] = []
    cursor = PooledConnection.cursor

    def counting(self: PooledConnection, *args: Any, **kwargs: Any) -> Any:
        made.append(id(self))
        return cursor(self, *args, **kwargs)

    monkeypatch.setattr(PooledConnection, "cursor", counting)
    for _ in range(3):
        async with store.database.transaction() as conn:
            first = await conn.execute(text("SELECT 1 AS v"))
            second = await conn.execute(text("SELECT 2 AS v UNION ALL SELECT 3"))
            assert [r.v for r in first] == [1] and [r.v for r in second] == [2, 3]
    assert len(made) == len(set(made))  # at most one per pooled connection, ever
