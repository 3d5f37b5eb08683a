"""TC: turn commit atomicity and idempotent retry (conformance-cases.md §6)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from lash_core.commit import CommitResult, SessionConfig
from lash_core.errors import (
    HeadRevisionConflict,
    LeaseLost,
    SessionMismatch,
    SteeringPending,
    Superseded,
    TurnCommitConflict,
)
from lash_core.events import TurnCommitted
from lash_core.inputs import InputState, NextTurnIngress
from lash_core.leases import Lease
from lash_core.outcomes import Stopped, Usage
from lash_core.store.base import Residency, Store
from lash_core.transcript import GraphReplace, TranscriptMessage
from tests.conformance.conftest import (
    active,
    append,
    cancelled_outcome,
    command_draft,
    commit,
    draft,
    final,
    finished,
    lease_for,
    node,
    race_settled,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_TC_01_commit_advances_head_and_persists_checkpoint(store: Store) -> None:
    lease = await lease_for(store, "s")
    result = await store.commit(
        commit(
            "s",
            lease,
            graph=append(node("n1", "hi"), node("n2", "hello", parent="n1", role="assistant")),
            config=SessionConfig(provider_id="echo", model="m"),
            checkpoint={"execution": {"step": 3}},
            release_lease=True,
        )
    )
    assert result.head_revision == 1
    state = await store.load_state("s")
    assert state.exists and state.head_revision == 1
    assert state.checkpoint == {"execution": {"step": 3}}
    assert state.config == SessionConfig(provider_id="echo", model="m")
    assert state.leaf_node_id == "n2"
    assert [n.node_id for n in state.nodes] == ["n1", "n2"]


async def _cas_race(store: Store, lease: Lease, expected: int) -> str:
    """Two commits expecting the same head race; returns the winner's node id."""

    def attempt(node_id: str) -> Callable[[], Awaitable[CommitResult]]:
        return lambda: store.commit(
            commit(
                "s",
                lease,
                expected_head_revision=expected,
                graph=GraphReplace(nodes=[node(node_id, node_id)], leaf_node_id=node_id),
            )
        )

    a, b = f"a{expected}", f"b{expected}"
    results = await race_settled(attempt(a), attempt(b))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1, f"expected exactly one HeadRevisionConflict, got {results!r}"
    assert isinstance(errors[0], HeadRevisionConflict)
    assert errors[0].expected == expected
    return b if errors[0] is results[0] else a


async def test_TC_02_head_cas_applies_exactly_once(store: Store) -> None:
    """Both on a brand-new session (no session row yet) and on an existing one."""
    lease = await lease_for(store, "s")
    for expected in (0, 1):
        winner = await _cas_race(store, lease, expected)
        state = await store.load_state("s")
        assert state.head_revision == expected + 1
        assert [n.node_id for n in state.nodes] == [winner]


async def test_TC_03_a_commit_never_touches_another_session(store: Store) -> None:
    alpha = await lease_for(store, "alpha")
    await store.enqueue_input(draft("alpha", "x"))
    claim = await store.claim_next_turn_inputs(alpha.fence(), alpha.owner)
    assert claim is not None
    await store.commit(commit("alpha", alpha, graph=append(node("a1", "alpha"))))
    with pytest.raises(SessionMismatch):
        await store.commit(commit("beta", alpha, graph=append(node("b1", "beta"))))
    beta = await lease_for(store, "beta")
    with pytest.raises(Superseded):
        await store.commit(
            commit("beta", beta, turn=final("t"), completed_input_claims=[claim.completion()])
        )
    assert not (await store.load_state("beta")).exists
    assert (await store.load_state("alpha")).head_revision == 1
    assert await store.list_pending_inputs("alpha") == []  # still claimed by alpha


async def test_TC_04_load_hydrates_checkpoint_and_usage(store: Store) -> None:
    lease = await lease_for(store, "s")
    checkpoint = {"tool_state_generation": 9, "plugin_snapshot_revision": 12}
    await store.commit(commit("s", lease, checkpoint=checkpoint, usage=Usage(input_tokens=11)))
    await store.commit(commit("s", lease, usage=Usage(input_tokens=1, output_tokens=2)))
    state = await store.load_state("s")
    assert state.checkpoint == checkpoint
    assert state.usage == Usage(input_tokens=12, output_tokens=2)
    assert state.head_revision == 2


async def test_TC_05_stamped_final_commit_is_idempotent_without_a_lease(store: Store) -> None:
    lease = await lease_for(store, "s")
    c = commit("s", lease, graph=append(node("n1", "x")), turn=final("t1"), release_lease=True)
    first = await store.commit(c)
    assert not first.replayed
    retry = await store.commit(c.model_copy(update={"fence": None, "release_lease": False}))
    assert retry.replayed
    assert retry.head_revision == first.head_revision
    assert [e.seq for e in retry.events] == [e.seq for e in first.events]
    state = await store.load_state("s")
    assert state.head_revision == 1
    assert (await store.events_after("s", 0)).last_seq == first.events[-1].seq


async def test_TC_05b_replay_with_release_still_releases_the_lease(store: Store) -> None:
    """A retry of a final commit that lost its reply may carry the release: the stored
    result is returned and the caller's lease is released (nothing else is written)."""
    lease = await lease_for(store, "s", "a")
    c = commit("s", lease, graph=append(node("n1", "x")), turn=final("t1"))
    first = await store.commit(c)
    retry = await store.commit(c.model_copy(update={"release_lease": True}))
    assert retry.replayed and retry.head_revision == first.head_revision
    row = await store.read_lease("s")
    assert row is not None and row.lease_token is None
    b = await lease_for(store, "s", "b")
    assert b.fencing_token == lease.fencing_token + 1
    assert (await store.load_state("s")).head_revision == 1


async def test_TC_06_hash_ignores_cas_and_lease_fields(store: Store) -> None:
    lease = await lease_for(store, "s")
    c = commit("s", lease, graph=append(node("n1", "x")), turn=final("t1"))
    first = await store.commit(c)
    other = await lease_for(store, "s2")
    changed = c.model_copy(
        update={
            "expected_head_revision": 41,
            "fence": other.fence().model_copy(update={"session_id": "s"}),
            "release_lease": True,
            "graph": append(node("regenerated-id", "x")),
        }
    )
    assert changed.commit_hash() == c.commit_hash()
    retry = await store.commit(changed)
    assert retry.replayed and retry.head_revision == first.head_revision


async def test_TC_07_same_turn_different_content_conflicts(store: Store) -> None:
    lease = await lease_for(store, "s")
    await store.commit(commit("s", lease, turn=final("t1"), checkpoint={"turn_index": 0}))
    with pytest.raises(TurnCommitConflict) as err:
        await store.commit(commit("s", None, turn=final("t1"), checkpoint={"turn_index": 1}))
    assert err.value.turn_id == "t1"
    with pytest.raises(TurnCommitConflict):
        await store.commit(commit("s", lease, turn=final("t1"), checkpoint={"turn_index": 1}))
    assert (await store.load_state("s")).checkpoint == {"turn_index": 0}


async def test_TC_08_stale_command_completion_rejects_the_whole_commit(store: Store) -> None:
    await store.enqueue_command(command_draft("s", "c"))
    lease = await lease_for(store, "s")
    cc = await store.claim_leading_command(lease.fence(), lease.owner)
    await store.enqueue_input(draft("s", "x"))
    ic = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert cc is not None and ic is not None
    last_seq = (await store.events_after("s", 0)).last_seq
    tampered = cc.completion().model_copy(update={"claim_token": "altered"})
    with pytest.raises(Superseded):
        await store.commit(
            commit(
                "s",
                lease,
                graph=append(node("n1", "x")),
                checkpoint={"turn_index": 41},
                usage=Usage(input_tokens=5),
                turn=final("t41"),
                completed_input_claims=[ic.completion()],
                completed_command_claims=[tampered],
                release_lease=True,
            )
        )
    state = await store.load_state("s")
    assert state.head_revision == 0 and state.nodes == [] and state.checkpoint is None
    assert state.usage == Usage()
    [cmd] = await store.list_commands("s")
    assert cmd.claim is not None and cmd.claim.claim_id == cc.claim_id
    [inp] = await store.list_inputs("s")
    assert inp.state is InputState.DEFERRED_NEXT_TURN and inp.claim is not None
    assert (await store.events_after("s", 0)).last_seq == last_seq
    row = await store.read_lease("s")
    assert row is not None and row.lease_token == lease.lease_token


async def test_TC_09_foreign_completion_rolls_back_everything(store: Store) -> None:
    """lash's case sends an outbox batch for another session; this port has no outbox
    batches, so a completion naming another session is the foreign part."""
    await store.enqueue_command(command_draft("s", "c"))
    lease = await lease_for(store, "s")
    cc = await store.claim_leading_command(lease.fence(), lease.owner)
    assert cc is not None
    foreign = cc.completion().model_copy(update={"session_id": "elsewhere"})
    with pytest.raises(Superseded):
        await store.commit(
            commit(
                "s",
                lease,
                graph=append(node("n1", "x")),
                turn=final("t"),
                completed_command_claims=[cc.completion(), foreign],
            )
        )
    assert (await store.load_state("s")).head_revision == 0
    [cmd] = await store.list_commands("s")
    assert cmd.claim is not None


async def test_TC_10_valid_final_commit_applies_all_and_retry_returns_it(store: Store) -> None:
    await store.enqueue_command(command_draft("s", "c"))
    lease = await lease_for(store, "s")
    cc = await store.claim_leading_command(lease.fence(), lease.owner)
    await store.enqueue_input(draft("s", "x"))
    ic = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert cc is not None and ic is not None
    c = commit(
        "s",
        lease,
        graph=append(node("n1", "x"), node("n2", "answer", parent="n1", role="assistant")),
        checkpoint={"turn_index": 41},
        turn=final("t41", input_tokens=3, output_tokens=4),
        usage=Usage(input_tokens=3, output_tokens=4),
        completed_input_claims=[ic.completion()],
        completed_command_claims=[cc.completion()],
        release_lease=True,
    )
    first = await store.commit(c)
    retry = await store.commit(c)
    assert retry.replayed
    assert retry.head_revision == first.head_revision == 1
    assert retry.events == first.events
    state = await store.load_state("s")
    assert state.checkpoint == {"turn_index": 41}
    assert [x.state for x in await store.list_inputs("s")] == [InputState.COMPLETED]
    assert [x.state.value for x in await store.list_commands("s")] == ["completed"]
    assert await store.list_pending_inputs("s") == []
    [event] = first.events
    payload = event.payload
    assert isinstance(payload, TurnCommitted)
    assert payload.messages == [
        TranscriptMessage(role="user", text="x", turn_id="t1"),
        TranscriptMessage(role="assistant", text="answer", turn_id="t1"),
    ]
    assert payload.input_ids == [ic.inputs[0].input_id]
    assert payload.usage == Usage(input_tokens=3, output_tokens=4)


async def test_TC_11_stale_input_completion_rejects_the_commit(store: Store) -> None:
    await store.enqueue_input(draft("s", "x"))
    lease = await lease_for(store, "s")
    c1 = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert c1 is not None
    await store.abandon_input_claim(c1)
    c2 = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert c2 is not None
    with pytest.raises(Superseded) as err:
        await store.commit(
            commit("s", lease, turn=final("t"), completed_input_claims=[c1.completion()])
        )
    assert err.value.what == "turn_input"
    [row] = await store.list_inputs("s")
    assert row.claim is not None and row.claim.claim_id == c2.claim_id


async def test_TC_12_final_commit_completes_accepted_and_defers_the_rest(store: Store) -> None:
    """Differs from lash for O: active input for a turn that is not running is admitted as
    next-turn input straight away (PTI-10), so O is already next-turn and is claimed by the
    next turn together with the deferred U and B."""
    lease = await lease_for(store, "s")
    await store.start_turn(lease.fence(), "T", require_inputs=False)
    a = await store.enqueue_input(draft("s", "A", ingress=active("T")))
    claim = await store.claim_active_turn_inputs(lease.fence(), lease.owner, "T", "after_work", 1)
    assert claim is not None
    u = await store.enqueue_input(draft("s", "U", ingress=active("T")))
    b = await store.enqueue_input(draft("s", "B", ingress=active("T", "before_completion")))
    o = await store.enqueue_input(draft("s", "O", ingress=active("other")))
    result = await store.commit(
        commit(
            "s",
            lease,
            turn=final("T"),
            completed_input_claims=[claim.completion()],
            defer_active_inputs_of_turn="T",
        )
    )
    assert result.deferred_input_ids == [u.record.input_id, b.record.input_id]
    pending = await store.list_pending_inputs("s")
    assert [p.input_id for p in pending] == [
        u.record.input_id,
        b.record.input_id,
        o.record.input_id,
    ]
    assert all(isinstance(p.ingress, NextTurnIngress) for p in pending)
    assert all(p.state is InputState.DEFERRED_NEXT_TURN for p in pending)
    stored_a = await store.get_input("s", a.record.input_id)
    assert stored_a is not None and stored_a.state is InputState.COMPLETED
    start = await store.start_turn(lease.fence(), "T2")
    assert start is not None and start.claim is not None
    assert [i.input_id for i in start.claim.inputs] == [p.input_id for p in pending]
    await store.commit(
        commit("s", lease, turn=final("T2"), completed_input_claims=[start.claim.completion()])
    )
    assert await store.list_pending_inputs("s") == []


async def test_TC_13_every_claimed_input_settles_whatever_the_outcome(store: Store) -> None:
    outcomes = [
        finished(),
        cancelled_outcome(),
        Stopped(stop="invalid_input"),
        Stopped(stop="runtime_error", message="exceeded the limit"),
        Stopped(stop="provider_error"),
    ]
    for n, outcome in enumerate(outcomes):
        sid = f"s{n}"
        await store.enqueue_input(draft(sid, "x"))
        lease = await lease_for(store, sid)
        start = await store.start_turn(lease.fence(), "t")
        assert start is not None and start.claim is not None
        result = await store.commit(
            commit(
                sid,
                lease,
                turn=final("t", outcome),
                completed_input_claims=[start.claim.completion()],
                release_lease=True,
            )
        )
        assert isinstance(result.events[-1].payload, TurnCommitted)
        assert result.events[-1].payload.outcome == outcome
        assert await store.list_pending_inputs(sid) == []
        again = await lease_for(store, sid, "next")
        assert await store.start_turn(again.fence(), "t-next") is None


async def test_TC_14_cancelled_turn_settles_what_it_claimed(store: Store) -> None:
    await store.enqueue_input(draft("s", "x"))
    lease = await lease_for(store, "s")
    start = await store.start_turn(lease.fence(), "t")
    assert start is not None and start.claim is not None
    await store.enqueue_input(draft("s", "steer", ingress=active("t")))
    steer = await store.claim_active_turn_inputs(lease.fence(), lease.owner, "t", "after_work")
    assert steer is not None
    assert await store.request_turn_cancel("s", "t") == "t"
    await store.commit(
        commit(
            "s",
            lease,
            turn=final("t", cancelled_outcome()),
            completed_input_claims=[start.claim.completion(), steer.completion()],
            defer_active_inputs_of_turn="t",
            release_lease=True,
        )
    )
    assert await store.list_pending_inputs("s") == []
    nxt = await lease_for(store, "s", "b")
    assert await store.start_turn(nxt.fence(), "t2") is None


async def test_TC_16_checkpoint_commit_then_final_commit_in_one_lease(store: Store) -> None:
    await store.enqueue_command(command_draft("s", "c"))
    lease = await lease_for(store, "s")
    cc = await store.claim_leading_command(lease.fence(), lease.owner)
    assert cc is not None
    mid = await store.commit(
        commit("s", lease, checkpoint={"turn_index": 7}, completed_command_claims=[cc.completion()])
    )
    assert mid.head_revision == 1 and mid.events == []
    await store.enqueue_input(draft("s", "x"))
    start = await store.start_turn(lease.fence(), "t")
    assert start is not None and start.claim is not None
    tampered = start.claim.completion().model_copy(update={"claim_token": "fault"})
    with pytest.raises(Superseded):
        await store.commit(commit("s", lease, turn=final("t"), completed_input_claims=[tampered]))
    await store.commit(
        commit(
            "s",
            lease,
            turn=final("t"),
            completed_input_claims=[start.claim.completion()],
            release_lease=True,
        )
    )
    state = await store.load_state("s")
    assert state.checkpoint == {"turn_index": 7} and state.head_revision == 2
    assert await store.list_commands("s", pending_only=True) == []
    with pytest.raises(LeaseLost):
        await store.commit(commit("s", lease, checkpoint={"turn_index": 8}))


async def test_TC_graph_replace_and_active_path(store: Store) -> None:
    lease = await lease_for(store, "s")
    await store.commit(
        commit(
            "s",
            lease,
            graph=append(
                node("a", "root"), node("b", "branch", parent="a"), node("c", "leaf", parent="a")
            ),
        )
    )
    path = await store.load_state("s", Residency.ACTIVE_PATH)
    assert [n.node_id for n in path.nodes] == ["a", "c"]
    full = await store.load_state("s")
    assert {n.node_id for n in full.nodes} == {"a", "b", "c"}
    view = await store.read_session("s")
    assert [m.node_id for m in view.messages] == ["a", "c"]
    await store.commit(commit("s", lease, graph=GraphReplace()))
    empty = await store.load_state("s")
    assert empty.nodes == [] and empty.leaf_node_id is None and empty.head_revision == 2


async def test_TC_steering_checkpoint_commit_writes_nothing_while_steering_is_pending(
    store: Store,
) -> None:
    """A final commit made at a checkpoint (``steering_checkpoint``) checks it under the
    lease: steering input the turn can take there makes it write nothing and raise
    ``SteeringPending``; steering for another turn, or none, lets it commit."""
    lease = await lease_for(store, "s")
    start = await store.start_turn(lease.fence(), "T", require_inputs=False)
    assert start is not None
    at_checkpoint = commit(
        "s",
        lease,
        graph=append(node("n1", "answer", turn="T")),
        turn=final("T"),
        defer_active_inputs_of_turn="T",
        release_lease_if_idle=True,
        steering_checkpoint="before_completion",
    )
    assert (
        at_checkpoint.commit_hash()
        == at_checkpoint.model_copy(update={"steering_checkpoint": None}).commit_hash()
    )
    b = await store.enqueue_input(draft("s", "B", ingress=active("T", "before_completion")))
    last_seq = (await store.events_after("s", 0)).last_seq
    with pytest.raises(SteeringPending) as err:
        await store.commit(at_checkpoint)
    assert (err.value.session_id, err.value.turn_id) == ("s", "T")
    state = await store.load_state("s")
    assert state.head_revision == 0 and state.nodes == []
    assert (await store.events_after("s", 0)).last_seq == last_seq
    held = await store.read_lease("s")
    assert held is not None and held.running_turn_id == "T"
    # The turn takes the input at that checkpoint, then its commit goes through.
    claim = await store.claim_active_turn_inputs(
        lease.fence(), lease.owner, "T", "before_completion"
    )
    assert claim is not None and [r.input_id for r in claim.inputs] == [b.record.input_id]
    await store.enqueue_input(draft("s", "O", ingress=active("other")))
    result = await store.commit(
        at_checkpoint.model_copy(update={"completed_input_claims": [claim.completion()]})
    )
    assert result.head_revision == 1 and not result.replayed
    assert result.deferred_input_ids == []
    stored_b = await store.get_input("s", b.record.input_id)
    assert stored_b is not None and stored_b.state is InputState.COMPLETED
