"""CAN: pending-input cancellation (§2a) and turn cancellation at the store level (§2b)."""

from __future__ import annotations

import pytest

from lash_core.errors import LeaseLost, TurnCommitConflict
from lash_core.inputs import (
    ActiveTurnIngress,
    CancelOutcomeKind,
    InputIdTarget,
    InputState,
    NextTurnIngress,
    SourceKeyTarget,
)
from lash_core.leases import Lease
from lash_core.store.base import Store
from tests.conformance.conftest import (
    Harness,
    active,
    cancelled_outcome,
    commit,
    draft,
    final,
    finished,
    lease_for,
    race,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _running(store: Store, session_id: str = "s", turn_id: str = "t1") -> Lease:
    lease = await lease_for(store, session_id)
    start = await store.start_turn(lease.fence(), turn_id, require_inputs=False)
    assert start is not None
    return lease


async def test_CAN_01_cancel_an_unclaimed_input(store: Store) -> None:
    i1 = await store.enqueue_input(draft("s", "1"))
    i2 = await store.enqueue_input(draft("s", "2"))
    [res] = await store.cancel_inputs("s", [InputIdTarget(value=i2.record.input_id)])
    assert res.outcome is CancelOutcomeKind.CANCELLED
    assert res.input is not None and res.input.state is InputState.CANCELLED
    assert [p.input_id for p in await store.list_pending_inputs("s")] == [i1.record.input_id]


async def test_CAN_02_repeated_cancel_is_already_cancelled(store: Store) -> None:
    i2 = await store.enqueue_input(draft("s", "2"))
    target = InputIdTarget(value=i2.record.input_id)
    await store.cancel_inputs("s", [target])
    [res] = await store.cancel_inputs("s", [target])
    assert res.outcome is CancelOutcomeKind.ALREADY_CANCELLED
    assert res.input is not None and res.input.input_id == i2.record.input_id
    page = await store.events_after("s", 0)
    assert [e.type for e in page.events] == ["input.admitted", "input.cancelled"]


async def test_CAN_03_live_claimed_input_cannot_be_cancelled(store: Store) -> None:
    i = await store.enqueue_input(draft("s", "x"))
    lease = await lease_for(store, "s")
    claim = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert claim is not None
    [res] = await store.cancel_inputs("s", [InputIdTarget(value=i.record.input_id)])
    assert res.outcome is CancelOutcomeKind.ALREADY_CLAIMED
    assert res.claim is not None and res.claim.claim_id == claim.claim_id
    assert res.claim.claim_session_lease_generation == lease.fencing_token
    assert await store.list_pending_inputs("s") == []
    stored = await store.get_input("s", i.record.input_id)
    assert stored is not None and stored.claim is not None


async def test_CAN_04_cancelling_completed_is_already_completed(store: Store) -> None:
    i = await store.enqueue_input(draft("s", "x"))
    lease = await lease_for(store, "s")
    claim = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert claim is not None
    await store.commit(
        commit("s", lease, turn=final("t1"), completed_input_claims=[claim.completion()])
    )
    [res] = await store.cancel_inputs("s", [InputIdTarget(value=i.record.input_id)])
    assert res.outcome is CancelOutcomeKind.ALREADY_COMPLETED
    assert res.input is not None and res.input.state is InputState.COMPLETED


async def test_CAN_05_unknown_or_vacuumed_is_not_found(store: Store) -> None:
    i = await store.enqueue_input(draft("s", "x"))
    target = InputIdTarget(value=i.record.input_id)
    await store.cancel_inputs("s", [target])
    report = await store.vacuum(0, "s")
    assert report.removed_input_tombstones == 1
    [res] = await store.cancel_inputs("s", [target])
    assert res.outcome is CancelOutcomeKind.NOT_FOUND and res.input is None
    [res] = await store.cancel_inputs("s", [InputIdTarget(value="ti_never")])
    assert res.outcome is CancelOutcomeKind.NOT_FOUND


async def test_CAN_06_bulk_cancel_one_outcome_per_target_in_order(store: Store) -> None:
    a = await store.enqueue_input(draft("s", "a", source_key="bulk:first"))
    b = await store.enqueue_input(draft("s", "b", source_key="bulk:second"))
    c = await store.enqueue_input(draft("s", "c"))
    results = await store.cancel_inputs(
        "s",
        [
            SourceKeyTarget(value="bulk:first"),
            InputIdTarget(value=c.record.input_id),
            SourceKeyTarget(value="bulk:missing"),
            SourceKeyTarget(value="bulk:first"),
        ],
    )
    assert [r.outcome for r in results] == [
        CancelOutcomeKind.CANCELLED,
        CancelOutcomeKind.CANCELLED,
        CancelOutcomeKind.NOT_FOUND,
        CancelOutcomeKind.ALREADY_CANCELLED,
    ]
    assert results[0].input is not None and results[0].input.input_id == a.record.input_id
    assert results[1].input is not None and results[1].input.input_id == c.record.input_id
    assert results[3].input is not None and results[3].input.input_id == a.record.input_id
    assert [p.input_id for p in await store.list_pending_inputs("s")] == [b.record.input_id]
    cancelled = [
        e for e in (await store.events_after("s", 0)).events if e.type == "input.cancelled"
    ]
    assert len(cancelled) == 1
    assert cancelled[0].payload.input_ids == [a.record.input_id, c.record.input_id]  # type: ignore[union-attr]


async def test_CAN_07_suffix_cancel_by_source_key_anchor(store: Store) -> None:
    lease = await _running(store)
    b = await store.enqueue_input(draft("s", "b", source_key="before"))
    x = await store.enqueue_input(draft("s", "x", source_key="suffix:anchor"))
    y = await store.enqueue_input(
        draft("s", "y", source_key="suffix:claimed", ingress=active("t1"))
    )
    claim = await store.claim_active_turn_inputs(lease.fence(), lease.owner, "t1", "after_work")
    assert claim is not None and [i.input_id for i in claim.inputs] == [y.record.input_id]
    z = await store.enqueue_input(draft("s", "z", source_key="suffix:later"))
    result = await store.cancel_input_suffix("s", SourceKeyTarget(value="suffix:anchor"))
    assert result.anchor_found
    assert [(r.outcome, r.input.input_id if r.input else None) for r in result.results] == [
        (CancelOutcomeKind.CANCELLED, x.record.input_id),
        (CancelOutcomeKind.ALREADY_CLAIMED, y.record.input_id),
        (CancelOutcomeKind.CANCELLED, z.record.input_id),
    ]
    assert result.results[1].claim is not None
    assert result.results[1].claim.claim_id == claim.claim_id
    assert [p.input_id for p in await store.list_pending_inputs("s")] == [b.record.input_id]


async def test_CAN_08_suffix_cancel_by_input_id_anchor(store: Store) -> None:
    p = await store.enqueue_input(draft("s", "p"))
    q = await store.enqueue_input(draft("s", "q", source_key="suffix:id-later"))
    result = await store.cancel_input_suffix("s", InputIdTarget(value=p.record.input_id))
    assert [(r.outcome, r.input.input_id if r.input else None) for r in result.results] == [
        (CancelOutcomeKind.CANCELLED, p.record.input_id),
        (CancelOutcomeKind.CANCELLED, q.record.input_id),
    ]


async def test_CAN_09_suffix_with_missing_anchor_changes_nothing(store: Store) -> None:
    b = await store.enqueue_input(draft("s", "b"))
    result = await store.cancel_input_suffix("s", SourceKeyTarget(value="suffix:missing"))
    assert not result.anchor_found and result.results == []
    assert [p.input_id for p in await store.list_pending_inputs("s")] == [b.record.input_id]
    assert (await store.events_after("s", 0)).last_seq == 1


async def test_CAN_10_cancel_covers_active_and_next_turn_states(store: Store) -> None:
    lease = await _running(store)
    k = await store.enqueue_input(draft("s", "k", ingress=active("t1")))
    x = await store.enqueue_input(draft("s", "x", ingress=active("t1")))
    n = await store.enqueue_input(draft("s", "n"))
    results = await store.cancel_inputs(
        "s", [InputIdTarget(value=x.record.input_id), InputIdTarget(value=n.record.input_id)]
    )
    assert [r.outcome for r in results] == [CancelOutcomeKind.CANCELLED] * 2
    assert results[0].input is not None
    assert isinstance(results[0].input.ingress, ActiveTurnIngress)
    await store.commit(commit("s", lease, turn=final("t1"), defer_active_inputs_of_turn="t1"))
    pending = await store.list_pending_inputs("s")
    assert [p.input_id for p in pending] == [k.record.input_id]
    assert isinstance(pending[0].ingress, NextTurnIngress)
    assert pending[0].state is InputState.DEFERRED_NEXT_TURN
    stored_x = await store.get_input("s", x.record.input_id)
    assert stored_x is not None and stored_x.state is InputState.CANCELLED


async def test_CAN_11_deferred_input_cancelled_is_never_claimed(store: Store) -> None:
    lease = await _running(store)
    k = await store.enqueue_input(draft("s", "k", ingress=active("t1")))
    await store.commit(commit("s", lease, turn=final("t1"), defer_active_inputs_of_turn="t1"))
    [res] = await store.cancel_inputs("s", [InputIdTarget(value=k.record.input_id)])
    assert res.outcome is CancelOutcomeKind.CANCELLED
    assert await store.claim_next_turn_inputs(lease.fence(), lease.owner) is None
    await store.commit(commit("s", lease, turn=final("t2"), release_lease=True))
    assert await store.list_pending_inputs("s") == []


async def test_CAN_12_cancel_versus_active_input_around_the_checkpoint(store: Store) -> None:
    """The store-level outcome of each variant; (A) differs from lash only in that the late
    input is admitted as next-turn input (PTI-10), and is still cancellable."""
    # (B) cancelled before t1 runs: the input was admitted as next-turn input.
    b = await store.enqueue_input(draft("b", "steer", ingress=active("t1")))
    [res] = await store.cancel_inputs("b", [InputIdTarget(value=b.record.input_id)])
    assert res.outcome is CancelOutcomeKind.CANCELLED
    lease_b = await lease_for(store, "b")
    assert await store.start_turn(lease_b.fence(), "t1") is None
    # (A) t1 already ran; the input is enqueued and cancelled afterwards.
    lease_a = await lease_for(store, "a")
    await store.start_turn(lease_a.fence(), "t1", require_inputs=False)
    await store.commit(commit("a", lease_a, turn=final("t1"), defer_active_inputs_of_turn="t1"))
    a = await store.enqueue_input(draft("a", "steer", ingress=active("t1")))
    [res] = await store.cancel_inputs("a", [InputIdTarget(value=a.record.input_id)])
    assert res.outcome is CancelOutcomeKind.CANCELLED
    # (C)/(D) t1 claims it at its checkpoint and completes it; a later cancel sees that.
    lease_d = await _running(store, "d")
    d = await store.enqueue_input(draft("d", "steer", ingress=active("t1")))
    claim = await store.claim_active_turn_inputs(lease_d.fence(), lease_d.owner, "t1", "after_work")
    assert claim is not None and [i.input_id for i in claim.inputs] == [d.record.input_id]
    await store.commit(
        commit(
            "d",
            lease_d,
            turn=final("t1"),
            completed_input_claims=[claim.completion()],
            defer_active_inputs_of_turn="t1",
        )
    )
    [res] = await store.cancel_inputs("d", [InputIdTarget(value=d.record.input_id)])
    assert res.outcome is CancelOutcomeKind.ALREADY_COMPLETED


async def test_CAN_13_cancelled_input_is_never_claimed_later(store: Store) -> None:
    q = await store.enqueue_input(draft("s", "secret"))
    keep = await store.enqueue_input(draft("s", "keep"))
    await store.cancel_inputs("s", [InputIdTarget(value=q.record.input_id)])
    lease = await lease_for(store, "s")
    start = await store.start_turn(lease.fence(), "t1")
    assert start is not None and start.claim is not None
    assert [i.input_id for i in start.claim.inputs] == [keep.record.input_id]


# --------------------------------------------------------------------------- §2b turn cancel


async def test_CAN_14_cancel_before_the_turn_starts_is_no_running_turn(store: Store) -> None:
    """Differs from lash: there are no durable pre-start cancel promises. A cancel for a
    turn that is not running reports ``None`` (receipt ``no_running_turn``) and leaves no
    trace, so a turn started later is not cancelled."""
    assert await store.request_turn_cancel("s", "t1", "user") is None
    lease = await lease_for(store, "s")
    assert await store.request_turn_cancel("s", "t1", "user") is None
    await store.start_turn(lease.fence(), "t1", require_inputs=False)
    row = await store.renew_lease(lease.fence(), 60_000)
    assert row.cancel_requested is False and row.running_turn_id == "t1"


async def test_CAN_15_duplicate_cancel_preserves_the_original_evidence(store: Store) -> None:
    lease = await _running(store)
    assert await store.request_turn_cancel("s", "t1", "first") == "t1"
    assert await store.request_turn_cancel("s", None, "second") == "t1"
    row = await store.renew_lease(lease.fence(), 60_000)
    assert row.cancel_requested is True
    assert row.cancel_reason == "first"


async def test_CAN_16_cancel_is_observed_by_renewal_and_belongs_to_the_tenure(
    harness: Harness,
) -> None:
    """The running owner learns of a cancel through ``renew_lease``. Differs from lash: the
    cancel flag belongs to the lease tenure, so after owner loss the successor starts clean
    (the stale owner's commit is still rejected by the fence)."""
    store = harness.store
    lease = await lease_for(store, "s", ttl=harness.short_ttl_ms)
    await store.start_turn(lease.fence(), "t1", require_inputs=False)
    assert await store.request_turn_cancel("s", "t1", "stop") == "t1"
    row = await store.renew_lease(lease.fence(), harness.short_ttl_ms)
    assert row.cancel_requested and row.cancel_reason == "stop"
    expired_at = row.as_lease()
    await harness.expire(expired_at)
    successor = await lease_for(store, "s", "b")
    assert successor.fencing_token > lease.fencing_token
    fresh = await store.read_lease("s")
    assert fresh is not None and not fresh.cancel_requested and fresh.running_turn_id is None
    with pytest.raises(LeaseLost):
        await store.commit(commit("s", lease, turn=final("t1", cancelled_outcome())))
    assert await store.request_turn_cancel("s", "t1") is None


async def test_CAN_17_first_terminal_commit_wins(store: Store) -> None:
    lease = await _running(store)
    first = await store.commit(commit("s", lease, turn=final("t1", cancelled_outcome())))
    with pytest.raises(TurnCommitConflict):
        await store.commit(commit("s", lease, turn=final("t1", finished("late"))))
    replay = await store.commit(commit("s", lease, turn=final("t1", cancelled_outcome())))
    assert replay.replayed and replay.head_revision == first.head_revision
    state = await store.load_state("s")
    assert state.head_revision == first.head_revision


async def test_CAN_18_commit_and_cancel_race_have_one_consistent_winner(store: Store) -> None:
    lease = await _running(store)
    cancel_result, commit_result = await race(
        lambda: store.request_turn_cancel("s", "t1", "race"),
        lambda: store.commit(commit("s", lease, turn=final("t1"))),
    )
    assert cancel_result in ("t1", None)
    assert commit_result.head_revision == 1  # type: ignore[union-attr]
    row = await store.read_lease("s")
    assert row is not None
    assert row.running_turn_id is None and row.cancel_requested is False
    assert await store.request_turn_cancel("s", "t1") is None


async def test_CAN_19_cancel_is_exact_address(store: Store) -> None:
    lease = await _running(store, "s", "a")
    assert await store.request_turn_cancel("s", "b", "other turn") is None
    row = await store.renew_lease(lease.fence(), 60_000)
    assert row.cancel_requested is False
    assert await store.request_turn_cancel("other-session", None) is None
    assert await store.request_turn_cancel("s", "a", "this one") == "a"
    row = await store.renew_lease(lease.fence(), 60_000)
    assert row.cancel_requested is True and row.cancel_reason == "this one"


async def test_CAN_20_cancelled_turn_commits_and_next_turn_is_unaffected(store: Store) -> None:
    lease = await _running(store)
    assert await store.request_turn_cancel("s", None, "stop") == "t1"
    result = await store.commit(commit("s", lease, turn=final("t1", cancelled_outcome())))
    committed = [e for e in result.events if e.type == "turn.committed"]
    assert committed and committed[0].payload.outcome == cancelled_outcome()  # type: ignore[union-attr]
    row = await store.read_lease("s")
    assert row is not None and not row.cancel_requested and row.running_turn_id is None
    await store.enqueue_input(draft("s", "next"))
    start = await store.start_turn(lease.fence(), "t2")
    assert start is not None
    row = await store.renew_lease(lease.fence(), 60_000)
    assert row.running_turn_id == "t2" and not row.cancel_requested
