"""LSE: session execution leases (conformance-cases.md §4)."""

from __future__ import annotations

import os

import pytest

from lash_core.errors import LeaseLost
from lash_core.leases import LeaseFence, LeaseOwner, LocalProcessLiveness
from lash_core.store.base import Store
from tests.conformance.conftest import (
    Harness,
    acquired,
    busy,
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


async def test_LSE_01_first_acquisition(store: Store) -> None:
    lease = acquired(await store.try_claim_lease("s", owner("a"), 60_000))
    assert lease.fencing_token == 1
    assert lease.expires_at_ms > lease.claimed_at_ms
    assert lease.owner == owner("a")


async def test_LSE_02_same_incarnation_re_enters(harness: Harness) -> None:
    store = harness.store
    first = acquired(await store.try_claim_lease("s", owner("a"), 10_000))
    await harness.advance(5)
    again = acquired(await store.try_claim_lease("s", owner("a"), 60_000))
    assert again.lease_token == first.lease_token
    assert again.fencing_token == first.fencing_token
    assert again.claimed_at_ms == first.claimed_at_ms
    assert again.expires_at_ms >= first.expires_at_ms


async def test_LSE_03_other_incarnation_is_busy(store: Store) -> None:
    await lease_for(store, "s", "a")
    busy(await store.try_claim_lease("s", owner("a", "2"), 60_000))


async def test_LSE_04_other_owner_is_busy_and_told_the_holder(store: Store) -> None:
    lease = await lease_for(store, "s", "a")
    holder = busy(await store.try_claim_lease("s", owner("b"), 60_000))
    assert holder.owner == owner("a")
    assert holder.fencing_token == lease.fencing_token
    assert holder.lease_token == lease.lease_token


async def test_LSE_05_renewal_extends_and_keeps_identity(harness: Harness) -> None:
    store = harness.store
    lease = await lease_for(store, "s", ttl=10_000)
    await harness.advance(5)
    row = await store.renew_lease(lease.fence(), 60_000)
    assert row.lease_token == lease.lease_token
    assert row.fencing_token == lease.fencing_token
    assert row.expires_at_ms >= lease.expires_at_ms


async def test_LSE_06_renewal_with_wrong_token_fails(store: Store) -> None:
    lease = await lease_for(store, "s")
    forged = lease.fence().model_copy(update={"lease_token": "forged"})
    with pytest.raises(LeaseLost):
        await store.renew_lease(forged, 60_000)
    with pytest.raises(LeaseLost):
        await store.renew_lease(lease.fence().model_copy(update={"fencing_token": 7}), 60_000)


async def test_LSE_07_renewal_after_expiry_fails(harness: Harness) -> None:
    store = harness.store
    lease = await lease_for(store, "s", ttl=harness.short_ttl_ms)
    await harness.expire(lease)
    with pytest.raises(LeaseLost):
        await store.renew_lease(lease.fence(), 60_000)
    long = await lease_for(store, "t", ttl=3_600_000)
    await harness.advance(50)
    assert (await store.renew_lease(long.fence(), 3_600_000)).lease_token == long.lease_token


async def test_LSE_08_stale_release_is_a_silent_no_op(store: Store) -> None:
    lease = await lease_for(store, "s", "a")
    await store.release_lease(lease.fence().model_copy(update={"lease_token": "wrong"}))
    busy(await store.try_claim_lease("s", owner("b"), 60_000))


async def test_LSE_09_release_then_reacquire_advances_generation(store: Store) -> None:
    a = await lease_for(store, "s", "a")
    await store.release_lease(a.fence())
    row = await store.read_lease("s")
    assert row is not None and row.lease_token is None and row.fencing_token == a.fencing_token
    b = await lease_for(store, "s", "b")
    assert b.fencing_token > a.fencing_token


async def test_LSE_10_late_release_of_older_lease_cannot_clear_newer(store: Store) -> None:
    a = await lease_for(store, "s", "a")
    await store.release_lease(a.fence())
    await lease_for(store, "s", "b")
    await store.release_lease(a.fence())
    busy(await store.try_claim_lease("s", owner("c"), 60_000))


async def test_LSE_11_ttl_zero_lease_is_immediately_reclaimable(store: Store) -> None:
    a = acquired(await store.try_claim_lease("s", owner("a"), 0))
    b = acquired(await store.try_claim_lease("s", owner("b"), 60_000))
    assert b.fencing_token > a.fencing_token


async def test_LSE_12_commits_require_a_live_lease(store: Store) -> None:
    await store.enqueue_input(draft("s", "x"))
    with pytest.raises(LeaseLost):
        await store.commit(commit("s", None))
    with pytest.raises(LeaseLost):
        await store.commit(commit("s", None, turn=final("t1")))
    state = await store.load_state("s")
    assert state.head_revision == 0
    assert (await store.events_after("s", 0)).last_seq == 1


async def test_LSE_13_commit_can_release_the_lease(store: Store) -> None:
    a = await lease_for(store, "s", "a")
    result = await store.commit(commit("s", a, turn=final("t1"), release_lease=True))
    assert result.head_revision == 1
    b = await lease_for(store, "s", "b")
    assert b.fencing_token > a.fencing_token


# --------------------------------------------------------------------------- reclaim


async def test_LSE_15_fast_reclaim_of_a_dead_local_holder(store: Store) -> None:
    dead = acquired(await store.try_claim_lease("s", dead_local_owner("d"), 60_000))
    claimant = live_local_owner("c")
    busy(await store.try_claim_lease("s", claimant, 60_000))
    new = acquired(await store.reclaim_lease("s", claimant, dead.fence(), 60_000))
    assert new.fencing_token > dead.fencing_token
    assert new.expires_at_ms > new.claimed_at_ms


async def test_LSE_16_reclaim_with_stale_observation_is_busy(store: Store) -> None:
    dead = acquired(await store.try_claim_lease("s", dead_local_owner("d"), 60_000))
    new = acquired(await store.reclaim_lease("s", live_local_owner("c"), dead.fence(), 60_000))
    late = live_local_owner("late")
    holder = busy(await store.reclaim_lease("s", late, dead.fence(), 60_000))
    assert holder.lease_token == new.lease_token
    row = await store.read_lease("s")
    assert row is not None and row.lease_token == new.lease_token


async def test_LSE_17_concurrent_reclaims_have_one_winner(store: Store) -> None:
    dead = acquired(await store.try_claim_lease("s", dead_local_owner("d"), 60_000))
    c1, c2 = live_local_owner("c1"), live_local_owner("c2")
    results = await race(
        lambda: store.reclaim_lease("s", c1, dead.fence(), 60_000),
        lambda: store.reclaim_lease("s", c2, dead.fence(), 60_000),
    )
    winners = [r for r in results if r.kind == "acquired"]
    assert len(winners) == 1
    assert winners[0].lease.fencing_token > dead.fencing_token


def _relocated(o: LeaseOwner, **changes: str) -> LeaseOwner:
    assert isinstance(o.liveness, LocalProcessLiveness)
    return o.model_copy(update={"liveness": o.liveness.model_copy(update=changes)})


async def test_LSE_18_no_fast_reclaim_across_hosts(store: Store) -> None:
    dead = acquired(await store.try_claim_lease("s", dead_local_owner("d"), 60_000))
    claimant = _relocated(live_local_owner("c"), host_id="another-host")
    busy(await store.reclaim_lease("s", claimant, dead.fence(), 60_000))


async def test_LSE_19_no_fast_reclaim_across_boots(store: Store) -> None:
    dead = acquired(await store.try_claim_lease("s", dead_local_owner("d"), 60_000))
    claimant = _relocated(live_local_owner("c"), boot_id="another-boot")
    busy(await store.reclaim_lease("s", claimant, dead.fence(), 60_000))


async def test_LSE_20_opaque_holders_only_expire_by_ttl(store: Store) -> None:
    holder = await lease_for(store, "s", "opaque")
    busy(await store.reclaim_lease("s", live_local_owner("c"), holder.fence(), 60_000))


async def test_LSE_21_live_local_holder_is_not_reclaimable(store: Store) -> None:
    alive = live_local_owner("alive")
    holder = acquired(await store.try_claim_lease("s", alive, 60_000))
    assert isinstance(alive.liveness, LocalProcessLiveness) and alive.liveness.pid == os.getpid()
    busy(await store.reclaim_lease("s", live_local_owner("c"), holder.fence(), 60_000))


async def test_LSE_22_reclaim_of_a_non_live_lease_acquires(store: Store) -> None:
    a = await lease_for(store, "s", "a")
    await store.release_lease(a.fence())
    stale = LeaseFence(session_id="s", owner=owner("zzz"), lease_token="x", fencing_token=99)
    b = acquired(await store.reclaim_lease("s", owner("b"), stale, 60_000))
    assert b.fencing_token == a.fencing_token + 1
    c = acquired(await store.reclaim_lease("fresh", owner("c"), stale, 60_000))
    assert c.fencing_token == 1


# --------------------------------------------------------------------------- multi-handle, clock


async def test_LSE_23_concurrent_first_claims_have_one_winner(harness: Harness) -> None:
    async with harness.reopen() as other:
        results = await race(
            lambda: harness.store.try_claim_lease("s", owner("a"), 60_000),
            lambda: other.try_claim_lease("s", owner("b"), 60_000),
        )
    assert sorted(r.kind for r in results) == ["acquired", "busy"]


async def test_LSE_24_lease_times_come_from_the_store_clock(store: Store) -> None:
    """Differs from lash (DESIGN.md difference 1, one clock): admission timestamps also come
    from the store clock, not the host clock; lease and claim decisions as in lash."""
    before = await store.now_ms()
    lease = await lease_for(store, "s", ttl=45_000)
    after = await store.now_ms()
    assert before <= lease.claimed_at_ms <= after
    assert lease.expires_at_ms == lease.claimed_at_ms + 45_000
    row = await store.renew_lease(lease.fence(), 10_000)
    assert lease.claimed_at_ms <= row.expires_at_ms - 10_000 <= await store.now_ms()
    admitted = await store.enqueue_input(draft("s", "x"))
    stored = await store.get_input("s", admitted.record.input_id)
    assert stored is not None and before <= stored.enqueued_at_ms <= await store.now_ms()


async def test_LSE_25_expiry_across_handles_and_forged_expiry_is_irrelevant(
    harness: Harness,
) -> None:
    store = harness.store
    a = await lease_for(store, "s", "a", ttl=harness.short_ttl_ms)
    async with harness.reopen() as host_b:
        holder = busy(await host_b.try_claim_lease("s", owner("b"), 60_000))
        assert holder.fencing_token == a.fencing_token and holder.owner == a.owner
        await harness.expire(a)
        b = acquired(await host_b.reclaim_lease("s", owner("b"), holder.fence(), 60_000))
        assert b.fencing_token > a.fencing_token
        forged = a.model_copy(update={"expires_at_ms": a.expires_at_ms + 10 * 365 * 86_400_000})
        for attempt in (forged, a):
            with pytest.raises(LeaseLost):
                await store.renew_lease(attempt.fence(), 60_000)
            with pytest.raises(LeaseLost):
                await store.commit(commit("s", attempt, turn=final("t-a")))
        row = await store.read_lease("s")
        assert row is not None and row.lease_token == b.lease_token
        assert (await store.load_state("s")).head_revision == 0
        await host_b.commit(commit("s", b, turn=final("t-b"), release_lease=True))
    assert (await store.load_state("s")).head_revision == 1


async def test_LSE_26_reopened_handle_sees_and_releases_the_lease(harness: Harness) -> None:
    a = await lease_for(harness.store, "s", "a")
    async with harness.reopen() as other:
        busy(await other.try_claim_lease("s", owner("b"), 60_000))
        await other.release_lease(a.fence())
        b = acquired(await other.try_claim_lease("s", owner("b"), 60_000))
        assert b.fencing_token > a.fencing_token


async def test_LSE_27_dead_owner_reclaim_survives_late_release(store: Store) -> None:
    dead = acquired(await store.try_claim_lease("s", dead_local_owner("d"), 60_000))
    live = live_local_owner("live")
    new = acquired(await store.reclaim_lease("s", live, dead.fence(), 60_000))
    await store.release_lease(dead.fence())
    row = await store.renew_lease(new.fence(), 60_000)
    assert row.lease_token == new.lease_token


async def test_LSE_30_every_fenced_step_maps_expiry_to_lease_lost(harness: Harness) -> None:
    store = harness.store
    await store.enqueue_input(draft("s", "x"))
    await store.enqueue_command(command_draft("s", "c"))
    lease = await lease_for(store, "s", ttl=harness.short_ttl_ms)
    await harness.expire(lease)
    f = lease.fence()
    with pytest.raises(LeaseLost):
        await store.commit(commit("s", lease, turn=final("t1")))
    with pytest.raises(LeaseLost):
        await store.start_turn(f, "t1")
    with pytest.raises(LeaseLost):
        await store.claim_leading_command(f, lease.owner)
    with pytest.raises(LeaseLost):
        await store.claim_next_turn_inputs(f, lease.owner)
    with pytest.raises(LeaseLost):
        await store.claim_active_turn_inputs(f, lease.owner, "t1", "after_work")
    with pytest.raises(LeaseLost):
        await store.delete_session(f)
    assert len(await store.list_pending_inputs("s")) == 1


async def test_LSE_31_idle_work_waits_while_another_owner_holds_the_lane(store: Store) -> None:
    i = await store.enqueue_input(draft("s", "x"))
    holder = await lease_for(store, "s", "holder")
    busy(await store.try_claim_lease("s", owner("idle"), 60_000))
    assert [p.input_id for p in await store.list_pending_inputs("s")] == [i.record.input_id]
    await store.release_lease(holder.fence())
    idle = await lease_for(store, "s", "idle")
    start = await store.start_turn(idle.fence(), "t1")
    assert start is not None and start.claim is not None
    await store.commit(
        commit(
            "s",
            idle,
            turn=final("t1"),
            completed_input_claims=[start.claim.completion()],
            release_lease=True,
        )
    )
    assert await store.list_pending_inputs("s") == []
