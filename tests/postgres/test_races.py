"""Multi-connection races: two PostgresStore instances (two pools) on the same database.

Each scenario starts both calls behind a barrier so they reach PostgreSQL together, and
repeats several times so both interleavings get exercised.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import psycopg
import pytest

from lash_core.errors import LeaseLost, Superseded
from lash_core.inputs import CancelOutcomeKind, InputIdTarget, InputState
from lash_core.leases import Acquired, Busy
from lash_core.store.base import AdmissionStatus
from lash_core.store.postgres import PostgresStore
from tests.postgres.conftest import acquired, draft, owner, sid, together, wait_until

pytestmark = pytest.mark.postgres
ROUNDS = 8
TTL = 60_000


def _dead(holder: object, claimant: object) -> bool:
    return True


async def test_two_first_claims_of_a_new_session_have_one_winner(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = stores
    for _ in range(ROUNDS):
        s = sid()
        ra, rb = await together(
            partial(a.try_claim_lease, s, owner("A"), TTL),
            partial(b.try_claim_lease, s, owner("B"), TTL),
        )
        results = [ra, rb]
        wins = [r for r in results if isinstance(r, Acquired)]
        busy = [r for r in results if isinstance(r, Busy)]
        assert len(wins) == 1 and len(busy) == 1, results
        assert wins[0].lease.fencing_token == 1
        assert busy[0].holder.lease_token == wins[0].lease.lease_token
        row = await a.read_lease(s)
        assert row is not None and row.fencing_token == 1


async def test_takeover_waits_for_an_in_flight_claim_and_supersedes_it(
    stores: tuple[PostgresStore, PostgresStore], pg_url: str
) -> None:
    a, b = stores
    s = sid()
    lease_a = acquired(await a.try_claim_lease(s, owner("A"), TTL))
    admitted = await a.enqueue_input(draft(s))
    # Hold A's claim transaction open after it has locked and validated the lease row.
    entered, proceed = asyncio.Event(), asyncio.Event()
    original = a._write_inputs

    async def gated(*args: Any, **kwargs: Any) -> int:
        entered.set()
        await proceed.wait()
        return await original(*args, **kwargs)

    a._write_inputs = gated  # type: ignore[method-assign]
    claim_task = asyncio.create_task(a.claim_next_turn_inputs(lease_a.fence(), owner("A")))
    await asyncio.wait_for(entered.wait(), 10)
    takeover = asyncio.create_task(
        b.reclaim_lease(s, owner("B"), lease_a.fence(), TTL, lambda holder, claimant: True)
    )

    async def takeover_waits_on_lock() -> bool:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE '%lash_leases%'"
            ).fetchone()
        return bool(row and row[0] >= 1)

    await wait_until(takeover_waits_on_lock)
    assert not takeover.done()
    proceed.set()
    old_claim = await claim_task
    assert old_claim is not None and old_claim.session_lease_generation == 1
    lease_b = acquired(await takeover)
    assert lease_b.fencing_token == 2

    new_claim = await b.claim_next_turn_inputs(lease_b.fence(), owner("B"))
    assert new_claim is not None
    assert [i.input_id for i in new_claim.inputs] == [admitted.record.input_id]
    assert new_claim.claim_id != old_claim.claim_id

    # The predecessor can neither claim nor complete any more.
    with pytest.raises(LeaseLost):
        await a.claim_next_turn_inputs(lease_a.fence(), owner("A"))
    from lash_core.commit import FinalTurn, RuntimeCommit
    from lash_core.outcomes import AssistantMessageFinish, Finished

    done = Finished(finish=AssistantMessageFinish(text="ok"))
    with pytest.raises(LeaseLost):
        await a.commit(
            RuntimeCommit(
                session_id=s,
                fence=lease_a.fence(),
                turn=FinalTurn(turn_id="t-a", outcome=done),
                completed_input_claims=[old_claim.completion()],
            )
        )
    # Even under the new lease, the old claim's completion is superseded.
    with pytest.raises(Superseded):
        await b.commit(
            RuntimeCommit(
                session_id=s,
                fence=lease_b.fence(),
                turn=FinalTurn(turn_id="t-x", outcome=done),
                completed_input_claims=[old_claim.completion()],
            )
        )
    result = await b.commit(
        RuntimeCommit(
            session_id=s,
            fence=lease_b.fence(),
            turn=FinalTurn(turn_id="t-b", outcome=done),
            completed_input_claims=[new_claim.completion()],
            release_lease=True,
        )
    )
    assert result.head_revision == 1
    record = await a.get_input(s, admitted.record.input_id)
    assert record is not None and record.state is InputState.COMPLETED


async def test_takeover_racing_a_claim_never_lets_both_generations_complete(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = stores
    for _ in range(ROUNDS):
        s = sid()
        lease_a = acquired(await a.try_claim_lease(s, owner("A"), TTL))
        await a.enqueue_input(draft(s))
        claim_a, takeover = await together(
            partial(a.claim_next_turn_inputs, lease_a.fence(), owner("A")),
            partial(b.reclaim_lease, s, owner("B"), lease_a.fence(), TTL, _dead),
        )
        lease_b = acquired(takeover)
        assert lease_b.fencing_token == 2
        # Either A claimed before the takeover, or its fence was already stale.
        assert isinstance(claim_a, LeaseLost) or (
            claim_a is not None and not isinstance(claim_a, BaseException)
        ), claim_a
        claim_b = await b.claim_next_turn_inputs(lease_b.fence(), owner("B"))
        assert claim_b is not None and len(claim_b.inputs) == 1


async def test_concurrent_duplicate_admissions_make_one_row(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = stores
    for _ in range(ROUNDS // 2):
        s = sid()
        calls = [partial(st.enqueue_input, draft(s, source_key="k1")) for st in (a, b) * 3]
        results = await together(*calls)
        assert not [r for r in results if isinstance(r, BaseException)], results
        statuses = sorted(r.status for r in results)  # type: ignore[union-attr]
        assert statuses.count(AdmissionStatus.ADMITTED) == 1
        assert statuses.count(AdmissionStatus.DUPLICATE) == 5
        assert len({r.record.input_id for r in results}) == 1  # type: ignore[union-attr]
        assert len(await a.list_inputs(s)) == 1
        page = await b.events_after(s, 0)
        assert [e.type for e in page.events] == ["input.admitted"]


async def test_cancel_racing_a_claim_has_exactly_one_winner(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = stores
    outcomes: set[str] = set()
    for _ in range(ROUNDS * 2):
        s = sid()
        lease = acquired(await a.try_claim_lease(s, owner("A"), TTL))
        rec = (await a.enqueue_input(draft(s))).record
        claim, cancel = await together(
            partial(a.claim_next_turn_inputs, lease.fence(), owner("A")),
            partial(b.cancel_inputs, s, [InputIdTarget(value=rec.input_id)]),
        )
        assert not isinstance(claim, BaseException) and not isinstance(cancel, BaseException)
        (result,) = cancel  # type: ignore[misc]
        stored = await a.get_input(s, rec.input_id)
        assert stored is not None
        if claim is None:
            assert result.outcome is CancelOutcomeKind.CANCELLED
            assert stored.state is InputState.CANCELLED and stored.claim is None
            outcomes.add("cancelled")
        else:
            assert result.outcome is CancelOutcomeKind.ALREADY_CLAIMED
            assert stored.state is InputState.DEFERRED_NEXT_TURN and stored.claim is not None
            outcomes.add("claimed")
    assert outcomes  # at least one interleaving observed; both are valid


async def test_lease_validity_uses_database_time_only(
    stores: tuple[PostgresStore, PostgresStore], pg_url: str
) -> None:
    """LSE-24/25: expiry is observed via the DB clock across independent connections."""
    a, b = stores
    s = sid()
    before = await a.now_ms()
    lease_a = acquired(await a.try_claim_lease(s, owner("A"), 750))
    after = await b.now_ms()
    assert before <= lease_a.claimed_at_ms <= after
    assert lease_a.expires_at_ms == lease_a.claimed_at_ms + 750
    await a.enqueue_input(draft(s))

    busy = await b.try_claim_lease(s, owner("B"), TTL)
    assert isinstance(busy, Busy) and busy.holder.lease_token == lease_a.lease_token

    async def db_clock_passed() -> bool:
        return await b.now_ms() > lease_a.expires_at_ms

    await wait_until(db_clock_passed)
    holder = await b.read_lease(s)
    assert holder is not None and holder.lease_token == lease_a.lease_token
    lease_b = acquired(await b.reclaim_lease(s, owner("B"), lease_a.fence(), TTL))
    assert lease_b.fencing_token > lease_a.fencing_token

    forged = lease_a.model_copy(
        update={"expires_at_ms": lease_a.expires_at_ms + 10 * 365 * 86_400_000}
    )
    for attempt in (forged, lease_a):
        with pytest.raises(LeaseLost):
            await a.renew_lease(attempt.fence(), TTL)
        with pytest.raises(LeaseLost):
            await a.claim_next_turn_inputs(attempt.fence(), owner("A"))
    with psycopg.connect(pg_url) as observer:
        row = observer.execute(
            "SELECT fencing_token, lease_token FROM lash_leases WHERE session_id = %s", (s,)
        ).fetchone()
    assert row == (lease_b.fencing_token, lease_b.lease_token)
    assert await b.claim_next_turn_inputs(lease_b.fence(), owner("B")) is not None


async def test_dead_owner_reclaim_survives_the_predecessors_late_release(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    """LSE-27."""
    a, b = stores
    s = sid()
    dead = acquired(await a.try_claim_lease(s, owner("D"), TTL))
    live = acquired(await b.reclaim_lease(s, owner("L"), dead.fence(), TTL, lambda h, c: True))
    assert live.fencing_token == dead.fencing_token + 1
    await a.release_lease(dead.fence())
    row = await b.renew_lease(live.fence(), TTL)
    assert row.lease_token == live.lease_token and row.fencing_token == live.fencing_token
    assert isinstance(await a.try_claim_lease(s, owner("X"), TTL), Busy)


def _final(s: str, fence: Any, turn_id: str, **extra: Any) -> Any:
    from lash_core.commit import FinalTurn, RuntimeCommit
    from lash_core.outcomes import AssistantMessageFinish, Finished

    return RuntimeCommit(
        session_id=s,
        fence=fence,
        turn=FinalTurn(turn_id=turn_id, outcome=Finished(finish=AssistantMessageFinish(text="ok"))),
        defer_active_inputs_of_turn=turn_id,
        **extra,
    )


async def test_steering_input_racing_the_final_commit_is_never_stranded(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    from lash_core.inputs import ActiveTurnIngress, NextTurnIngress, TextItem, TurnInput
    from lash_core.inputs import TurnInputDraft as Draft

    a, b = stores
    for _ in range(ROUNDS):
        s = sid()
        lease = acquired(await a.try_claim_lease(s, owner("A"), TTL))
        await a.enqueue_input(draft(s))
        start = await a.start_turn(lease.fence(), "t1")
        assert start is not None and start.claim is not None
        steer = Draft(
            session_id=s,
            ingress=ActiveTurnIngress(turn_id="t1"),
            input=TurnInput(items=[TextItem(text="steer")]),
        )
        final = _final(s, lease.fence(), "t1", completed_input_claims=[start.claim.completion()])
        admission, result = await together(
            partial(b.enqueue_input, steer), partial(a.commit, final)
        )
        assert not isinstance(admission, BaseException) and not isinstance(result, BaseException)
        record = await a.get_input(s, admission.record.input_id)  # type: ignore[union-attr]
        assert record is not None
        # Whichever came first, the steering input ends up as next-turn input.
        assert record.state is InputState.DEFERRED_NEXT_TURN
        assert record.ingress == NextTurnIngress()
        deferred = result.deferred_input_ids  # type: ignore[union-attr]
        admitted_active = admission.record.state is InputState.PENDING_ACTIVE  # type: ignore[union-attr]
        assert (record.input_id in deferred) == admitted_active


async def test_identical_final_commits_racing_apply_once(
    stores: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = stores
    for _ in range(ROUNDS // 2):
        s = sid()
        lease = acquired(await a.try_claim_lease(s, owner("A"), TTL))
        await a.enqueue_input(draft(s))
        start = await a.start_turn(lease.fence(), "t1")
        assert start is not None and start.claim is not None
        final = _final(s, lease.fence(), "t1", completed_input_claims=[start.claim.completion()])
        r1, r2 = await together(partial(a.commit, final), partial(b.commit, final))
        assert not isinstance(r1, BaseException) and not isinstance(r2, BaseException), (r1, r2)
        assert sorted([r1.replayed, r2.replayed]) == [False, True]  # type: ignore[union-attr]
        assert r1.head_revision == r2.head_revision == 1  # type: ignore[union-attr]
        page = await a.events_after(s, 0)
        assert [e.type for e in page.events].count("turn.committed") == 1
