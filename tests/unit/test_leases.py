"""The lease decision table (lash_core.leases), without any store."""

from __future__ import annotations

import os

import pytest

from lash_core.errors import LeaseLost, SessionMismatch
from lash_core.leases import (
    Acquired,
    Busy,
    LeaseOwner,
    LeaseRow,
    LocalProcessLiveness,
    decide_reclaim,
    decide_release,
    decide_renew,
    decide_try_claim,
    fence_matches,
    holder_is_definitely_dead,
    lease_token,
    local_process_owner,
    read_process_start,
    released,
    validate_fence,
)

A = LeaseOwner(owner_id="a", incarnation_id="a1")
A2 = LeaseOwner(owner_id="a", incarnation_id="a2")
B = LeaseOwner(owner_id="b", incarnation_id="b1")
NOW = 1_000_000


def _acquire(
    row: LeaseRow | None, owner: LeaseOwner = A, now: int = NOW, ttl: int = 100
) -> LeaseRow:
    decision = decide_try_claim(row, "s", owner, now, ttl)
    assert isinstance(decision.result, Acquired) and decision.write is not None
    return decision.write


def test_first_claim_starts_at_generation_one() -> None:
    row = _acquire(None)
    assert row.fencing_token == 1
    assert row.lease_token == lease_token("s", A, NOW, 1)
    assert (row.claimed_at_ms, row.expires_at_ms) == (NOW, NOW + 100)


def test_reentry_keeps_token_and_generation_and_extends() -> None:
    row = _acquire(None).model_copy(update={"running_turn_id": "t"})
    again = decide_try_claim(row, "s", A, NOW + 50, 500)
    assert isinstance(again.result, Acquired) and again.write is not None
    assert again.write.lease_token == row.lease_token
    assert again.write.fencing_token == 1
    assert again.write.expires_at_ms == NOW + 550
    assert again.write.running_turn_id == "t"


@pytest.mark.parametrize("other", [A2, B])
def test_live_lease_is_busy_for_everyone_else(other: LeaseOwner) -> None:
    row = _acquire(None)
    decision = decide_try_claim(row, "s", other, NOW + 1, 100)
    assert isinstance(decision.result, Busy) and decision.write is None
    assert decision.result.holder.owner == A


def test_expiry_is_strict_and_bumps_generation() -> None:
    row = _acquire(None)
    assert row.is_live(NOW + 99) and not row.is_live(NOW + 100)
    successor = _acquire(row, B, NOW + 100)
    assert successor.fencing_token == 2 and successor.owner == B


def test_release_is_a_cas_on_the_whole_tenure() -> None:
    row = _acquire(None)
    fence = row.as_lease().fence()
    assert decide_release(row, fence.model_copy(update={"lease_token": "x"})) is None
    assert decide_release(row, fence.model_copy(update={"fencing_token": 9})) is None
    assert decide_release(row, fence.model_copy(update={"owner": A2})) is None
    assert decide_release(None, fence) is None
    gone = decide_release(row, fence)
    assert gone == released(row)
    assert gone is not None and gone.lease_token is None and gone.fencing_token == 1
    assert decide_release(gone, fence) is None
    assert not fence_matches(gone, fence)


def test_validate_fence_rejects_every_mismatch() -> None:
    row = _acquire(None)
    fence = row.as_lease().fence()
    assert validate_fence(row, fence, "s", NOW) == row
    with pytest.raises(SessionMismatch):
        validate_fence(row, fence, "other", NOW)
    for bad_row, bad_fence, now in [
        (None, fence, NOW),
        (row, fence.model_copy(update={"owner": A2}), NOW),
        (row, fence.model_copy(update={"lease_token": "x"}), NOW),
        (row, fence.model_copy(update={"fencing_token": 2}), NOW),
        (row, fence, NOW + 100),
        (released(row), fence, NOW),
    ]:
        with pytest.raises(LeaseLost):
            validate_fence(bad_row, bad_fence, "s", now)


def test_renew_extends_only_a_live_lease() -> None:
    row = _acquire(None)
    fence = row.as_lease().fence()
    renewed = decide_renew(row, fence, NOW + 90, 100)
    assert renewed.expires_at_ms == NOW + 190 and renewed.claimed_at_ms == NOW
    with pytest.raises(LeaseLost):
        decide_renew(row, fence, NOW + 100, 100)


def test_reclaim_needs_the_observed_holder_and_proof_of_death() -> None:
    row = _acquire(None)
    observed = row.as_lease().fence()
    dead = decide_reclaim(row, "s", B, observed, NOW + 1, 100, lambda h, c: True)
    assert isinstance(dead.result, Acquired) and dead.write is not None
    assert dead.write.fencing_token == 2
    alive = decide_reclaim(row, "s", B, observed, NOW + 1, 100, lambda h, c: False)
    assert isinstance(alive.result, Busy) and alive.write is None
    stale = observed.model_copy(update={"lease_token": "old"})
    assert isinstance(
        decide_reclaim(row, "s", B, stale, NOW + 1, 100, lambda h, c: True).result, Busy
    )
    # A non-live row is acquired like a plain claim, whatever was observed.
    after = decide_reclaim(row, "s", B, stale, NOW + 100, 100, lambda h, c: False)
    assert isinstance(after.result, Acquired)


def _local(pid: int, start: int, host: str = "h", boot: str = "b") -> LeaseOwner:
    return LeaseOwner(
        owner_id=f"p{pid}",
        incarnation_id="i",
        liveness=LocalProcessLiveness(host_id=host, boot_id=boot, pid=pid, process_start=start),
    )


def test_holder_is_definitely_dead_rules() -> None:
    starts = {10: 500}
    probe = starts.get
    claimant = _local(1, 1)
    assert holder_is_definitely_dead(_local(10, 499), claimant, probe)  # pid reused
    assert holder_is_definitely_dead(_local(11, 1), claimant, probe)  # pid gone
    assert not holder_is_definitely_dead(_local(10, 500), claimant, probe)  # alive
    assert not holder_is_definitely_dead(_local(10, 499, host="x"), claimant, probe)
    assert not holder_is_definitely_dead(_local(10, 499, boot="x"), claimant, probe)
    assert not holder_is_definitely_dead(A, claimant, probe)
    assert not holder_is_definitely_dead(_local(11, 1), A, probe)


def test_this_process_is_alive_to_itself() -> None:
    me = local_process_owner("me", "inc")
    assert isinstance(me.liveness, LocalProcessLiveness)
    assert me.liveness.pid == os.getpid()
    assert read_process_start(os.getpid()) == me.liveness.process_start
    assert not holder_is_definitely_dead(me, local_process_owner("peer", "inc2"))
