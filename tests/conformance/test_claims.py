"""CLM: claims generation-fenced under the session lease (conformance-cases.md §3).

lash's queued-work lane is, in this port, the session-command lane (``claim_leading_command``);
cases about queued work are asserted on commands where they apply.
"""

from __future__ import annotations

import pytest

from lash_core.claims import CommandClaim, TurnInputClaim
from lash_core.commands import CommandState
from lash_core.errors import LeaseLost, Superseded
from lash_core.inputs import CancelOutcomeKind, InputIdTarget, InputState
from lash_core.leases import Lease
from lash_core.store.base import Store
from tests.conformance.conftest import (
    Harness,
    acquired,
    active,
    command_draft,
    commit,
    dead_local_owner,
    draft,
    final,
    lease_for,
    live_local_owner,
    owner,
    race,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _both_lanes(store: Store, lease: Lease) -> tuple[str, str, CommandClaim, TurnInputClaim]:
    """A command (first in admission order) and a next-turn input, both claimed under lease."""
    cmd = await store.enqueue_command(command_draft("s", "c1"))
    inp = await store.enqueue_input(draft("s", "x"))
    cc = await store.claim_leading_command(lease.fence(), lease.owner)
    ic = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert cc is not None and ic is not None
    return cmd.command.batch_id, inp.record.input_id, cc, ic


async def _assert_pending_and_cancellable(store: Store, batch_id: str, input_id: str) -> None:
    assert [c.batch_id for c in await store.list_commands("s", pending_only=True)] == [batch_id]
    assert [p.input_id for p in await store.list_pending_inputs("s")] == [input_id]
    cancelled = await store.cancel_command("s", batch_id)
    assert cancelled is not None and cancelled.state is CommandState.CANCELLED
    [res] = await store.cancel_inputs("s", [InputIdTarget(value=input_id)])
    assert res.outcome is CancelOutcomeKind.CANCELLED


async def test_CLM_01_claim_records_generation_and_order(store: Store) -> None:
    i1 = await store.enqueue_input(draft("s", "1"))
    i2 = await store.enqueue_input(draft("s", "2"))
    lease = await lease_for(store, "s")
    claim = await store.claim_next_turn_inputs(lease.fence(), lease.owner, 10)
    assert claim is not None
    assert [i.input_id for i in claim.inputs] == [i1.record.input_id, i2.record.input_id]
    assert claim.session_lease_generation == lease.fencing_token
    assert claim.claim_id == f"tic:{i1.record.enqueue_seq}:1"
    assert claim.claim_token and claim.fencing_token == 1
    assert claim.mode.kind == "next_turn"
    assert all(i.state is InputState.DEFERRED_NEXT_TURN for i in claim.inputs)


async def test_CLM_02_live_claims_hidden_but_durable(store: Store) -> None:
    lease = await lease_for(store, "s")
    batch_id, input_id, _cc, _ic = await _both_lanes(store, lease)
    assert await store.list_commands("s", pending_only=True) == []
    assert [c.batch_id for c in await store.list_commands("s")] == [batch_id]
    assert await store.list_pending_inputs("s") == []
    assert [i.input_id for i in await store.list_inputs("s")] == [input_id]


async def test_CLM_03_abandon_reclaim_and_stale_completion(store: Store) -> None:
    await store.enqueue_input(draft("s", "1"))
    await store.enqueue_input(draft("s", "2"))
    lease = await lease_for(store, "s")
    c1 = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert c1 is not None
    await store.abandon_input_claim(c1)
    assert len(await store.list_pending_inputs("s")) == 2
    c2 = await store.claim_next_turn_inputs(lease.fence(), lease.owner)
    assert c2 is not None and c2.fencing_token > c1.fencing_token
    with pytest.raises(Superseded) as err:
        await store.commit(
            commit("s", lease, turn=final("t1"), completed_input_claims=[c1.completion()])
        )
    assert err.value.claim_id == c1.claim_id
    assert await store.list_pending_inputs("s") == []
    await store.commit(
        commit("s", lease, turn=final("t1"), completed_input_claims=[c2.completion()])
    )
    assert await store.list_pending_inputs("s") == []
    assert all(i.state is InputState.COMPLETED for i in await store.list_inputs("s"))


async def test_CLM_04_no_self_steal_within_a_generation(store: Store) -> None:
    lease = await lease_for(store, "s")
    await _both_lanes(store, lease)
    assert await store.claim_leading_command(lease.fence(), lease.owner) is None
    assert await store.claim_next_turn_inputs(lease.fence(), lease.owner) is None


async def test_CLM_05_new_generation_after_release_supersedes(store: Store) -> None:
    a = await lease_for(store, "s", "a")
    _batch_id, _input_id, cc_a, ic_a = await _both_lanes(store, a)
    await store.release_lease(a.fence())
    b = await lease_for(store, "s", "b")
    assert b.fencing_token > a.fencing_token
    cc_b = await store.claim_leading_command(b.fence(), b.owner)
    assert cc_b is not None and cc_b.fencing_token > cc_a.fencing_token
    ic_b = await store.claim_next_turn_inputs(b.fence(), b.owner)
    assert ic_b is not None and ic_b.fencing_token > ic_a.fencing_token
    with pytest.raises(Superseded):
        await store.commit(commit("s", b, completed_command_claims=[cc_a.completion()]))
    with pytest.raises(Superseded):
        await store.commit(
            commit("s", b, turn=final("t"), completed_input_claims=[ic_a.completion()])
        )


async def test_CLM_06_dead_owner_takeover_supersedes_without_release(store: Store) -> None:
    dead = dead_local_owner("d")
    d = acquired(await store.try_claim_lease("s", dead, 60_000))
    _b, _i, cc_d, ic_d = await _both_lanes(store, d)
    claimant = live_local_owner("live")
    new = acquired(await store.reclaim_lease("s", claimant, d.fence(), 60_000))
    assert new.fencing_token > d.fencing_token
    assert await store.claim_leading_command(new.fence(), claimant) is not None
    assert await store.claim_next_turn_inputs(new.fence(), claimant) is not None
    with pytest.raises(Superseded):
        await store.commit(commit("s", new, completed_command_claims=[cc_d.completion()]))
    with pytest.raises(Superseded):
        await store.commit(
            commit("s", new, turn=final("t"), completed_input_claims=[ic_d.completion()])
        )


async def test_CLM_07_release_makes_claims_pending_and_cancellable(store: Store) -> None:
    lease = await lease_for(store, "s")
    batch_id, input_id, _cc, _ic = await _both_lanes(store, lease)
    await store.release_lease(lease.fence())
    await _assert_pending_and_cancellable(store, batch_id, input_id)


async def test_CLM_08_expiry_makes_claims_pending(harness: Harness) -> None:
    store = harness.store
    lease = await lease_for(store, "s", ttl=harness.short_ttl_ms)
    batch_id, input_id, _cc, _ic = await _both_lanes(store, lease)
    await harness.expire(lease)
    row = await store.read_lease("s")
    assert row is not None and row.fencing_token == lease.fencing_token
    await _assert_pending_and_cancellable(store, batch_id, input_id)


async def test_CLM_09_after_takeover_old_claims_are_pending(store: Store) -> None:
    dead = dead_local_owner("d")
    d = acquired(await store.try_claim_lease("s", dead, 60_000))
    batch_id, input_id, _cc, _ic = await _both_lanes(store, d)
    acquired(await store.reclaim_lease("s", live_local_owner("live"), d.fence(), 60_000))
    await _assert_pending_and_cancellable(store, batch_id, input_id)


async def test_CLM_10_concurrent_claims_have_one_winner(store: Store) -> None:
    await store.enqueue_command(command_draft("s", "c1"))
    lease = await lease_for(store, "s")
    results = await race(
        lambda: store.claim_leading_command(lease.fence(), owner("x")),
        lambda: store.claim_leading_command(lease.fence(), owner("y")),
    )
    assert sum(r is not None for r in results) == 1
    assert await store.list_commands("s", pending_only=True) == []
    await store.enqueue_input(draft("s", "x"))
    results2 = await race(
        lambda: store.claim_next_turn_inputs(lease.fence(), owner("x"), 1),
        lambda: store.claim_next_turn_inputs(lease.fence(), owner("y"), 1),
    )
    assert sum(r is not None for r in results2) == 1


async def test_CLM_11_claims_require_a_live_fence(store: Store) -> None:
    await store.enqueue_command(command_draft("s", "c1"))
    await store.enqueue_input(draft("s", "x"))
    old = await lease_for(store, "s", "a")
    await store.release_lease(old.fence())
    with pytest.raises(LeaseLost):
        await store.claim_leading_command(old.fence(), old.owner)
    with pytest.raises(LeaseLost):
        await store.claim_next_turn_inputs(old.fence(), old.owner)
    with pytest.raises(LeaseLost):
        await store.claim_active_turn_inputs(old.fence(), old.owner, "t", "after_work")
    with pytest.raises(LeaseLost):
        await store.start_turn(old.fence(), "t")
    fresh = await lease_for(store, "s", "b")
    assert await store.claim_leading_command(fresh.fence(), fresh.owner) is not None
    assert await store.claim_next_turn_inputs(fresh.fence(), fresh.owner) is not None


async def test_CLM_12_own_live_claims_never_hide_later_rows(store: Store) -> None:
    inputs = [await store.enqueue_input(draft("s", f"i{n}")) for n in range(34)]
    lease = await lease_for(store, "s")
    for expected in inputs:
        claim = await store.claim_next_turn_inputs(lease.fence(), lease.owner, 1)
        assert claim is not None
        assert [i.input_id for i in claim.inputs] == [expected.record.input_id]
    commands = [await store.enqueue_command(command_draft("c", f"k{n}")) for n in range(34)]
    lease_c = await lease_for(store, "c")
    for expected_cmd in commands:
        cc = await store.claim_leading_command(lease_c.fence(), lease_c.owner)
        assert cc is not None and cc.command.batch_id == expected_cmd.command.batch_id


async def test_CLM_14_expiry_by_store_clock_reclaims_both_lanes(harness: Harness) -> None:
    store = harness.store
    lease = await lease_for(store, "s", "a", ttl=harness.short_ttl_ms)
    batch_id, input_id, cc, ic = await _both_lanes(store, lease)
    await harness.expire(lease)
    successor = await lease_for(store, "s", "b")
    assert successor.fencing_token > lease.fencing_token
    cc2 = await store.claim_leading_command(successor.fence(), successor.owner)
    ic2 = await store.claim_next_turn_inputs(successor.fence(), successor.owner)
    assert cc2 is not None and cc2.command.batch_id == batch_id
    assert cc2.fencing_token > cc.fencing_token
    assert ic2 is not None and [i.input_id for i in ic2.inputs] == [input_id]
    assert ic2.fencing_token > ic.fencing_token
    with pytest.raises(LeaseLost):
        await store.commit(
            commit(
                "s",
                lease,
                turn=final("t1"),
                completed_command_claims=[cc.completion()],
                completed_input_claims=[ic.completion()],
            )
        )
    await store.commit(
        commit(
            "s",
            successor,
            turn=final("t1"),
            completed_command_claims=[cc2.completion()],
            completed_input_claims=[ic2.completion()],
            release_lease=True,
        )
    )
    assert await store.list_commands("s", pending_only=True) == []
    assert await store.list_pending_inputs("s") == []


async def test_CLM_15_active_claims_select_by_turn_state_boundary_and_max(store: Store) -> None:
    lease = await lease_for(store, "s")
    await store.start_turn(lease.fence(), "T", require_inputs=False)
    a = await store.enqueue_input(draft("s", "A", source_key="a", ingress=active("T")))
    u = await store.enqueue_input(draft("s", "U", ingress=active("T")))
    b = await store.enqueue_input(draft("s", "B", ingress=active("T", "before_completion")))
    claim = await store.claim_active_turn_inputs(lease.fence(), lease.owner, "T", "after_work", 1)
    assert claim is not None and [i.input_id for i in claim.inputs] == [a.record.input_id]
    assert claim.mode.kind == "active_turn"
    assert claim.claim_id.startswith("tic:")
    stored = await store.get_input("s", a.record.input_id)
    assert stored is not None and stored.state is InputState.ACCEPTED
    # after_work admits only after_work rows; before_completion admits both.
    claim2 = await store.claim_active_turn_inputs(lease.fence(), lease.owner, "T", "after_work")
    assert claim2 is not None and [i.input_id for i in claim2.inputs] == [u.record.input_id]
    assert (
        await store.claim_active_turn_inputs(lease.fence(), lease.owner, "T", "after_work") is None
    )
    assert (
        await store.claim_active_turn_inputs(lease.fence(), lease.owner, "O", "before_completion")
        is None
    )
    claim3 = await store.claim_active_turn_inputs(
        lease.fence(), lease.owner, "T", "before_completion"
    )
    assert claim3 is not None and [i.input_id for i in claim3.inputs] == [b.record.input_id]


async def test_CLM_16_checkpoint_claims_once_per_generation(store: Store) -> None:
    """Only turn inputs are claimed at checkpoints here (commands are applied at idle)."""
    lease = await lease_for(store, "s")
    await store.start_turn(lease.fence(), "T", require_inputs=False)
    await store.enqueue_input(draft("s", "A", ingress=active("T")))
    first = await store.claim_active_turn_inputs(lease.fence(), lease.owner, "T", "after_work", 10)
    assert first is not None and first.session_lease_generation == lease.fencing_token
    assert (
        await store.claim_active_turn_inputs(lease.fence(), lease.owner, "T", "after_work") is None
    )


async def test_CLM_17_checkpoint_probe_is_read_only(store: Store) -> None:
    lease = await lease_for(store, "s")
    await store.start_turn(lease.fence(), "T", require_inputs=False)
    before = await store.events_after("s", 0)
    assert not await store.has_active_input("s", "T", "after_work")
    await store.enqueue_input(draft("s", "late", ingress=active("T", "before_completion")))
    assert not await store.has_active_input("s", "T", "after_work")
    assert await store.has_active_input("s", "T", "before_completion")
    assert not await store.has_active_input("s", "other", "before_completion")
    after = await store.events_after("s", 0)
    assert after.last_seq == before.last_seq + 1  # only the admission
    [p] = await store.list_pending_inputs("s")
    assert p.claim is None and p.state is InputState.PENDING_ACTIVE


async def test_CLM_18_long_turn_keeps_claims_across_renewals(harness: Harness) -> None:
    store = harness.store
    await store.enqueue_input(draft("s", "x"))
    lease = await lease_for(store, "s", ttl=harness.short_ttl_ms)
    start = await store.start_turn(lease.fence(), "T")
    assert start is not None and start.claim is not None
    for _ in range(3):
        await harness.advance(harness.short_ttl_ms // 4)
        await store.renew_lease(lease.fence(), harness.short_ttl_ms)
    assert await store.claim_next_turn_inputs(lease.fence(), lease.owner) is None
    await store.renew_lease(lease.fence(), 60_000)
    await store.commit(
        commit("s", lease, turn=final("T"), completed_input_claims=[start.claim.completion()])
    )
    assert [i.state for i in await store.list_inputs("s")] == [InputState.COMPLETED]


async def test_CLM_19_failover_reclaims_an_attached_claim(harness: Harness) -> None:
    store = harness.store
    await store.enqueue_command(command_draft("s", "wake"))
    w1 = await lease_for(store, "s", "w1", ttl=harness.short_ttl_ms)
    c1 = await store.claim_leading_command(w1.fence(), w1.owner)
    assert c1 is not None
    await harness.expire(w1)
    w2 = await lease_for(store, "s", "w2")
    c2 = await store.claim_leading_command(w2.fence(), w2.owner)
    assert c2 is not None and c2.fencing_token > c1.fencing_token
    with pytest.raises(Superseded):
        await store.commit(commit("s", w2, completed_command_claims=[c1.completion()]))
    result = await store.commit(
        commit(
            "s", w2, completed_command_claims=[c2.completion()], applied_command=c2.command.command
        )
    )
    assert [e.type for e in result.events] == ["session.command_applied"]
    [cmd] = await store.list_commands("s")
    assert cmd.state is CommandState.COMPLETED
