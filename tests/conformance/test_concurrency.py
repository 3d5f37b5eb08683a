"""Races every store must resolve the same way (both stores: concurrent calls on one handle;
PostgreSQL: concurrent transactions on a pool)."""

from __future__ import annotations

import asyncio

import pytest

from lash_core.inputs import CancelOutcomeKind, InputIdTarget
from lash_core.store.base import AdmissionStatus, Store
from tests.conformance.conftest import (
    acquired,
    command_draft,
    commit,
    draft,
    final,
    lease_for,
    owner,
    race,
    race_settled,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_concurrent_admissions_keep_seq_gapless_and_unique(store: Store) -> None:
    inputs, commands = await asyncio.gather(
        asyncio.gather(*[store.enqueue_input(draft("s", f"m{n}")) for n in range(16)]),
        asyncio.gather(*[store.enqueue_command(command_draft("s", f"c{n}")) for n in range(4)]),
    )
    statuses = [r.status for r in inputs] + [c.status for c in commands]
    assert statuses.count(AdmissionStatus.ADMITTED) == 20
    page = await store.events_after("s", 0)
    assert [e.seq for e in page.events] == list(range(1, 17)) and page.last_seq == 16
    seqs = [i.enqueue_seq for i in await store.list_inputs("s")]
    seqs += [c.enqueue_seq for c in await store.list_commands("s")]
    assert len(set(seqs)) == 20


async def test_cancel_and_claim_race_has_one_consistent_outcome(store: Store) -> None:
    i = await store.enqueue_input(draft("s", "x"))
    lease = await lease_for(store, "s")
    cancel, claim = await asyncio.gather(
        store.cancel_inputs("s", [InputIdTarget(value=i.record.input_id)]),
        store.claim_next_turn_inputs(lease.fence(), lease.owner),
    )
    [outcome] = cancel
    if claim is None:
        assert outcome.outcome is CancelOutcomeKind.CANCELLED
    else:
        assert outcome.outcome is CancelOutcomeKind.ALREADY_CLAIMED
    row = await store.get_input("s", i.record.input_id)
    assert row is not None
    assert (row.state.value == "cancelled") == (claim is None)


async def test_racing_turn_starts_under_one_lease_claim_each_input_once(store: Store) -> None:
    for n in range(4):
        await store.enqueue_input(draft("s", f"m{n}"))
    lease = await lease_for(store, "s")
    starts = await race(
        lambda: store.start_turn(lease.fence(), "t1", max_inputs=2),
        lambda: store.start_turn(lease.fence(), "t2", max_inputs=2),
    )
    claimed = [i.input_id for s in starts if s and s.claim for i in s.claim.inputs]
    assert len(claimed) == len(set(claimed)) == 4


async def test_racing_final_commits_of_one_turn_apply_once(store: Store) -> None:
    await store.enqueue_input(draft("s", "x"))
    lease = await lease_for(store, "s")
    start = await store.start_turn(lease.fence(), "t1")
    assert start is not None and start.claim is not None
    c = commit("s", lease, turn=final("t1"), completed_input_claims=[start.claim.completion()])
    results = await race_settled(lambda: store.commit(c), lambda: store.commit(c))
    assert not any(isinstance(r, BaseException) for r in results), results
    heads = {r.head_revision for r in results if not isinstance(r, BaseException)}
    assert heads == {1}
    assert sorted(r.replayed for r in results if not isinstance(r, BaseException)) == [
        False,
        True,
    ]
    assert (await store.load_state("s")).head_revision == 1
    assert [e.type for e in (await store.events_after("s", 2)).events] == ["turn.committed"]


async def test_concurrent_lease_claims_across_sessions_are_independent(store: Store) -> None:
    results = await asyncio.gather(
        *[store.try_claim_lease(f"s{n}", owner(f"w{n}"), 60_000) for n in range(8)]
    )
    assert {acquired(r).fencing_token for r in results} == {1}
