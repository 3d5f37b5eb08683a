"""LIFE: session lifecycle at the store level (conformance-cases.md §10).

This port has no separate create/open/park operations: a session row is created by the
first write that touches it, and ``load_state(...).exists`` tells whether there is one.
"""

from __future__ import annotations

import pytest

from lash_core.commit import SessionConfig
from lash_core.errors import LeaseLost
from lash_core.inputs import InputState
from lash_core.store.base import AdmissionStatus, Store
from tests.conformance.conftest import (
    Harness,
    acquired,
    command_draft,
    commit,
    draft,
    final,
    lease_for,
    node,
    owner,
)
from tests.conformance.conftest import (
    append as append_nodes,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_LIFE_01_a_missing_session_does_not_exist(store: Store) -> None:
    state = await store.load_state("missing")
    assert not state.exists
    assert state.head_revision == 0 and state.nodes == [] and state.last_seq == 0
    view = await store.read_session("missing", after_seq=0)
    assert view.head_revision == 0 and view.messages == [] and view.pending_inputs == []
    assert view.running_turn_id is None and view.events is not None
    assert view.events.events == [] and not view.events.gap
    assert await store.read_lease("missing") is None


async def test_LIFE_02_the_first_write_creates_the_session(store: Store) -> None:
    await store.try_claim_lease("leased-only", owner("a"), 60_000)
    assert not (await store.load_state("leased-only")).exists
    await store.enqueue_input(draft("s", "x"))
    state = await store.load_state("s")
    assert state.exists and state.head_revision == 0 and state.config is None
    await store.enqueue_command(command_draft("c", "k"))
    assert (await store.load_state("c")).exists
    lease = await lease_for(store, "t")
    await store.start_turn(lease.fence(), "t1", require_inputs=False)
    assert (await store.load_state("t")).exists


async def test_LIFE_03_later_commits_never_overwrite_unspecified_state(store: Store) -> None:
    lease = await lease_for(store, "s")
    config = SessionConfig(provider_id="openai", model="m1")
    await store.commit(commit("s", lease, config=config, checkpoint={"k": 1}))
    await store.commit(commit("s", lease, graph=append_nodes(node("n", "x"))))
    state = await store.load_state("s")
    assert state.config == config and state.checkpoint == {"k": 1}


async def test_LIFE_04_delete_removes_everything_and_resets_the_generation(store: Store) -> None:
    """Differs from lash: deleting takes the lease (DESIGN.md difference 6), so a second
    delete with the now-deleted tenure's fence is ``LeaseLost``; deleting again under a
    fresh lease succeeds and is otherwise a no-op."""
    await store.enqueue_input(draft("s", "x", source_key="k"))
    await store.enqueue_command(command_draft("s", "c"))
    lease = await lease_for(store, "s")
    assert lease.fencing_token == 1
    await store.commit(commit("s", lease, graph=append_nodes(node("n", "x")), turn=final("t1")))
    await store.delete_session(lease.fence())
    state = await store.load_state("s")
    assert not state.exists and state.head_revision == 0 and state.last_seq == 0
    assert await store.read_lease("s") is None
    assert await store.list_inputs("s") == [] and await store.list_commands("s") == []
    assert (await store.events_after("s", 0)).events == []
    with pytest.raises(LeaseLost):
        await store.delete_session(lease.fence())
    again = acquired(await store.try_claim_lease("s", owner("b"), 60_000))
    assert again.fencing_token == 1
    await store.delete_session(again.fence())
    recreated = await store.enqueue_input(draft("s", "new", source_key="k"))
    assert recreated.status is AdmissionStatus.ADMITTED
    assert recreated.event is not None and recreated.event.seq == 1
    fresh = await lease_for(store, "s", "c")
    assert fresh.fencing_token == 1
    # The turn stamp went with the session: the same turn id commits afresh.
    result = await store.commit(commit("s", fresh, turn=final("t1")))
    assert not result.replayed and result.head_revision == 1


async def test_LIFE_04b_delete_never_removes_a_live_holders_lease(store: Store) -> None:
    holder = await lease_for(store, "s", "holder")
    await store.enqueue_input(draft("s", "x"))
    stale = holder.fence().model_copy(update={"lease_token": "stale"})
    with pytest.raises(LeaseLost):
        await store.delete_session(stale)
    row = await store.read_lease("s")
    assert row is not None and row.lease_token == holder.lease_token
    assert len(await store.list_inputs("s")) == 1


async def test_LIFE_05_deleting_a_session_revokes_its_running_turn(store: Store) -> None:
    lease = await lease_for(store, "s")
    await store.start_turn(lease.fence(), "t1", require_inputs=False)
    await store.delete_session(lease.fence())
    assert await store.request_turn_cancel("s", "t1") is None
    with pytest.raises(LeaseLost):
        await store.commit(commit("s", lease, turn=final("t1")))


async def test_LIFE_07_a_durable_store_survives_reopen(harness: Harness) -> None:
    store = harness.store
    lease = await lease_for(store, "s")
    await store.commit(
        commit(
            "s",
            lease,
            graph=append_nodes(node("n", "hello")),
            checkpoint={"tool_state_generation": 77},
            config=SessionConfig(model="m"),
        )
    )
    cmd = await store.enqueue_command(command_draft("s", "keyed"))
    inp = await store.enqueue_input(draft("s", "x", source_key="ik"))
    async with harness.reopen() as other:
        state = await other.load_state("s")
        assert state.checkpoint == {"tool_state_generation": 77}
        assert state.config == SessionConfig(model="m") and state.head_revision == 1
        assert [c.batch_id for c in await other.list_commands("s")] == [cmd.command.batch_id]
        [p] = await other.list_pending_inputs("s")
        assert p.input_id == inp.record.input_id and p.state is InputState.DEFERRED_NEXT_TURN
        row = await other.read_lease("s")
        assert row is not None and row.lease_token == lease.lease_token
