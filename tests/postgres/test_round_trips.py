"""Round trips per hot operation stay low (one transaction, few statements each).

Counts the statements the store sends (``Database.add_listener``); BEGIN/COMMIT are not
counted. A regression here means an extra network round trip on every turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from lash_core.commit import FinalTurn, RuntimeCommit
from lash_core.outcomes import AssistantMessageFinish, Finished, Usage
from lash_core.store.postgres import PostgresStore
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
    assert len(seen) == 4, seen
    assert result.head_revision == 1 and [e.type for e in result.events] == ["turn.committed"]
    state = await store.load_state(s)
    assert [n.node_id for n in state.nodes] == ["u1", "a1"] and state.usage.input_tokens == 3
    assert await store.read_lease(s) is not None
    assert (await store.read_lease(s)).lease_token is None  # type: ignore[union-attr]
    replay = await store.commit(final)
    assert replay.replayed and replay.head_revision == 1 and replay.events == result.events
