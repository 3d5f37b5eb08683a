"""Our additions: no stranded input (DESIGN.md difference 3).

Input accepted by a turn whose worker died is resolved by the next lease holder at
``start_turn`` (completed if its message is already committed, otherwise returned to the
next turn); stray ``pending_active`` rows become next-turn input; and a recovery sweep
(``sessions_with_orphaned_work``) finds sessions whose pending work has no live lease.
"""

from __future__ import annotations

import pytest

from lash_core.inputs import InputIdTarget, InputState, NextTurnIngress
from lash_core.store.base import Store
from lash_core.transcript import ingress_message_id
from tests.conformance.conftest import (
    Harness,
    active,
    append,
    command_draft,
    commit,
    draft,
    final,
    lease_for,
    node,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_start_turn_resolves_a_dead_generations_accepted_input(harness: Harness) -> None:
    store = harness.store
    dead = await lease_for(store, "s", "dead", ttl=harness.short_ttl_ms)
    start = await store.start_turn(dead.fence(), "t1", require_inputs=False)
    assert start is not None
    kept = await store.enqueue_input(draft("s", "committed", ingress=active("t1")))
    lost = await store.enqueue_input(draft("s", "not committed", ingress=active("t1")))
    claim = await store.claim_active_turn_inputs(dead.fence(), dead.owner, "t1", "after_work")
    assert claim is not None and len(claim.inputs) == 2
    # The dead worker's progress commit persisted the first steering message only.
    kept_node = node(ingress_message_id(kept.record.input_id), "committed")
    await store.commit(commit("s", dead, graph=append(kept_node)))
    stray = await store.enqueue_input(draft("s", "stray", ingress=active("t1")))
    assert stray.record.state is InputState.PENDING_ACTIVE
    await harness.expire(dead)
    assert await store.sessions_with_orphaned_work() == ["s"]

    successor = await lease_for(store, "s", "next")
    turn = await store.start_turn(successor.fence(), "t2")
    assert turn is not None
    assert turn.resolved_input_ids == [
        kept.record.input_id,
        lost.record.input_id,
        stray.record.input_id,
    ]
    assert turn.claim is not None
    assert [i.input_id for i in turn.claim.inputs] == [lost.record.input_id, stray.record.input_id]
    rows = {r.input_id: r for r in await store.list_inputs("s")}
    assert rows[kept.record.input_id].state is InputState.COMPLETED
    assert rows[kept.record.input_id].claim is None
    for input_id in (lost.record.input_id, stray.record.input_id):
        assert rows[input_id].state is InputState.DEFERRED_NEXT_TURN
        assert isinstance(rows[input_id].ingress, NextTurnIngress)
        assert rows[input_id].claim is not None
        assert rows[input_id].claim.session_lease_generation == successor.fencing_token  # type: ignore[union-attr]
    assert await store.sessions_with_orphaned_work() == []


async def test_start_turn_keeps_its_own_generations_accepted_input(store: Store) -> None:
    lease = await lease_for(store, "s")
    await store.start_turn(lease.fence(), "t1", require_inputs=False)
    await store.enqueue_input(draft("s", "steer", ingress=active("t1")))
    claim = await store.claim_active_turn_inputs(lease.fence(), lease.owner, "t1", "after_work")
    assert claim is not None
    await store.commit(
        commit("s", lease, turn=final("t1"), completed_input_claims=[claim.completion()])
    )
    again = await store.start_turn(lease.fence(), "t2", require_inputs=False)
    assert again is not None and again.resolved_input_ids == [] and again.claim is None
    assert again.event.type == "turn.started"


async def test_start_turn_with_nothing_to_claim_still_settles_orphans(harness: Harness) -> None:
    """No turn starts (no event, no running turn), but the dead generation's input is
    settled at once, so the recovery sweep does not keep waking an idle session."""
    store = harness.store
    dead = await lease_for(store, "s", "dead", ttl=harness.short_ttl_ms)
    await store.start_turn(dead.fence(), "t1", require_inputs=False)
    steer = await store.enqueue_input(draft("s", "steer", ingress=active("t1")))
    claim = await store.claim_active_turn_inputs(dead.fence(), dead.owner, "t1", "after_work")
    assert claim is not None
    await harness.expire(dead)
    successor = await lease_for(store, "s", "next")
    last_seq = (await store.events_after("s", 0)).last_seq
    assert await store.start_turn(successor.fence(), "t2", claim_next_turn_inputs=False) is None
    row = await store.get_input("s", steer.record.input_id)
    assert row is not None and row.state is InputState.DEFERRED_NEXT_TURN and row.claim is None
    assert (await store.events_after("s", 0)).last_seq == last_seq
    lease_row = await store.read_lease("s")
    assert lease_row is not None and lease_row.running_turn_id is None
    turn = await store.start_turn(successor.fence(), "t2")
    assert turn is not None and turn.claim is not None
    assert [i.input_id for i in turn.claim.inputs] == [steer.record.input_id]


async def test_committed_orphan_is_completed_even_when_no_turn_starts(harness: Harness) -> None:
    store = harness.store
    dead = await lease_for(store, "s", "dead", ttl=harness.short_ttl_ms)
    await store.start_turn(dead.fence(), "t1", require_inputs=False)
    steer = await store.enqueue_input(draft("s", "steer", ingress=active("t1")))
    claim = await store.claim_active_turn_inputs(dead.fence(), dead.owner, "t1", "after_work")
    assert claim is not None
    done = node(ingress_message_id(steer.record.input_id), "steer")
    await store.commit(commit("s", dead, graph=append(done)))
    await harness.expire(dead)
    assert await store.sessions_with_orphaned_work() == ["s"]
    successor = await lease_for(store, "s", "next")
    assert await store.start_turn(successor.fence(), "t2") is None
    row = await store.get_input("s", steer.record.input_id)
    assert row is not None and row.state is InputState.COMPLETED
    await store.release_lease(successor.fence())
    assert await store.sessions_with_orphaned_work() == []


async def test_abandoned_active_claim_returns_to_pending_active(store: Store) -> None:
    lease = await lease_for(store, "s")
    await store.start_turn(lease.fence(), "t1", require_inputs=False)
    i = await store.enqueue_input(draft("s", "steer", ingress=active("t1")))
    claim = await store.claim_active_turn_inputs(lease.fence(), lease.owner, "t1", "after_work")
    assert claim is not None
    tampered = claim.model_copy(update={"claim_token": "other"})
    await store.abandon_input_claim(tampered)  # wrong token: no-op
    row = await store.get_input("s", i.record.input_id)
    assert row is not None and row.state is InputState.ACCEPTED
    await store.abandon_input_claim(claim)
    await store.abandon_input_claim(claim)  # idempotent
    row = await store.get_input("s", i.record.input_id)
    assert row is not None and row.state is InputState.PENDING_ACTIVE and row.claim is None
    assert row.claim_fencing_token == 1
    again = await store.claim_active_turn_inputs(lease.fence(), lease.owner, "t1", "after_work")
    assert again is not None and again.fencing_token == 2


async def test_sessions_with_orphaned_work(harness: Harness) -> None:
    store = harness.store
    await store.enqueue_input(draft("pending", "x"))
    await store.enqueue_command(command_draft("command", "c"))
    done = await store.enqueue_input(draft("done", "x"))
    await store.cancel_inputs("done", [InputIdTarget(value=done.record.input_id)])
    await store.enqueue_input(draft("held", "x"))
    await lease_for(store, "held")
    await store.enqueue_input(draft("expiring", "x"))
    expiring = await lease_for(store, "expiring", ttl=harness.short_ttl_ms)
    claim = await store.claim_next_turn_inputs(expiring.fence(), expiring.owner)
    assert claim is not None
    assert sorted(await store.sessions_with_orphaned_work()) == ["command", "pending"]
    assert len(await store.sessions_with_orphaned_work(limit=1)) == 1
    await harness.expire(expiring)
    assert sorted(await store.sessions_with_orphaned_work()) == ["command", "expiring", "pending"]
    among = {"command", "held", "done", "unknown"}
    assert await store.sessions_with_orphaned_work(among=among) == ["command"]
    assert await store.sessions_with_orphaned_work(among=()) == []


async def test_read_session_view(store: Store) -> None:
    lease = await lease_for(store, "s")
    await store.enqueue_input(draft("s", "first"))
    start = await store.start_turn(lease.fence(), "t1")
    assert start is not None and start.claim is not None
    waiting = await store.enqueue_input(draft("s", "waiting"))
    view = await store.read_session("s")
    assert view.running_turn_id == "t1"
    assert [p.input_id for p in view.pending_inputs] == [waiting.record.input_id]
    assert view.events is None and view.last_seq == 3
    await store.commit(
        commit(
            "s",
            lease,
            graph=append(node("u", "first"), node("a", "reply", parent="u", role="assistant")),
            turn=final("t1"),
            completed_input_claims=[start.claim.completion()],
            release_lease=True,
        )
    )
    view = await store.read_session("s", after_seq=3)
    assert view.running_turn_id is None and view.head_revision == 1
    assert [m.text for m in view.messages] == ["first", "reply"]
    assert view.events is not None and [e.type for e in view.events.events] == ["turn.committed"]
    assert view.last_seq == 4
